"""`publisher fetch`: download one published variant, verify every byte against the Hub's metadata, unzip safely.

For app developers and CI: a folder variant (`original/packages`, `original/compiled`, ...) or a compiled zip.
Bounded before anything is spent: the listed size of the whole variant against `--max-bytes`, each file cut off at
its listed size and hashed as it streams (sha256 for LFS files, the git blob id for regular ones), a stalled
server given up on, a zip's entries checked (paths, duplicates, names that collide on a case-insensitive disk, one
top folder, size and compression ratio) before one is written. The variant is staged inside `--to` (one fetch of a
variant at a time: a second one is refused) and moved into place in one step: all or nothing. An interrupted
download resumes; a fault of the server or the archive removes what was staged, and `--to` if this fetch made it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from publisher.errors import PublisherError
from publisher.layout import replace_folder
from publisher.util.net import cause_of, host_of, talking_to

DEFAULT_MAX_UNCOMPRESSED = 64 * 2**30  # an SD/SDXL variant or its Resources zip holds 1-7 GB
DEFAULT_MAX_ENTRIES = 20_000
MAX_COMPRESSION_RATIO = 200  # Core ML weights compress ~1.1-3x; a zip bomb by thousands
RATIO_FLOOR_BYTES = 1 << 20  # small entries (JSON, empty files) may compress as they like
STALL_SECONDS = 60.0  # no progress of STALL_MIN_BYTES in this long: the server is given up on
STALL_MIN_BYTES = 64 * 1024
_STAGING = ".publisher-fetch"
_CHUNK = 1 << 20


class FetchError(PublisherError):
    """A download did not match the Hub's metadata, or an archive is unsafe."""


class _Interrupted(FetchError):
    """The transfer broke off (network, stall): what was staged is kept, and a rerun resumes it."""


@dataclass
class FetchResult:
    files: list[Path]
    bytes: int
    commit: str
    extracted: Path | None = None


def _zip_problem(archive: Path, infos: list[zipfile.ZipInfo], top_folder: str | None, max_bytes: int,
                 max_entries: int, target: Path) -> str | None:
    """Why an archive's listing must not be extracted, or None."""
    if len(infos) > max_entries:
        return f"{len(infos)} entries, more than the {max_entries} allowed (--max-entries)"
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        return f"{total} bytes uncompressed, more than the {max_bytes} allowed (--max-bytes)"
    files: set[str] = set()
    folders: set[str] = set()
    folded: dict[str, str] = {}  # case- and normalisation-folded path -> the entry (one path on macOS's disks)
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        mode = info.external_attr >> 16
        if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts or "\0" in name or not parts:
            return f"refusing entry '{info.filename}' (it would land outside {target})"
        if stat.S_ISLNK(mode):
            return f"refusing symbolic link '{info.filename}'"
        if top_folder is not None and (parts[0] != top_folder or (len(parts) == 1 and not info.is_dir())):
            return f"refusing entry '{info.filename}' (everything must lie in {top_folder}/)"
        if info.flag_bits & 0x1:
            return f"entry '{info.filename}' is encrypted"
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            return (f"entry '{info.filename}' expands {info.file_size / max(info.compress_size, 1):.0f}:1 (more than "
                    f"{MAX_COMPRESSION_RATIO}:1: a zip bomb, not a model)")
        path = "/".join(parts)
        key = unicodedata.normalize("NFD", path).casefold()
        if key in folded:
            same = folded[key] == path
            return (f"entry '{path}' appears twice" if same else
                    f"entries '{folded[key]}' and '{path}' are one file on a case-insensitive disk (macOS)")
        folded[key] = path
        (folders if info.is_dir() else files).add(path)
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(files & folders)
    if clash:
        return f"'{clash[0]}' is both a file and a folder in the archive"
    return None


def safe_extract(archive: Path, target: Path, top_folder: str | None = None,
                 max_bytes: int = DEFAULT_MAX_UNCOMPRESSED, max_entries: int = DEFAULT_MAX_ENTRIES) -> list[Path]:
    """Extract a zip into `target` (which must not exist yet: the caller moves it into place), refusing absolute
    paths, '..' segments, drive letters, links, entries outside `top_folder` (when given) or the top folder as a
    file, duplicated names and names that differ only in case, a file and a folder of the same name, entries that
    expand past a ratio, and archives whose entries or uncompressed bytes exceed the caps. Nothing is written unless
    every entry passes; a damaged archive is a one-line error."""
    target = Path(target)
    try:
        with zipfile.ZipFile(archive) as zipped:
            infos = zipped.infolist()
            problem = _zip_problem(archive, infos, top_folder, max_bytes, max_entries, target)
            if problem:
                raise FetchError(f"{archive.name}: {problem}")
            written = []
            for info in infos:
                destination = target.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                # zipfile stops at the listed size and checks the CRC: an entry cannot write more than it says
                with zipped.open(info) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink, 8 * 1024 * 1024)
                written.append(destination)
            return written
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise FetchError(f"{archive.name}: a damaged or unsupported zip ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _entry_path(path: str, repo_id: str) -> tuple[str, ...]:
    """The parts of a path the server lists, refused when it could land outside the target."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\\" in path or ".." in parts or "\0" in path or ":" in parts[0]:
        raise FetchError(f"{repo_id}: the server lists '{path}', a path that would land outside the target")
    return parts


def fetch_variant(repo_id: str, variant: str, to: Path, endpoint: str | None = None, token: str | None = None,
                  revision: str = "main", say: Callable[[str], None] = lambda _: None,
                  max_bytes: int = DEFAULT_MAX_UNCOMPRESSED, max_entries: int = DEFAULT_MAX_ENTRIES,
                  stall_s: float = STALL_SECONDS, progress: bool = False) -> FetchResult:
    """Download one variant into a staging folder inside `to`, verify every file, then move the variant into
    place in one step: all or nothing (a failure leaves `to` as it was; a rerun resumes the staged download).
    Only the paths the variant owns are replaced: `to/<folder>` for a folder variant, `to/<zip>` and
    `to/<zip stem>/` for a zip."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token or False)
    with talking_to(endpoint, f"listing the files of {repo_id}@{revision}"):
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
        raise FetchError(f"{repo_id}@{commit[:12]} has no '{variant}' (folders like original/packages or a "
                         "resolution pack's original_512x768/compiled, or a <repo>_<attention>[_WxH]_compiled.zip)")
    for entry in wanted:
        _entry_path(entry.path, repo_id)
        if not isinstance(entry.size, int) or entry.size < 0:
            raise FetchError(f"{repo_id}: the server lists {entry.path} with size {entry.size!r}")
    listed = sum(e.size for e in wanted)
    if listed > max_bytes:
        raise FetchError(f"{repo_id}@{commit[:12]} {variant}: {listed} bytes listed, more than the {max_bytes} "
                         "allowed (--max-bytes)")
    if len(wanted) > max_entries:
        raise FetchError(f"{repo_id}@{commit[:12]} {variant}: {len(wanted)} files, more than the {max_entries} "
                         "allowed (--max-entries)")
    to = Path(to)
    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(to, variant):  # another fetch of the variant running: refused before anything is touched
            # one staging folder per (repo, commit, variant): a rerun after a failure or a kill resumes there
            key = hashlib.sha256(f"{repo_id}\0{commit}\0{variant}".encode()).hexdigest()[:16]
            staging = to / _STAGING / key
            (staging / "download").mkdir(parents=True, exist_ok=True)
            try:
                return _download_and_place(repo_id, variant, wanted, commit, to, staging, endpoint, token, say,
                                           max_bytes, max_entries, stall_s, progress)
            except (_Interrupted, KeyboardInterrupt):
                raise  # a transfer broken off stays staged and resumes
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # a variant that does not verify is dropped whole
                raise
    finally:
        # only what this fetch left empty goes: a target it made is gone again after a fault, anything another
        # fetch has there stays
        _remove_if_empty(to / _STAGING)
        if created:
            _remove_if_empty(to)


@contextlib.contextmanager
def _exclusive(to: Path, variant: str) -> Iterator[None]:
    """One fetch of a variant into a folder at a time (a lock the system drops when the process dies). The lock
    file is removed by its holder; a process that locked a file already unlinked tries the new one."""
    (to / _STAGING).mkdir(parents=True, exist_ok=True)
    lock_path = to / _STAGING / f"{hashlib.sha256(variant.encode()).hexdigest()[:16]}.lock"
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise FetchError(f"another fetch of {variant} into {to} is running; wait for it (nothing was "
                             "changed)") from exc
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # its holder removed it as we opened it: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _download_and_place(repo_id: str, variant: str, wanted: list[Any], commit: str, to: Path, staging: Path,
                        endpoint: str | None, token: str | None, say: Callable[[str], None], max_bytes: int,
                        max_entries: int, stall_s: float, progress: bool) -> FetchResult:
    from tqdm import tqdm

    downloads = staging / "download"
    files = []
    with tqdm(total=sum(e.size for e in wanted), desc=f"fetch {variant}", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for entry in wanted:
            local = downloads.joinpath(*_entry_path(entry.path, repo_id))
            marker = staging / "verified" / hashlib.sha256(entry.path.encode()).hexdigest()
            _download(repo_id, entry, commit, local, marker, endpoint, token, stall_s, bar.update)
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
        if not (extracted / top).is_dir():
            raise FetchError(f"{archive.name}: holds nothing under {top}/")
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


def _download(repo_id: str, entry: Any, commit: str, local: Path, done: Path, endpoint: str | None,
              token: str | None, stall_s: float, advance: Callable[[int], object]) -> None:
    """Stream one file into `local`, hashed as it arrives: never more than its listed size, given up when fewer than
    STALL_MIN_BYTES arrive in `stall_s` seconds, resumed from a partial file (Range), checked at its end. `done`
    marks a file an earlier, interrupted run verified."""
    import httpx2
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    if done.exists() and local.exists() and local.stat().st_size == entry.size:
        advance(entry.size)
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    lfs = entry.lfs is not None
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % entry.size)
    have = local.stat().st_size if local.exists() else 0
    if have > entry.size:
        local.unlink()
        have = 0
    if have:
        with open(local, "rb") as handle:
            while block := handle.read(8 * _CHUNK):
                digest.update(block)
    url = hf_hub_url(repo_id, entry.path, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token or False)
    if have:
        headers["Range"] = f"bytes={have}-"
    with talking_to(endpoint, f"downloading {entry.path} of {repo_id}"):
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                      timeout=httpx2.Timeout(stall_s, connect=min(stall_s, 30.0))) as response:
                if have and response.status_code == 200:  # the server ignored the Range: start over
                    have, digest = 0, hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % entry.size)
                elif response.status_code not in (200, 206):
                    raise FetchError(f"{entry.path}: the server answered {response.status_code} to the download")
                written = have
                window_start, window_bytes = time.monotonic(), 0
                with open(local, "ab" if have else "wb") as sink:
                    for block in response.iter_bytes():  # as it arrives: a trickle is seen
                        written += len(block)
                        if written > entry.size:
                            raise FetchError(f"{entry.path}: the server sent more than the {entry.size} bytes it "
                                             "lists; stopped there")
                        digest.update(block)
                        sink.write(block)
                        advance(len(block))
                        window_bytes += len(block)
                        now = time.monotonic()
                        if now - window_start >= stall_s:
                            if window_bytes < STALL_MIN_BYTES:
                                raise _Interrupted(f"{entry.path}: the server sent {window_bytes} bytes in "
                                                   f"{now - window_start:.0f} s (stalled); rerun to resume")
                            window_start, window_bytes = now, 0
        except httpx2.TransportError as exc:
            raise _Interrupted(f"downloading {entry.path} of {repo_id} at {host_of(endpoint)}: {cause_of(exc)}; the "
                               f"partial download is kept in {local.parent}, rerun to resume") from exc
    if written != entry.size:
        raise FetchError(f"{entry.path}: {written} bytes arrived, the Hub lists {entry.size}")
    actual, expected = digest.hexdigest(), (entry.lfs.sha256 if lfs else entry.blob_id)
    if actual != expected:
        local.unlink(missing_ok=True)
        raise FetchError(f"{entry.path}: checksum {actual} does not match the Hub's {expected}")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
