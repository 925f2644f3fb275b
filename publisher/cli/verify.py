"""`publisher verify`: thin over publisher.verify."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from publisher.cli._options import DEFAULT_STORE, StoreOpt
from publisher.errors import PublisherError


def verify_command(
    target: Annotated[Path, typer.Argument(help="A build output folder, or one .mlpackage (with --source).")],
    runtime: Annotated[str, typer.Option("--runtime", help="reference (the MIL executor, any OS), coreml "
                                                           "(Core ML predictions, macOS), or coreai (the Core AI "
                                                           "bundles, through Core AI's runtime: the OS framework on "
                                                           "macOS 27).")] = "reference",
    source: Annotated[Path | None, typer.Option("--source", help="diffusers folder of the source (one package).")]
    = None,
    submodule: Annotated[str | None, typer.Option("--submodule", help="Which model the package is (one package).")]
    = None,
    attention: Annotated[str, typer.Option("--attention", help="Its attention implementation (one package).")]
    = "ORIGINAL",
    resolution: Annotated[int, typer.Option("--resolution", help="Its image resolution (one package).")] = 512,
    store: StoreOpt = DEFAULT_STORE,
    component: Annotated[list[str] | None, typer.Option("--component", help="With --runtime coreai: only these "
                                                        "components of each bundle (text_encoder, unet, vae_decoder, "
                                                        "vae_encoder; repeatable).")] = None,
    require_os_framework: Annotated[bool, typer.Option("--require-os-framework", help="With --runtime coreai: "
                                                       "fail unless Core AI's runtime is the OS framework (macOS "
                                                       "27).")] = False,
) -> None:
    """Run each package on the same seeded inputs as PyTorch and check PSNR >= 35 dB (exit 1 below it)."""
    from publisher.verify.build_dir import verify_build_dir
    from publisher.verify.fidelity import verify_package
    from publisher.verify.runtime import runtime_named
    from publisher.vocabulary import Attention

    if runtime == "coreai":
        verify_coreai(target, store, component or [], require_os_framework)
        return
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


def verify_coreai(build_dir: Path, store: Path, components: list[str], require_os_framework: bool) -> None:
    from publisher.verify.coreai import runtime_name, verify_bundles

    if require_os_framework and "OS framework" not in runtime_name():
        raise PublisherError(f"Core AI's runtime here is not the OS framework ({runtime_name()}): the check needs "
                             "macOS 27 and coreai installed from its wheel")

    results = verify_bundles(build_dir, store, components, say=typer.echo)
    if not results:
        raise PublisherError(f"{build_dir}: no Core AI bundle to check (a repo publishes one with formats: [coreml, "
                             "coreai])")
    failed = [f"{variant} {check.component}" for variant, check in results if not check.passed]
    if failed:
        raise PublisherError(f"Core AI bundles that fail their check: {', '.join(failed)}")
    typer.echo(f"{len(results)} Core AI assets checked")
