"""`publisher validate --sources`: recipes in Apple's layout checked against their source's UNet before a build.

A recipe names diffusers module names; whether they are the source UNet's depends on the source, which the manifest
only names. This reads the one file that decides it, the source's `unet/config.json` (the config repo's for a
single-file checkpoint), builds the UNet on the meta device (no weight is read) and reports each recipe that names
modules it lacks on the manifest's line. The build makes the same check right after its fetch
(engine/build.py `_check_recipes`); this one costs a config download instead of a source download.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from publisher.compress.sensitivity import unet_weight_names, unknown_modules
from publisher.engine.community import MAX_CONFIG_FILE_BYTES
from publisher.engine.source import SourcePlan, download_planned, repo_tree
from publisher.errors import SourceError
from publisher.manifest import LoadedManifest, located
from publisher.plan import AnalyzeParams, FetchParams, build_plan

UNET_CONFIG = "unet/config.json"


def _unet_names(repo: str, revision: str, family: str, endpoint: str | None, token: str | bool | None,
                cache: Path) -> set[str]:
    commit, tree = repo_tree(repo, revision, endpoint, token)
    entry = tree.get(UNET_CONFIG)
    if entry is None:
        raise SourceError(f"source {repo}@{revision} has no {UNET_CONFIG}")
    if entry.size > MAX_CONFIG_FILE_BYTES:
        raise SourceError(f"source {repo}@{revision}: {UNET_CONFIG} is {entry.size} bytes; a config is far smaller")
    fetched = download_planned(SourcePlan(repo, revision, commit, (entry,), ()), cache, endpoint, token, "--unet-config")
    return unet_weight_names(fetched.path, family)


def recipe_source_problems(loaded: Sequence[LoadedManifest], namespace: str, endpoint: str | None,
                           token: str | bool | None) -> list[str]:
    """One line per publish entry whose Apple-layout recipe names modules its source's UNet has no weight for
    (`file:line: publish[i].precision.mixed_bit.recipe: ...`); [] when every recipe matches."""
    plan = build_plan(loaded, namespace)
    by_repo = {(str(item.path), target.repo_id(namespace)): (item.path, index)
               for item in loaded for index, target in enumerate(item.manifest.publish)}
    variants = {variant.id: variant for variant in plan.variants}
    names: dict[tuple[str, str, str], set[str]] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="publisher-recipe-check-") as cache:
        for analyze in plan.steps_of("analyze"):
            params = analyze.params
            if not isinstance(params, AnalyzeParams) or "apple_recipe" not in params.settings:
                continue
            fetch = next(plan.steps[i].params for i in analyze.inputs if plan.steps[i].kind == "fetch")
            assert isinstance(fetch, FetchParams)
            repo, revision = fetch.config if fetch.file else (fetch.repo, fetch.revision)
            key = (repo, revision, params.family)
            if key not in names:
                names[key] = _unet_names(repo, revision, params.family, endpoint, token, Path(cache))
            message = unknown_modules((name for name, _ in params.settings["apple_recipe"]), names[key])
            if message is None:
                continue
            places = sorted({by_repo[(variants[v].manifest_path, variants[v].repo_id)] for v in analyze.variants})
            problems += [located(path, ("publish", index, "precision", "mixed_bit", "recipe"),
                                 f"{message} (source {repo}@{revision})") for path, index in places]
    return problems
