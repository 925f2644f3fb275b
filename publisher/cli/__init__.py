"""The `publisher` command: parses, calls one library function, prints. Known errors become one line."""

from __future__ import annotations

import os
import sys

import click
import typer

from publisher.cli import build, generate, manifests, publish, staging, verify
from publisher.errors import PublisherError, environment_errors

app = typer.Typer(
    name="publisher",
    help="Turn Stable Diffusion checkpoints into Core ML variants and publish them on a Hugging Face Hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """coreml-publisher."""


app.command()(manifests.validate)
app.command()(manifests.schema)
app.command()(manifests.plan)
app.command("build")(build.build_command)
app.command("compile")(build.compile_command)
app.command("source-key")(build.source_key_command)
app.command("recipe")(build.recipe_command)
app.command("publish")(publish.publish_command)
app.command("status")(publish.status_command)
app.command("demo")(publish.demo_command)
app.command("verify")(verify.verify_command)
app.command("fetch")(publish.fetch_command)
app.command("generate")(generate.generate_command)
app.add_typer(staging.app, name="staging")


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("PUBLISHER_DEBUG", "") not in ("", "0")


def _quiet_third_parties() -> None:
    """Normal runs show the project's own progress only: coremltools' pass-by-pass bars (tqdm without an explicit
    `disable`), transformers' FutureWarnings and coremltools' overflow RuntimeWarnings appear with --debug."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")  # the project's bars pass `disable` themselves and still show
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="coremltools")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    if debug:
        os.environ["PUBLISHER_DEBUG"] = "1"  # the commands show what they keep for it (a failing step's traceback)
    else:
        _quiet_third_parties()
    try:
        app(args=args, prog_name="publisher", standalone_mode=False)
    # typer >= 0.22 raises its own copy of click's exceptions (typer.TyperException, typer.Exit, typer.Abort)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except (click.ClickException, typer.TyperException) as exc:  # usage errors: click's message and usage line
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except PublisherError as exc:
        if debug:
            raise
        for line in exc.lines:
            typer.echo(f"error: {line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except environment_errors() as exc:  # files, network, a server's answer: one line, as the expected errors
        if debug:
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}: {text} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    except Exception as exc:  # not an error the library expects: a bug, said as such
        if debug:
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: internal error (a bug in coreml-publisher, not in your input): {type(exc).__name__}: "
                   f"{text}; please report it with the output of the same command run with --debug", err=True)
        sys.exit(1)
