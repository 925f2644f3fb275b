"""Typed parameter aliases shared by every command group, so one option means one thing everywhere."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_NAMESPACE = os.environ.get("PUBLISHER_NAMESPACE", "local")

ManifestPaths = Annotated[
    list[Path] | None,
    typer.Argument(help="Manifest files or folders of them (default: manifests/).", show_default=False),
]
NamespaceOpt = Annotated[
    str,
    typer.Option("--namespace", "-n", help="Hub user or org that replaces {namespace} in repo names.",
                 envvar="PUBLISHER_NAMESPACE"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
VariantsOpt = Annotated[
    list[str] | None,
    typer.Option("--variant", help="Only these variant ids or fnmatch patterns, e.g. 'me/repo/*' (repeatable)."),
]
StoreOpt = Annotated[Path, typer.Option("--store", help="The build store: cached step outputs, the source "
                                                        "downloads and each package's reference outputs.")]
SourceEndpointOpt = Annotated[str | None, typer.Option(
    "--source-endpoint", envvar="PUBLISHER_SOURCE_ENDPOINT",
    help="Hub the source models are read from (default: HF_ENDPOINT, else huggingface.co).")]
DEFAULT_STORE = Path(".publisher/store")
EvaluateOpt = Annotated[str, typer.Option("--evaluate", help="The end-to-end check: auto runs it where it is cheap "
                                                            "(Core ML on macOS; a small model on Linux), on always, "
                                                            "off never.")]


def manifest_paths(paths: list[Path] | None) -> list[Path]:
    return list(paths) if paths else [Path("manifests")]


def print_table(header: tuple[str, ...], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell, two spaces apart (the one table layout of every command)."""
    cells = [tuple(str(cell) for cell in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        typer.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def debug_enabled() -> bool:
    """`--debug` was given (the top-level handler sets PUBLISHER_DEBUG for the commands)."""
    return os.environ.get("PUBLISHER_DEBUG", "") not in ("", "0")
