"""`publisher fetch`: download one published variant, verify every byte against the Hub's metadata, unzip safely.

For app developers and CI: a folder variant (`original/packages`, `original/compiled`, ...) or a compiled zip.
Partial downloads resume (the client's Range requests); every file's sha256 (LFS) or git blob id (regular files)
must equal what the Hub lists, or the command fails and removes the file; a zip is extracted only if none of its
entries could land outside the target folder.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from publisher.errors import PublisherError
from publisher.layout import replace_folder
from publisher.util.hashing import git_blob_id_of_file, sha256_file


class FetchError(PublisherError):
    """A download did not match the Hub's metadata, or an archive is unsafe."""


@dataclass
class FetchResult:
    files: list[Path]
    bytes: int
    commit: str
    extracted: Path | None = None


def check_file(path: Path, entry: Any) -> None:
    size = path.stat().st_size
    if size != entry.size:
        raise FetchError(f"{entry.path}: {size} bytes on disk, the Hub lists {entry.size}")
    if entry.lfs is not None:
        actual, expected = sha256_file(path), entry.lfs.sha256
    else:
        actual, expected = git_blob_id_of_file(path), entry.blob_id
    if actual != expected:
        raise FetchError(f"{entry.path}: checksum {actual} does not match the Hub's {expected}")


DEFAULT_MAX_UNCOMPRESSED = 64 * 2**30  # an SD/SDXL Resources zip holds 1-7 GB
DEFAULT_MAX_ENTRIES = 20_000
_STAGING = ".publisher-fetch"


def safe_extract(archive: Path, target: Path, top_folder: str | None = None,
                 max_bytes: int = DEFAULT_MAX_UNCOMPRESSED, max_entries: int = DEFAULT_MAX_ENTRIES) -> list[Path]:
    """Extract a zip into `target` (which must not exist yet: the caller moves it into place), refusing absolute
    paths, '..' segments, drive letters, links, entries outside `top_folder` (when given), a file and a folder of
    the same name, and archives whose entries or uncompressed bytes exceed the caps. Nothing is written unless
    every entry passes."""
    target = Path(target)
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        if len(infos) > max_entries:
            raise FetchError(f"{archive.name}: {len(infos)} entries, more than the {max_entries} allowed "
                             "(--max-entries)")
        total = sum(info.file_size for info in infos)
        if total > max_bytes:
            raise FetchError(f"{archive.name}: {total} bytes uncompressed, more than the {max_bytes} allowed "
                             "(--max-bytes)")
        files: set[str] = set()
        folders: set[str] = set()
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            mode = info.external_attr >> 16
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts or "\0" in name or not parts:
                raise FetchError(f"{archive.name}: refusing entry '{info.filename}' (it would land outside "
                                 f"{target})")
            if stat.S_ISLNK(mode):
                raise FetchError(f"{archive.name}: refusing symbolic link '{info.filename}'")
            if top_folder is not None and parts[0] != top_folder:
                raise FetchError(f"{archive.name}: refusing entry '{info.filename}' (everything must lie in "
                                 f"{top_folder}/)")
            path = "/".join(parts)
            (folders if info.is_dir() else files).add(path)
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        clash = sorted(files & folders)
        if clash:
            raise FetchError(f"{archive.name}: '{clash[0]}' is both a file and a folder in the archive")
        written = []
        for info in infos:
            destination = target.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if info.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink, 8 * 1024 * 1024)
            written.append(destination)
        return written


def fetch_variant(repo_id: str, variant: str, to: Path, endpoint: str | None = None, token: str | None = None,
                  revision: str = "main", say: Callable[[str], None] = lambda _: None,
                  max_bytes: int = DEFAULT_MAX_UNCOMPRESSED, max_entries: int = DEFAULT_MAX_ENTRIES) -> FetchResult:
    """Download one variant into a staging folder inside `to`, verify every file, then move the variant into
    place in one step: all or nothing (a failure leaves `to` as it was; a rerun resumes the staged download).
    Only the paths the variant owns are replaced: `to/<folder>` for a folder variant, `to/<zip>` and
    `to/<zip stem>/` for a zip."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
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
    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    # one staging folder per (repo, commit, variant): a rerun after a failure or a kill resumes there
    key = hashlib.sha256(f"{repo_id}\0{commit}\0{variant}".encode()).hexdigest()[:16]
    staging = to / _STAGING / key
    (staging / "download").mkdir(parents=True, exist_ok=True)
    try:
        return _download_and_place(repo_id, variant, wanted, commit, to, staging, endpoint, token, say, max_bytes,
                                   max_entries)
    except FetchError:
        # a variant that does not verify is dropped whole (an interrupted download stays staged and resumes)
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(to / _STAGING)
        if created:
            _remove_if_empty(to)
        raise


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _download_and_place(repo_id: str, variant: str, wanted: list[Any], commit: str, to: Path, staging: Path,
                        endpoint: str | None, token: str | None, say: Callable[[str], None], max_bytes: int,
                        max_entries: int) -> FetchResult:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    downloads = staging / "download"
    files = []
    for entry in wanted:
        try:
            local = Path(hf_hub_download(repo_id, entry.path, revision=commit, local_dir=downloads,
                                         endpoint=endpoint, token=token or False))
        except EntryNotFoundError as exc:
            raise FetchError(f"{entry.path} vanished from {repo_id} while downloading") from exc
        check_file(local, entry)
        files.append(local)
        say(f"{entry.path}: {entry.size} bytes, checksum ok")
    result = FetchResult(files=[], bytes=sum(e.size for e in wanted), commit=commit)
    is_zip = len(wanted) == 1 and wanted[0].path.endswith(".zip")
    if is_zip:
        archive = files[0]
        top = PurePosixPath(wanted[0].path).stem
        extracted = staging / "extracted"
        shutil.rmtree(extracted, ignore_errors=True)
        written = safe_extract(archive, extracted, top_folder=top, max_bytes=max_bytes, max_entries=max_entries)
        replace_folder(extracted / top, to / top)
        replace_folder(archive, to / wanted[0].path)
        result.files = [to / wanted[0].path]
        result.extracted = to / top
        say(f"extracted {len(written)} files into {to / top}")
    else:
        replace_folder(downloads / variant, to / variant)
        result.files = [to / e.path for e in wanted]
    shutil.rmtree(staging, ignore_errors=True)
    _remove_if_empty(to / _STAGING)
    return result
