"""`publisher fetch`: download one published variant, verify every byte against the Hub's metadata, unzip safely.

For app developers and CI: a folder variant (`original/packages`, `original/compiled`, ...) or a compiled zip.
Partial downloads resume (the client's Range requests); every file's sha256 (LFS) or git blob id (regular files)
must equal what the Hub lists, or the command fails and removes the file; a zip is extracted only if none of its
entries could land outside the target folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from publisher.errors import PublisherError
from publisher.store import sha256_file


class FetchError(PublisherError):
    """A download did not match the Hub's metadata, or an archive is unsafe."""


@dataclass
class FetchResult:
    files: list[Path]
    bytes: int
    commit: str
    extracted: Path | None = None


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, entry: Any) -> None:
    size = path.stat().st_size
    if size != entry.size:
        raise FetchError(f"{entry.path}: {size} bytes on disk, the Hub lists {entry.size}")
    if entry.lfs is not None:
        actual, expected = sha256_file(path), entry.lfs.sha256
    else:
        actual, expected = _git_blob_sha1(path), entry.blob_id
    if actual != expected:
        raise FetchError(f"{entry.path}: checksum {actual} does not match the Hub's {expected}")


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract a zip into `target`, refusing absolute paths, '..' segments, drive letters and links."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            mode = info.external_attr >> 16
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts or "\0" in name:
                raise FetchError(f"{archive.name}: refusing entry '{info.filename}' (it would land outside "
                                 f"{target})")
            if stat.S_ISLNK(mode):
                raise FetchError(f"{archive.name}: refusing symbolic link '{info.filename}'")
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
        try:
            written = []
            for info in zipped.infolist():
                destination = (staging / info.filename).resolve()
                if not str(destination).startswith(str(staging.resolve()) + os.sep) and destination != staging:
                    raise FetchError(f"{archive.name}: refusing entry '{info.filename}'")
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(info) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink, 8 * 1024 * 1024)
                written.append(target / destination.relative_to(staging.resolve()))
            target.mkdir(parents=True, exist_ok=True)
            for child in staging.iterdir():
                final = target / child.name
                if final.exists():
                    shutil.rmtree(final) if final.is_dir() else final.unlink()
                os.replace(child, final)
            return written
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def fetch_variant(repo_id: str, variant: str, to: Path, endpoint: str | None = None, token: str | None = None,
                  revision: str = "main", say: Callable[[str], None] = lambda _: None) -> FetchResult:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        commit = str(api.repo_info(repo_id, revision=revision).sha)
        entries = [e for e in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                   if isinstance(e, RepoFile)]
    except RepositoryNotFoundError as exc:
        raise FetchError(f"{repo_id}: repository not found (or private without a token)") from exc
    except RevisionNotFoundError as exc:
        raise FetchError(f"{repo_id}: no revision '{revision}'") from exc
    variant = variant.strip("/")
    wanted = [e for e in entries if e.path == variant or e.path.startswith(variant + "/")]
    if not wanted:
        raise FetchError(f"{repo_id}@{commit[:12]} has no '{variant}' (folders like original/packages, or a "
                         "<repo>_<attention>_compiled.zip)")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    files = []
    for entry in wanted:
        try:
            local = Path(hf_hub_download(repo_id, entry.path, revision=commit, local_dir=to, endpoint=endpoint,
                                         token=token or False))
        except EntryNotFoundError as exc:
            raise FetchError(f"{entry.path} vanished from {repo_id} while downloading") from exc
        try:
            check_file(local, entry)
        except FetchError:
            local.unlink(missing_ok=True)
            raise
        files.append(local)
        say(f"{entry.path}: {entry.size} bytes, checksum ok")
    result = FetchResult(files=files, bytes=sum(e.size for e in wanted), commit=commit)
    if len(wanted) == 1 and wanted[0].path.endswith(".zip"):
        extracted = safe_extract(files[0], to)
        result.extracted = to
        say(f"extracted {len(extracted)} files into {to}")
    return result
