"""Publishing built variants to a Hub (huggingface.co or the staging Hub), and reading back what is published."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.build_info import BUILD_INFO, read_build_info
from publisher.errors import PublisherError
from publisher.manifest import LoadedManifest
from publisher.plan import Variant, build_plan, select_variants
from publisher.util.net import talking_to
from publisher.util.tokens import token_for, token_variable

STAGING_ENDPOINT = "http://127.0.0.1:8765"
HUB_ENDPOINT = "https://huggingface.co"
TARGETS = {"staging": STAGING_ENDPOINT, "hub": HUB_ENDPOINT}


def resolve_endpoint(target: str, endpoint: str | None) -> str:
    if target not in TARGETS:
        raise PublisherError(f"target must be one of {', '.join(TARGETS)}, not '{target}'")
    if target == "staging":
        # the staging Hub speaks LFS only: the client must not try Xet (read when huggingface_hub is imported)
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    return (endpoint or TARGETS[target]).rstrip("/")


def hub_api(endpoint: str, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False)


@dataclass
class PublishOptions:
    out: Path = Path("build")
    namespace: str = "local"
    target: str = "staging"
    endpoint: str | None = None
    token: str | None = None
    variants: Sequence[str] | None = None
    dry_run: bool = False
    create_pr: bool = False
    # publish variants the end-to-end gate refuses, with this reason in their commit messages
    allow_regression: str | None = None


def group_by_repo(variants: Sequence[Variant]) -> dict[str, list[Variant]]:
    groups: dict[str, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.repo_id, []).append(variant)
    return groups


def publish(manifests: Sequence[LoadedManifest], options: PublishOptions,
            say: Callable[[str], None] = lambda _: None) -> list[Any]:
    from publisher.publish.hub import publish_repo

    endpoint = resolve_endpoint(options.target, options.endpoint)
    plan = build_plan(manifests, options.namespace)
    chosen = select_variants(plan, options.variants)
    api = hub_api(endpoint, options.token)
    outcomes = []
    refused: list[str] = []
    for repo_id, variants in group_by_repo(chosen).items():
        with talking_to(endpoint, f"publishing {repo_id}", token_variable(endpoint)):
            problems = {v.id: problem for v in variants
                        if (problem := gate(api, v, options.out / repo_id, endpoint, options.token)) is not None}
            notes = {}
            for variant in variants:
                if variant.id in problems and options.allow_regression is not None:
                    say(f"warning: {problems[variant.id]}; published anyway (--allow-regression)")
                    notes[variant.folder] = (f"Published despite the end-to-end gate: {problems[variant.id]}\n"
                                             f"Reason: {options.allow_regression}")
            if options.allow_regression is None:
                refused += problems.values()
                variants = [v for v in variants if v.id not in problems]
            if variants:
                outcomes.append(publish_repo(api, repo_id, options.out / repo_id, variants, endpoint,
                                             dry_run=options.dry_run, create_pr=options.create_pr, say=say,
                                             token_name=token_variable(endpoint), notes=notes))
    if refused:
        raise PublisherError(f"{len(refused)} variant(s) not published", lines=[
            *(f"{line}: not published (--allow-regression REASON publishes it anyway)" for line in refused)])
    return outcomes


def gate(api: Any, variant: Variant, repo_dir: Path, endpoint: str, token: str | None) -> str | None:
    """The end-to-end gate (publisher.gate) on a built variant: None where it may be published (or was not
    evaluated); the figure it is held to is the floor of its precision (the manifest's, else the default) and what
    the repo's current revision recorded."""
    from publisher.gate import MARGIN_DB, floor_of, gate_problem

    path = repo_dir / variant.folder / BUILD_INFO
    if not path.is_file():
        return None  # publishing says it is not built
    evaluation = read_build_info(path).evaluation
    if not evaluation:
        return None
    settings = dict(variant.evaluate_settings)
    compressed = any(variant.compresses(c) for c in variant.components)
    return gate_problem(variant.id, evaluation, floor_of(compressed, settings.get("floor_db")),
                        published_evaluation(api, variant, endpoint, token), settings.get("margin_db", MARGIN_DB))


def published_evaluation(api: Any, variant: Variant, endpoint: str, token: str | None,
                         limit: int = 1 << 20) -> dict[str, Any] | None:
    """The end-to-end record of the variant's published revision (None: none published; one over `limit` bytes
    or not JSON is not read)."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from publisher.gate import EVALUATION

    name = f"{variant.folder}/{EVALUATION}"
    try:
        listed = api.get_paths_info(variant.repo_id, [name])
        if not listed or getattr(listed[0], "size", limit + 1) > limit:
            return None
        local = Path(hf_hub_download(variant.repo_id, name, endpoint=endpoint, token=token or False))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    if local.stat().st_size > limit:
        return None
    try:
        data = json.loads(local.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@dataclass
class VariantStatus:
    variant: Variant
    published: bool
    revision: str | None
    current: bool
    reason: str


def status(manifests: Sequence[LoadedManifest], namespace: str, endpoint: str, token: str | None,
           source_endpoint: str | None = None, variants: Sequence[str] | None = None) -> list[VariantStatus]:
    """For each variant: is it published, at which repo revision, and is it current with the manifest (same
    variant settings, same source commit, same tools and code)?"""
    from publisher.store import tool_versions

    plan = build_plan(manifests, namespace)
    chosen = select_variants(plan, variants)
    api = hub_api(endpoint, token)
    # the source may live on another Hub: it gets the token meant for it, never the target's
    source_token = token if source_endpoint in (None, endpoint) else token_for(source_endpoint)
    source_api = hub_api(source_endpoint or endpoint, source_token)
    versions = tool_versions()
    source_commits: dict[tuple[str, str], str | None] = {}
    results = []
    for variant in chosen:
        with talking_to(endpoint, f"reading the status of {variant.id}"):
            results.append(_variant_status(variant, api, source_api, endpoint, token, versions, source_commits))
    return results


def _variant_status(variant: Variant, api: Any, source_api: Any, endpoint: str, token: str | None,
                    versions: dict[str, str], source_commits: dict[tuple[str, str], str | None]) -> VariantStatus:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    def commit_of(repo: str, revision: str) -> str | None:
        if (repo, revision) not in source_commits:
            try:
                source_commits[repo, revision] = source_api.repo_info(repo, revision=revision).sha
            except (RepositoryNotFoundError, RevisionNotFoundError):
                source_commits[repo, revision] = None
        return source_commits[repo, revision]

    key = (variant.source_repo, variant.source_revision)
    commit_of(*key)
    try:
        revision = api.repo_info(variant.repo_id).sha
        local = hf_hub_download(variant.repo_id, f"{variant.folder}/{BUILD_INFO}", revision=revision,
                                endpoint=endpoint, token=token or False)
        info = read_build_info(Path(local))
    except RepositoryNotFoundError:
        return VariantStatus(variant, False, None, False, "repo does not exist")
    except EntryNotFoundError:
        return VariantStatus(variant, False, revision, False, "variant not published")
    except PublisherError:  # written by another version of the publisher (or not by it at all)
        return VariantStatus(variant, True, revision, False, "its build-info is not one this version reads")
    reasons = []
    if info.variant != variant.to_json():
        reasons.append("manifest settings changed")
    if source_commits[key] is None:
        reasons.append("source unreachable")
    elif info.source.commit != source_commits[key]:
        reasons.append("source has a new commit")
    for role, extra in sorted(info.extra_sources.items()):  # a custom VAE, a refiner, a config repo, the LoRAs
        current = commit_of(extra.repo, extra.revision)
        if current is not None and current != extra.commit:
            reasons.append(f"{role} source has a new commit")
    if info.tools != versions:
        reasons.append("tool versions or the project's code changed")
    return VariantStatus(variant, True, revision, not reasons, ", ".join(reasons) or "current")
