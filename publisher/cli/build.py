"""`publisher build` and `publisher compile`: thin over publisher.engine.build."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from publisher.cli._options import (
    DEFAULT_NAMESPACE,
    DEFAULT_STORE,
    EvaluateOpt,
    NamespaceOpt,
    SourceEndpointOpt,
    StoreOpt,
    VariantsOpt,
    debug_enabled,
    print_table,
)
from publisher.engine.build import BuildOptions, BuildResult, build
from publisher.errors import PublisherError
from publisher.manifest import load_manifests
from publisher.util.sizes import human_size
from publisher.util.tokens import token_for

OutOpt = Annotated[Path, typer.Option("--out", help="Where the repos' folders are laid out.")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=0, help="Steps run at once, each in a process of its own "
                                      "and started only while the estimated peaks fit in the available memory "
                                      "(0: one per CPU core).")]
def print_build_table(result: BuildResult) -> None:
    print_table(("variant", "files", "size", "time", "status"),
                [(r.variant.id, r.files, human_size(r.size), f"{r.seconds:.1f} s", r.status) for r in result.variants])
    typer.echo(f"steps: {len(result.built)} built, {len(result.cached)} cached")
    for r in result.variants:
        if r.error:
            typer.echo(f"error: {r.variant.id}: {r.error}", err=True)
            if r.traceback and debug_enabled():  # the failing step's own traceback (its child process's too)
                typer.echo(r.traceback.rstrip(), err=True)


def _evaluate_mode(value: str) -> str:
    if value not in ("auto", "on", "off"):
        raise PublisherError(f"--evaluate must be auto, on or off, not '{value}'")
    return value


def build_command(
    manifests: Annotated[list[Path], typer.Argument(help="Manifest files or folders.")],
    variant: VariantsOpt = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Packages only (Linux): skip .mlmodelc and zips.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the output checks.")] = False,
    out: OutOpt = Path("build"),
    store: StoreOpt = DEFAULT_STORE,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    source_endpoint: SourceEndpointOpt = None,
    verify_store: Annotated[bool, typer.Option("--verify-store", help="Re-hash every stored output before reusing "
                                                                      "it (default: trust unchanged files).")] = False,
    jobs: JobsOpt = 1,
    evaluate: EvaluateOpt = "auto",
) -> None:
    """Build every (or the chosen) variant of the manifests into OUT/<repo>/, redoing only what changed."""
    options = BuildOptions(out=out, store=store, namespace=namespace, compile=not no_compile, verify=not no_verify,
                           variants=variant, endpoint=source_endpoint, token=token_for(source_endpoint),
                           verify_store=verify_store, jobs=jobs or os.cpu_count() or 1,
                           evaluate=_evaluate_mode(evaluate))
    result = build(load_manifests(manifests), options)
    print_build_table(result)
    if not result.ok:
        raise typer.Exit(1)


def compile_command(
    build_dir: Annotated[Path, typer.Argument(help="A build output folder (with build-info.json files).")],
    manifests: Annotated[list[Path] | None, typer.Argument(help="The manifests it was built from.")] = None,
    store: StoreOpt = DEFAULT_STORE,
    source_endpoint: SourceEndpointOpt = None,
    evaluate: EvaluateOpt = "auto",
) -> None:
    """Compile already-built packages (macOS): rebuilds the variants found in BUILD_DIR with compilation on;
    cached steps are reused from the store, so only compile, Resources and zips are new (and, on macOS, the
    end-to-end check through Core ML)."""
    from publisher.build_info import find_build_infos, read_build_info

    ids = []
    namespace = DEFAULT_NAMESPACE
    for path in find_build_infos(build_dir):
        variant = read_build_info(path).variant
        if variant.get("format") == "coreai":
            continue  # a Core AI bundle has nothing to compile: it travels on as it was built
        ids.append(variant["id"])
        namespace = variant["repo"].split("/")[0]
    options = BuildOptions(out=build_dir, store=store, namespace=namespace, compile=True, variants=ids,
                           endpoint=source_endpoint, token=token_for(source_endpoint), evaluate=_evaluate_mode(evaluate))
    result = build(load_manifests(manifests or [Path("manifests")]), options)
    print_build_table(result)
    if not result.ok:
        raise typer.Exit(1)


def source_key_command(
    manifests: Annotated[list[Path], typer.Argument(help="Manifest files or folders.")],
    source_endpoint: SourceEndpointOpt = None,
) -> None:
    """Print one cache key for the source downloads of the manifests: it changes with each source's commit and with
    the files a build downloads from it (for the workflow's source cache)."""
    from publisher.engine.source_key import sources_cache_key

    typer.echo(sources_cache_key(load_manifests(manifests), source_endpoint, token_for(source_endpoint),
                                 DEFAULT_NAMESPACE))


def recipe_command(
    manifests: Annotated[list[Path], typer.Argument(help="Manifest files or folders.")],
    variant: VariantsOpt = None,
    plot: Annotated[Path, typer.Option("--plot", help="Where to write the curve as PNG (one per source: the "
                                                      "source's name is added when there are several).")]
    = Path("recipe-curve.png"),
    store: StoreOpt = DEFAULT_STORE,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    source_endpoint: SourceEndpointOpt = None,
) -> None:
    """Print the mixed-bit curve of each source's UNet (average bits vs measured PSNR against float16) and plot it;
    the analysis is the build's own step, cached in the store, so a build after it reuses it."""
    from publisher.compress.sensitivity import load_record, plot_curve
    from publisher.engine.build import analyze_sources

    options = BuildOptions(store=store, namespace=namespace, variants=variant, endpoint=source_endpoint,
                           token=token_for(source_endpoint))
    results = analyze_sources(load_manifests(manifests), options)
    for result in results:
        record = load_record(result.path)
        typer.echo(f"{result.source} ({result.status}; UNet at {record['resolution']}x{record['resolution']}, "
                   f"{len(record['layers'])} layers, {record['seconds']} s):")
        rows = [(f"{p['average_bits']:.2f}", f"{p['psnr_db']:.2f}", p["recipe"]) for p in record["curve"]]
        rows += [(f"{int(b)}.00", f"{v:.2f}", f"uniform {b}-bit") for b, v in sorted(record["uniform"].items(),
                                                                                      key=lambda i: int(i[0]))]
        if record.get("chosen"):
            chosen = record["chosen"]
            rows.append((f"{chosen['average_bits']:.2f}", f"{chosen['predicted_psnr_db']:.2f}",
                         f"{chosen['recipe']} (the manifest's target)"))
        print_table(("bits", "psnr_db", "recipe"), rows)
        path = plot if len(results) == 1 else plot.with_name(
            f"{plot.stem}-{result.source.split('@')[0].replace('/', '-')}{plot.suffix}")
        plot_curve(record, path, result.source)
        typer.echo(f"wrote {path}")
