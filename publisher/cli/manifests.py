"""`publisher validate | schema | plan`: thin over publisher.manifest and publisher.plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from publisher.cli._options import (
    DEFAULT_NAMESPACE,
    JsonOpt,
    ManifestPaths,
    NamespaceOpt,
    SourceEndpointOpt,
    VariantsOpt,
    manifest_paths,
    print_table,
)
from publisher.errors import ManifestError
from publisher.manifest import SCHEMA_FILE_NAME, check_resolved, json_schema, load_manifests
from publisher.plan import build_plan
from publisher.util.atomic import atomic_write_text


def validate(
    paths: ManifestPaths = None,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    sources: Annotated[bool, typer.Option("--sources", help="Also check what depends on the source models (reads "
                                                              "their configs from the Hub): recipes in Apple's "
                                                              "layout against the source UNet's modules.")] = False,
    source_endpoint: SourceEndpointOpt = None,
) -> None:
    """Validate manifests: exit 1 with one line per problem (file:line: field: message). Repo ids are checked
    with `{namespace}` filled in."""
    loaded = load_manifests(manifest_paths(paths))
    check_resolved(loaded, namespace)
    if sources:
        from publisher.engine.recipe_sources import recipe_source_problems
        from publisher.util.tokens import token_for

        problems = recipe_source_problems(loaded, namespace, source_endpoint, token_for(source_endpoint))
        if problems:
            raise ManifestError(problems[0], problems)
    for item in loaded:
        m = item.manifest
        variants = sum(len(t.attention) for t in m.publish) * len(m.sizes)
        typer.echo(f"{item.path}: ok: {m.name} ({m.source.repo}@{m.source.revision}), "
                   f"{len(m.publish)} repos, {variants} variants")
    typer.echo(f"{len(loaded)} manifests valid")


def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help=f"Write here (e.g. manifests/{SCHEMA_FILE_NAME}); "
                                                "default: standard output.")] = None,
) -> None:
    """Print or write the manifests' JSON Schema (editors read it through the `$schema` comment line)."""
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        typer.echo(f"wrote {output}")


def plan(
    paths: ManifestPaths = None,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
    github_matrix: Annotated[bool, typer.Option("--github-matrix", help="Print the GitHub Actions matrix JSON.")] = False,
    variant: VariantsOpt = None,
) -> None:
    """Expand manifests into variants and the build steps they share."""
    from publisher.plan import select_variants

    result = build_plan(load_manifests(manifest_paths(paths)), namespace)
    if github_matrix:
        only = [v.id for v in select_variants(result, variant)] if variant else None
        typer.echo(json.dumps(result.github_matrix(only=only), separators=(",", ":")))
        return
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    rows = [(v.repo_id, v.folder, v.coreai_compression.label, "GPU", "iOS27", ",".join(c.value for c in v.components),
             "coreai") if v.coreai else
            (v.repo_id, v.folder, v.precision.label, v.compute_unit.value, v.deployment_target.value,
             ",".join(c.value for c in v.components), ",".join(lay.value for lay in v.layouts))
            for v in result.variants]
    print_table(("repo", "folder", "precision", "compute", "target", "components", "layouts"), rows)
    counts = ", ".join(f"{n} {kind}" for kind, n in result.counts().items() if n)
    typer.echo(f"{len(result.variants)} variants; steps: {counts}")
