"""`publisher verify`: thin over publisher.verify."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from publisher.cli._options import DEFAULT_STORE, StoreOpt
from publisher.errors import PublisherError


def verify_command(
    target: Annotated[Path, typer.Argument(help="A build output folder, or one .mlpackage (with --source).")],
    runtime: Annotated[str, typer.Option("--runtime", help="reference (the MIL executor, any OS) or coreml "
                                                           "(Core ML predictions, macOS).")] = "reference",
    source: Annotated[Path | None, typer.Option("--source", help="diffusers folder of the source (one package).")]
    = None,
    submodule: Annotated[str | None, typer.Option("--submodule", help="Which model the package is (one package).")]
    = None,
    attention: Annotated[str, typer.Option("--attention", help="Its attention implementation (one package).")]
    = "ORIGINAL",
    resolution: Annotated[int, typer.Option("--resolution", help="Its image resolution (one package).")] = 512,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Run each package on the same seeded inputs as PyTorch and check PSNR >= 35 dB (exit 1 below it)."""
    from publisher.verify.build_dir import verify_build_dir
    from publisher.verify.fidelity import verify_package
    from publisher.verify.runtime import runtime_named
    from publisher.vocabulary import Attention

    engine = runtime_named(runtime)
    if target.suffix == ".mlpackage":
        if source is None or submodule is None:
            raise PublisherError("verifying one package needs --source DIR and --submodule NAME")
        results = [("package", verify_package(target, source, submodule, Attention(attention), resolution,
                                              runtime=runtime))]
        typer.echo(f"{submodule}: {results[0][1].to_json()}")
    else:
        results = verify_build_dir(target, engine, store, say=typer.echo)
    failed = [f"{variant} {result.submodule}" for variant, result in results if not result.passed]
    if failed:
        raise PublisherError(f"under the 35 dB bar: {', '.join(failed)}")
    typer.echo(f"{len(results)} packages at or above 35 dB")
