"""Fetch the files of a diffusers checkpoint that a build loads, at a revision resolved to a commit.

The file list is decided from the repo's tree at that commit (one API call), the way diffusers decides what it
loads: `model_index.json`, the tokenizer files, and per component folder its config plus one copy of the weights
(a sharded copy: its index and its shards). A repo usually carries several copies of each weight (`.bin`,
`.safetensors`, their `fp16` variants, `non_ema` copies, single-file checkpoints at the root); only the preferred
copy is downloaded: the `fp16` safetensors (every output is float16), then float32 safetensors, then pickled `.bin`
(with a warning). `weights: fp16 | fp32` in the manifest's source narrows the choice.

The chosen files are hard-linked into a folder of their own, so the loaders see exactly one copy of each weight
whatever else the download cache holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.convert.weight_files import choose_weights
from publisher.errors import SourceError
from publisher.family import DEFAULT_FAMILY, family_named
from publisher.layout import link_or_copy
from publisher.util.atomic import atomic_write_text
from publisher.util.net import talking_to
from publisher.vocabulary import Component

# downloaded when present besides the family's own tokenizer files (diffusers reads them; the apps do not)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the repo root
    size: int
    sha256: str | None  # the Hub's LFS oid (None for small files kept in git); once verified, of the bytes used
    blob_id: str | None = None
    verified: bool = False  # the downloaded bytes were checked against the Hub's listing

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"size": self.size}
        if self.sha256:
            data["sha256"] = self.sha256
        if self.blob_id:
            data["git_oid"] = self.blob_id
        if self.verified:
            data["verified"] = True
        return data


@dataclass(frozen=True)
class FetchedSource:
    repo: str
    revision: str
    commit: str  # the revision resolved to a commit id
    path: Path
    files: tuple[SourceFile, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision}"


def select_source_files(tree: dict[str, SourceFile], components: Sequence[Component], weights: str,
                        label: str, family: str = DEFAULT_FAMILY) -> tuple[list[SourceFile], list[str]]:
    """What a build of `components` loads from a repo whose files are `tree` (path -> file); plus warnings."""
    model_family = family_named(family)
    chosen = ["model_index.json"] if "model_index.json" in tree else []
    for name in (f"tokenizer/{n}" for n in model_family.tokenizer_files):
        if name not in tree:
            raise SourceError(f"source {label} has no {name} (the apps need the tokenizer files)")
    chosen += [f"tokenizer/{n}" for n in dict.fromkeys((*model_family.tokenizer_files, *TOKENIZER_FILES))
               if f"tokenizer/{n}" in tree]
    if SCHEDULER_CONFIG in tree:  # its prediction type and betas (a Core AI bundle's metadata says them)
        chosen.append(SCHEDULER_CONFIG)
    warnings = []
    folder_of = {c: model_family.component(c).folder for c in components}
    for folder in sorted(set(folder_of.values())):
        if f"{folder}/config.json" not in tree:
            component = next(c for c in components if folder_of[c] == folder)
            raise SourceError(f"source {label} has no {component.value} ({folder}/config.json is missing); "
                              "drop it from the manifest's source.components")
        names = [p[len(folder) + 1:] for p in tree if p.startswith(folder + "/") and "/" not in p[len(folder) + 1:]]
        try:
            files, warning = choose_weights(folder, names, weights)
        except SourceError as exc:
            raise SourceError(f"source {label}: {exc}") from exc
        if warning:
            warnings.append(f"source {label}: {warning}")
        chosen += [f"{folder}/config.json"] + [f"{folder}/{n}" for n in files]
    return [tree[p] for p in chosen], warnings


def component_folder(tree: dict[str, SourceFile] | Sequence[str], candidates: Sequence[str], label: str) -> str:
    """The first of `candidates` (repo folders, "" for the root) that holds a config.json."""
    for folder in candidates:
        if (f"{folder}/config.json" if folder else "config.json") in tree:
            return folder
    shown = " or ".join(f"{c}/config.json" if c else "config.json" for c in candidates)
    raise SourceError(f"source {label} has no {shown}")


def select_component_files(tree: dict[str, SourceFile], folder: str, weights: str, label: str
                           ) -> tuple[list[SourceFile], list[str]]:
    """One component's config and weights from an extra source (a custom VAE, a refiner): `folder` of the repo,
    or its root ("") for a repo that holds one model."""
    prefix = f"{folder}/" if folder else ""
    component_folder(tree, [folder], label)
    names = [p[len(prefix):] for p in tree if p.startswith(prefix) and "/" not in p[len(prefix):]]
    try:
        files, warning = choose_weights(folder or ".", names, weights)
    except SourceError as exc:
        raise SourceError(f"source {label}: {exc}") from exc
    return [tree[f"{prefix}config.json"]] + [tree[prefix + n] for n in files], \
        [f"source {label}: {warning}"] if warning else []


def _link_tree(snapshot: Path, files: Sequence[SourceFile], target: Path, moves: tuple[str, str] = ("", "")
               ) -> None:
    """Hard-link exactly `files` from the download cache into `target` (staged, then renamed into place); a file
    under the repo folder `moves[0]` goes under `moves[1]` instead (an extra source's files where the family
    reads them)."""
    old, new = moves
    links = []
    for item in files:
        local = item.path
        if old != new and (not old or local.startswith(old + "/")):
            local = f"{new}/{local[len(old) + 1:] if old else local}"
        links.append(((snapshot / item.path).resolve(), local))
    _linked_folder(target, links)


def _linked_folder(target: Path, links: Sequence[tuple[Path, str]]) -> None:
    """Create `target` holding hard links (file, relative path; a later one replaces an earlier one at the same
    path), staged next to it and renamed into place; a folder already there is kept (its name is its content)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for source, relative in links:
            destination = staging / relative
            destination.unlink(missing_ok=True)
            link_or_copy(source, destination)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class SourcePlan:
    """What a build of a source will download: the commit the revision resolves to and the chosen files."""

    repo: str
    revision: str
    commit: str
    files: tuple[SourceFile, ...]
    warnings: tuple[str, ...]
    folder: str | None = None  # an extra source: the repo folder its component was found in ("" the root)

    @property
    def digest(self) -> str:
        return _file_list_digest(self.files)

    @property
    def cache_key(self) -> str:
        """Changes with the commit and with the file list (a cache keyed so holds exactly these downloads)."""
        return f"{self.repo.replace('/', '--')}-{self.commit[:12]}-{self.digest[:16]}"


def repo_tree(repo: str, revision: str, endpoint: str | None, token: str | bool | None
              ) -> tuple[str, dict[str, SourceFile]]:
    """The commit `revision` resolves to and the repo's files there (path -> listing), in one API call; one-line
    errors for a missing repo or revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    label = f"{repo}@{revision}"
    api = HfApi(endpoint=endpoint, token=token or False)  # never a token looked up on its own
    with talking_to(api.endpoint, f"listing the files of source {label}"):
        try:
            info = api.model_info(repo, revision=revision, files_metadata=True)
        except RevisionNotFoundError as exc:
            raise SourceError(f"source {repo} has no revision '{revision}'") from exc
        except RepositoryNotFoundError as exc:
            raise SourceError(f"source repo {repo} not found (or private without a token) at {api.endpoint}"
                              ) from exc
    tree = {s.rfilename: SourceFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id)
            for s in info.siblings or []}
    return str(info.sha), tree


def plan_source(repo: str, revision: str, components: Sequence[Component], endpoint: str | None = None,
                token: str | bool | None = None, weights: str = "auto", family: str = DEFAULT_FAMILY,
                folders: Sequence[str] | None = None) -> SourcePlan:
    """Resolve the revision and choose the files (one API call; nothing is downloaded). One-line errors for a
    missing repo, revision, component or weight file. `folders`: an extra source, of which only one component is
    fetched, from the first of these repo folders ("" for the root) that it has."""
    label = f"{repo}@{revision}"
    commit, tree = repo_tree(repo, revision, endpoint, token)
    folder = None
    if folders is None:
        files, warnings = select_source_files(tree, components, weights, label, family)
    else:
        folder = component_folder(tree, folders, label)
        files, warnings = select_component_files(tree, folder, weights, label)
    return SourcePlan(repo, revision, commit, tuple(files), tuple(warnings), folder)


def fetch_source(repo: str, revision: str, components: list[Component] | tuple[Component, ...], cache_dir: Path,
                 endpoint: str | None = None, token: str | bool | None = None,
                 weights: str = "auto", family: str = DEFAULT_FAMILY,
                 extra: tuple[tuple[str, ...], str] | None = None) -> FetchedSource:
    """Download the files a build of `components` loads (see the module doc and plan_source). `extra`: an extra
    source, (its candidate repo folders, the folder the family reads the component from); only that component
    is fetched, and it is laid out under the family's folder."""
    chosen = plan_source(repo, revision, components, endpoint, token, weights, family,
                         folders=None if extra is None else extra[0])
    moves = ("", "") if extra is None else (chosen.folder or "", extra[1])
    where = "" if extra is None else f"--{moves[0] or 'root'}-as-{moves[1]}"
    return download_planned(chosen, cache_dir, endpoint, token, where, moves)


def download_planned(chosen: SourcePlan, cache_dir: Path, endpoint: str | None, token: str | bool | None,
                     suffix: str = "", moves: tuple[str, str] = ("", "")) -> FetchedSource:
    """Download exactly `chosen.files` at its commit, check each against the Hub's listing and link them into a
    folder of their own (named by the commit, the file list and `suffix`)."""
    from huggingface_hub import snapshot_download

    repo = chosen.repo
    with talking_to(endpoint, f"downloading source {repo}@{chosen.commit[:12]}"):
        snapshot = snapshot_download(repo, revision=chosen.commit, allow_patterns=[f.path for f in chosen.files],
                                     cache_dir=str(cache_dir), endpoint=endpoint, token=token or False)
    folder = Path(cache_dir) / "sources" / \
        f"{repo.replace('/', '--')}--{chosen.commit[:12]}--{chosen.digest[:12]}{suffix}"
    verified = verify_source_files(Path(snapshot), chosen.files, folder.with_name(folder.name + ".verified.json"),
                                   f"{repo}@{chosen.commit[:12]}")
    _link_tree(Path(snapshot), chosen.files, folder, moves)
    check_weight_files(folder)
    return FetchedSource(repo=repo, revision=chosen.revision, commit=chosen.commit, path=folder, files=verified,
                         warnings=chosen.warnings)


def verify_source_files(snapshot: Path, files: Sequence[SourceFile], record: Path, label: str
                        ) -> tuple[SourceFile, ...]:
    """Check every downloaded file against what the Hub lists for it (size, and the LFS sha256 or the git blob id)
    before anything loads it; returns the files with the sha256 of the bytes that will be used. Files unchanged
    (inode, size, mtime) since an earlier check are not read again (`record`). A mismatch is a one-line error,
    and the bad copy is removed from the download cache so that a rerun downloads it again."""
    import hashlib

    try:
        known = json.loads(record.read_text()) if record.exists() else {}
    except (OSError, ValueError):
        known = {}
    checked: dict[str, Any] = {}
    out = []
    for item in files:
        path = (snapshot / item.path).resolve()
        info = path.stat()
        stamp = [info.st_ino, info.st_size, info.st_mtime_ns]
        previous = known.get(item.path)
        if isinstance(previous, dict) and previous.get("stamp") == stamp and previous.get("listed") == \
                [item.sha256, item.blob_id]:
            sha256 = str(previous["sha256"])
        else:
            if info.st_size != item.size:
                path.unlink(missing_ok=True)
                raise SourceError(f"source {label}: {item.path} is {info.st_size} bytes, the Hub lists {item.size}")
            sha, blob = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % info.st_size)
            with open(path, "rb") as handle:
                while block := handle.read(8 * 1024 * 1024):
                    sha.update(block)
                    if item.sha256 is None:
                        blob.update(block)
            sha256 = sha.hexdigest()
            wrong = (item.sha256 is not None and sha256 != item.sha256) or \
                (item.sha256 is None and item.blob_id is not None and blob.hexdigest() != item.blob_id)
            if wrong:
                path.unlink(missing_ok=True)
                listed = item.sha256 or item.blob_id
                raise SourceError(f"source {label}: {item.path} does not match the checksum the Hub lists ({listed}); "
                                  "the bad copy was removed from the download cache")
        checked[item.path] = {"stamp": stamp, "sha256": sha256, "listed": [item.sha256, item.blob_id]}
        out.append(SourceFile(item.path, item.size, sha256, item.blob_id, verified=True))
    if checked != known:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(checked, sort_keys=True) + "\n")
    return tuple(out)


def check_weight_files(folder: Path) -> None:
    """Every weight copy in a fetched folder passes the safetensors library's header checks, and every shard index
    names only shard files of its own copy inside its folder."""
    from publisher.convert.weight_files import check_safetensors, index_shards

    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if path.name.endswith(".safetensors"):
            check_safetensors(path)
        elif ".index" in path.name and path.name.endswith(".json"):
            index_shards(path.parent, path.name)


def compose_sources(folders: Sequence[Path], cache_dir: Path) -> Path:
    """One folder holding the files of several fetched sources (hard links; a later folder's files over an earlier
    one's): what a component read from an extra source is loaded from, next to the manifest's source's configs."""
    import hashlib

    digest = hashlib.sha256("\0".join(str(Path(f).resolve()) for f in folders).encode()).hexdigest()[:16]
    target = Path(cache_dir) / "sources" / f"composite--{digest}"
    if target.exists():  # made by an earlier step: its name is its content
        return target
    _linked_folder(target, [(item.resolve(), item.relative_to(folder).as_posix()) for folder in folders
                            for item in sorted(p for p in Path(folder).rglob("*") if p.is_file())])
    return target


def _file_list_digest(files: Sequence[SourceFile]) -> str:
    import hashlib

    text = json.dumps([[f.path, f.size, f.sha256 or f.blob_id] for f in files], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
