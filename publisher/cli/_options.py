"""Typed parameter aliases shared by every command group, so one option means one thing everywhere."""

from __future__ import annotations

import os
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


def manifest_paths(paths: list[Path] | None) -> list[Path]:
    return list(paths) if paths else [Path("manifests")]
