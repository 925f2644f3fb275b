"""`publisher publish | status | demo`: thin over publisher.publish and publisher.demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from publisher.cli._options import DEFAULT_NAMESPACE, NamespaceOpt, VariantsOpt, print_table
from publisher.fetch import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_UNCOMPRESSED
from publisher.manifest import load_manifests
from publisher.util.tokens import token_for

TargetOpt = Annotated[str, typer.Option("--target", help="staging (the local staging Hub; default) or hub.")]
EndpointOpt = Annotated[str | None, typer.Option("--endpoint", help="Hub URL (default: the target's).")]


def publish_command(
    manifests: Annotated[list[Path], typer.Argument(help="Manifest files or folders.")],
    out: Annotated[Path, typer.Option("--out", help="The build output folder.")] = Path("build"),
    variant: VariantsOpt = None,
    target: TargetOpt = "staging",
    endpoint: EndpointOpt = None,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would change; send nothing.")] = False,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of writing main.")] = False,
    allow_regression: Annotated[str | None, typer.Option(
        "--allow-regression", metavar="REASON", help="Publish variants the end-to-end gate refuses (under their "
        "floor, or regressed from the published revision); REASON goes into their commit messages.")] = None,
) -> None:
    """Publish built variants: only changed files, one commit per variant, the model card with the last. A variant
    whose end-to-end check fell under its floor or regressed is not published (one line each, exit 1)."""
    from publisher.publish import PublishOptions, publish, resolve_endpoint

    url = resolve_endpoint(target, endpoint)
    outcomes = publish(load_manifests(manifests), PublishOptions(
        out=out, namespace=namespace, target=target, endpoint=endpoint, token=token_for(url), variants=variant,
        dry_run=dry_run, create_pr=create_pr, allow_regression=allow_regression), say=typer.echo)
    for outcome in outcomes:
        for diff in outcome.diffs:
            typer.echo(f"{outcome.repo_id}/{diff.folder}: {len(diff.added)} added, {len(diff.changed)} changed, "
                       f"{len(diff.removed)} removed, {diff.upload_bytes} bytes to send")
        card = "card changes" if outcome.card_changed else "card unchanged"
        done = "dry run: nothing sent" if dry_run else f"{len(outcome.commits)} commits"
        typer.echo(f"{outcome.repo_id}: {card}; {done}" + (f"; PR {outcome.pr_url}" if outcome.pr_url else ""))


def status_command(
    manifests: Annotated[list[Path] | None, typer.Argument(help="Manifest files or folders.")] = None,
    target: TargetOpt = "staging",
    endpoint: EndpointOpt = None,
    source_endpoint: Annotated[str | None, typer.Option("--source-endpoint", envvar="PUBLISHER_SOURCE_ENDPOINT",
                                                        help="Hub of the source models (default: the target).")] = None,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    github_matrix: Annotated[bool, typer.Option("--github-matrix", help="Print the matrix of variants that are not "
                                                                        "current (for the workflow).")] = False,
) -> None:
    """What is published for each variant, at which revision, and whether it is current with the manifest."""
    from publisher.plan import build_plan
    from publisher.publish import resolve_endpoint, status

    loaded = load_manifests(manifests or [Path("manifests")])
    url = resolve_endpoint(target, endpoint)
    rows = status(loaded, namespace, url, token_for(url), source_endpoint=source_endpoint)
    if github_matrix:
        stale = [r.variant.id for r in rows if not r.current]
        typer.echo(json.dumps(build_plan(loaded, namespace).github_matrix(only=stale), separators=(",", ":")))
        return
    print_table(("variant", "published", "revision", "current"),
                [(r.variant.id, "yes" if r.published else "no", (r.revision or "-")[:12],
                  "yes" if r.current else f"no ({r.reason})") for r in rows])


def demo_command(
    keep: Annotated[Path | None, typer.Option("--keep", help="Work in this folder and keep it afterwards.")] = None,
) -> None:
    """Run the whole job offline: staging Hub, tiny model, build, publish, download, check."""
    from publisher.demo import run_demo

    run_demo(keep, say=typer.echo)


def fetch_command(
    repo: Annotated[str, typer.Argument(help="Repo id, e.g. org/coreml-stable-diffusion-v1-5-palettized.")],
    variant: Annotated[str, typer.Option("--variant", help="original/packages, original/compiled, or a "
                                                           "<repo>_<attention>_compiled.zip")],
    to: Annotated[Path, typer.Option("--to", help="Target folder.")],
    target: TargetOpt = "hub",
    endpoint: EndpointOpt = None,
    revision: Annotated[str, typer.Option("--revision", help="Branch, tag or commit.")] = "main",
    max_bytes: Annotated[int, typer.Option("--max-bytes", help="Refuse a variant listed at more bytes, or a zip that "
                                           "expands to more.")] = DEFAULT_MAX_UNCOMPRESSED,
    max_entries: Annotated[int, typer.Option("--max-entries", help="Refuse a zip with more entries.")] = (
        DEFAULT_MAX_ENTRIES),
) -> None:
    """Download one variant, check every file against the Hub's checksums, unzip safely, then move it into place
    in one step (a failure leaves TO as it was); exit 1 on a mismatch."""
    from publisher.fetch import fetch_variant
    from publisher.publish import resolve_endpoint

    url = resolve_endpoint(target, endpoint)
    result = fetch_variant(repo, variant, to, endpoint=url, token=token_for(url), revision=revision,
                           max_bytes=max_bytes, max_entries=max_entries, progress=True)
    typer.echo(f"{repo}@{result.commit[:12]} {variant}: {len(result.files)} files, {result.bytes} bytes verified"
               + (f", extracted into {result.extracted}" if result.extracted else ""))
