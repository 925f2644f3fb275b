"""The fetch of a community source: a single-file checkpoint described by a diffusers config repo, LoRAs fused
into it (or into a diffusers-format source), made into one folder the conversions load as they load any source.

Downloaded: the checkpoint file alone, the config repo's small files (model_index.json, each folder's config,
the scheduler's, the tokenizers'; never its weights), each LoRA file; each checked against the Hub's listing like
any source file. The checkpoint's tensor shapes are compared with the config's UNet before anything loads it
(`convert/community.check_fits`). `convert/community.prepare_source` (its own process) writes the components the
checkpoint holds and those the LoRAs change as diffusers folders into the store, keyed by the sha256 of every file it
reads, the LoRA scales and the code and libraries it runs. The source folder links the config repo's files (or the
diffusers source's) and the prepared folders over them.

A conversion's key takes its component folder's key (`Fetched.folder_keys`): the sha256 of that folder's files and
of the small files every conversion reads, so a LoRA that leaves the text encoder alone leaves its conversion
stored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from publisher.engine.source import (
    TOKENIZER_FILES,
    FetchedSource,
    SourceFile,
    SourcePlan,
    _linked_folder,
    download_planned,
    fetch_source,
    plan_source,
    repo_tree,
)
from publisher.engine.state import BuildState, Fetched
from publisher.errors import SourceError
from publisher.family import ModelFamily, family_named
from publisher.plan import STEP_CODE, FetchParams, fetch_key
from publisher.util.codehash import code_digest
from publisher.util.hashing import step_key
from publisher.util.versions import library_versions
from publisher.vocabulary import Component

# a config repo's small files: a real one's largest is the tokenizer's vocab.json (~1 MB)
MAX_CONFIG_FILE_BYTES = 16 * 1024 * 1024
CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def select_config_files(tree: dict[str, SourceFile], family: ModelFamily, label: str) -> list[SourceFile]:
    """The files of a diffusers repo that describe a checkpoint's architecture: model_index.json, every folder's
    config, the tokenizers' files; no weights. A missing one the build needs, or one too large to be a config, is
    a one-line error."""
    tokenizer_names = (*family.tokenizer_files, *TOKENIZER_FILES)
    chosen = []
    for path in sorted(tree):
        parts = path.split("/")
        if path == "model_index.json" or (len(parts) == 2 and (
                parts[1] in CONFIG_FILES or (parts[0].startswith("tokenizer") and parts[1] in tokenizer_names))):
            chosen.append(tree[path])
    for needed in ("model_index.json", "unet/config.json", *(f"tokenizer/{n}" for n in family.tokenizer_files)):
        if needed not in tree:
            raise SourceError(f"source config {label} has no {needed} (it must be a diffusers-format repo of the "
                              "checkpoint's base model)")
    for item in chosen:
        if item.size > MAX_CONFIG_FILE_BYTES:
            raise SourceError(f"source config {label}: {item.path} is {item.size} bytes; a config file is far "
                              f"smaller (at most {MAX_CONFIG_FILE_BYTES})")
    return chosen


def _file_plan(repo: str, revision: str, path: str, endpoint: str | None, token: str | bool | None, what: str
               ) -> SourcePlan:
    commit, tree = repo_tree(repo, revision, endpoint, token)
    if path not in tree:
        raise SourceError(f"{what} {repo}@{revision} has no file {path}")
    return SourcePlan(repo, revision, commit, (tree[path],), ())


def _one_file(repo: str, revision: str, path: str, options: Any, what: str) -> FetchedSource:
    plan = _file_plan(repo, revision, path, options.endpoint, options.token, what)
    return download_planned(plan, options.store / "hub-cache", options.endpoint, options.token, f"--{what}")


def _config_plan(params: FetchParams, endpoint: str | None, token: str | bool | None) -> SourcePlan:
    repo, revision = params.config
    commit, tree = repo_tree(repo, revision, endpoint, token)
    chosen = select_config_files(tree, family_named(params.family), f"{repo}@{revision}")
    return SourcePlan(repo, revision, commit, tuple(chosen), ())


def community_plans(params: FetchParams, components: Sequence[Component], endpoint: str | None,
                    token: str | bool | None) -> list[SourcePlan]:
    """What the fetch of a community source downloads, repo by repo (nothing is downloaded): the checkpoint file
    and the config repo's small files, or the diffusers source's files; each LoRA file."""
    if params.file:
        plans = [_file_plan(params.repo, params.revision, params.file, endpoint, token, "source"),
                 _config_plan(params, endpoint, token)]
    else:
        plans = [plan_source(params.repo, params.revision, components, endpoint, token, params.weights,
                             params.family)]
    return plans + [_file_plan(repo, revision, file, endpoint, token, "LoRA")
                    for repo, file, revision, _ in params.loras]


def _fetched(source: FetchedSource, **more: Any) -> Fetched:
    return Fetched("", source.path, source.commit, source.repo, source.revision,
                   {f.path: f.to_json() for f in source.files}, **more)


def fetch_community(state: BuildState, params: FetchParams, components: Sequence[Component]) -> Fetched:
    """Fetch, check and prepare a community source (see the module doc); the Fetched it returns is the source
    every conversion of the manifest loads."""
    options = state.options
    parts: dict[str, Fetched] = {}
    checkpoint: Path | None = None
    architecture = None
    if params.file:
        main = _one_file(params.repo, params.revision, params.file, options, "source")
        config_label = "@".join(params.config)
        base = download_planned(_config_plan(params, options.endpoint, options.token), options.store / "hub-cache",
                                options.endpoint, options.token, "--config")
        checkpoint = main.path / params.file
        from publisher.convert.community import check_fits, checkpoint_shapes

        architecture = check_fits(checkpoint_shapes(checkpoint), base.path, f"source {params.repo}: {params.file}",
                                  config_label)
        parts["config"] = _fetched(base, architecture=architecture)
    else:
        main = base = fetch_source(params.repo, params.revision, list(components), options.store / "hub-cache",
                                   endpoint=options.endpoint, token=options.token, weights=params.weights,
                                   family=params.family)
    loras = []
    resolved = []  # the LoRAs as the fetch's key names them: their revisions resolved to commits
    for number, (repo, file, revision, scale) in enumerate(params.loras, start=1):
        got = _one_file(repo, revision, file, options, "LoRA")
        parts[f"lora{number:02d}"] = _fetched(got, scale=scale)
        loras.append((got, file, scale))
        resolved.append((repo, file, got.commit, scale))
    # the prepared folders: keyed by every file they are made from, the scales, the code and the libraries
    digests = {item.path: item.sha256 for item in sorted(base.files, key=lambda item: item.path)}
    inputs = {"family": params.family, "base": digests,
              "checkpoint": main.files[0].sha256 if checkpoint is not None else None,
              "loras": [[got.files[0].sha256, scale] for got, _, scale in loras]}
    key = step_key("prepare", inputs, [], {**library_versions(), "code": code_digest(STEP_CODE["prepare"])})
    stored = state.store.get(key)
    if stored is None:
        from publisher.convert.community import prepare_source

        state.report(f"prepare {params.repo}" + (f" {params.file}" if params.file else "") +
                     (f" + {len(loras)} LoRA(s)" if loras else ""))
        with state.store.building(key, {"step": "prepare", "kind": "prepare", "params": inputs}) as work:
            report = state.run(prepare_source, str(checkpoint) if checkpoint is not None else None, str(base.path),
                               [(str(got.path / file), scale, f"{got.repo}/{file}") for got, file, scale in loras],
                               params.family, str(work / "source"))
            (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        stored = state.store.get(key)
        if stored is None:
            raise SourceError(f"the prepared source {key[:12]} did not verify right after it was written")
    prepared = stored.path / "source"
    report = json.loads((stored.path / "report.json").read_text())
    folder, content = _compose(base, prepared, stored.record["files"], report["folders"], options.store)
    key_params = replace(params, loras=tuple(resolved),
                         config=(params.config[0], parts["config"].commit) if "config" in parts else params.config)
    widen = 2 if report["dtype"] in ("float16", "bfloat16") else 1  # loaded as float32
    return Fetched(fetch_key(main.repo, main.commit, key_params), folder, main.commit, main.repo, main.revision,
                   {f.path: f.to_json() for f in main.files}, parts=parts, folder_keys=_folder_keys(content),
                   loaded_bytes={name: size * widen for name, (_, size) in content.items()
                                 if name.endswith(WEIGHT_SUFFIXES)},
                   architecture=architecture)


def _compose(base: FetchedSource, prepared: Path, record: dict[str, Any], folders: Sequence[str], store: Path
             ) -> tuple[Path, dict[str, tuple[str, int]]]:
    """One folder: the base's files less the component folders the prepare step wrote, then those folders; and its
    content (path -> sha256, size)."""
    import hashlib

    content: dict[str, tuple[str, int]] = {}
    links = []
    for item in base.files:
        if item.path.split("/")[0] not in folders:
            content[item.path] = (str(item.sha256), item.size)
            links.append(((base.path / item.path).resolve(), item.path))
    for name, entry in sorted(record.items()):
        if name.startswith("source/"):
            content[name.removeprefix("source/")] = (entry["sha256"], entry["size"])
            links.append((prepared / name.removeprefix("source/"), name.removeprefix("source/")))
    digest = hashlib.sha256(json.dumps(sorted(content.items())).encode()).hexdigest()[:16]
    target = store / "hub-cache" / "sources" / f"community--{digest}"
    _linked_folder(target, links)
    return target, content


def _folder_keys(content: dict[str, tuple[str, int]]) -> dict[str, str]:
    """Per component folder: a key of its files and of every file outside the weights (configs, tokenizers), which
    any conversion may read."""
    shared = {name: sha for name, (sha, _) in content.items() if not name.endswith(WEIGHT_SUFFIXES)}
    folders = {name.split("/")[0] for name in content if "/" in name}
    return {folder: step_key("source-folder", {"files": {**shared, **{name: sha for name, (sha, _) in content.items()
                                                                      if name.startswith(f"{folder}/")}}}, [], {})
            for folder in sorted(folders)}
