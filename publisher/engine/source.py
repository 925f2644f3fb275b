"""Fetch a diffusers checkpoint from a Hub at a revision, recording the commit it resolved to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from publisher.convert.components import SUBFOLDERS
from publisher.errors import SourceError
from publisher.manifest import Component


@dataclass(frozen=True)
class FetchedSource:
    repo: str
    revision: str
    commit: str  # the revision resolved to a commit id
    path: Path

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision}"


def source_patterns(components: list[Component] | tuple[Component, ...]) -> list[str]:
    folders = sorted({SUBFOLDERS[c] for c in components})
    return ["model_index.json", "tokenizer/*", *(f"{folder}/*" for folder in folders)]


def fetch_source(repo: str, revision: str, components: list[Component] | tuple[Component, ...], cache_dir: Path,
                 endpoint: str | None = None, token: str | bool | None = None) -> FetchedSource:
    """snapshot_download the folders the components need; one-line errors for a missing repo, revision or
    component."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    label = f"{repo}@{revision}"
    api = HfApi(endpoint=endpoint, token=token or False)  # never a token looked up on its own
    try:
        info = api.repo_info(repo, revision=revision, files_metadata=False)
    except RevisionNotFoundError as exc:
        raise SourceError(f"source {repo} has no revision '{revision}'") from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(f"source repo {repo} not found (or private without a token) at {api.endpoint}") from exc
    commit = str(info.sha)
    files = {s.rfilename for s in info.siblings or []}
    for component in components:
        folder = SUBFOLDERS[component]
        if f"{folder}/config.json" not in files:
            raise SourceError(f"source {label} has no {component.value} ({folder}/config.json is missing); "
                              "drop it from the manifest's source.components")
    for name in ("tokenizer/vocab.json", "tokenizer/merges.txt"):
        if name not in files:
            raise SourceError(f"source {label} has no {name} (the apps need the CLIP tokenizer files)")
    path = snapshot_download(repo, revision=commit, allow_patterns=source_patterns(components),
                             cache_dir=str(cache_dir), endpoint=endpoint, token=token or False)
    return FetchedSource(repo=repo, revision=revision, commit=commit, path=Path(path))
