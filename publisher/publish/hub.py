"""Publish built repos to a Hub: diff against the remote tree, one commit per variant, the card with the last.

Only files whose content differs are sent; files gone from a variant are deleted in the same commit. Every commit
names its parent, so two publishers racing on one repo cannot interleave: the second is refused and can rerun.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from publisher.build_info import BUILD_INFO, read_build_info
from publisher.errors import PublisherError, transport_errors
from publisher.plan import Variant
from publisher.util.hashing import git_blob_id, git_blob_id_of_file, sha256_file

CARD = "README.md"


class PublishError(PublisherError):
    """Publishing stopped; the message says why and what to do."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class RemoteFile:
    size: int
    sha256: str | None  # LFS files
    git_oid: str | None


@dataclass
class FileChange:
    path: str
    local: Path | None  # None: delete
    size: int
    sha256: str | None = None  # what build-info recorded for it (checked again as the client hashes it to send)


@dataclass
class VariantDiff:
    variant_id: str
    folder: str
    added: list[FileChange] = field(default_factory=list)
    changed: list[FileChange] = field(default_factory=list)
    removed: list[FileChange] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    @property
    def upload_bytes(self) -> int:
        return sum(c.size for c in self.added + self.changed)


@dataclass
class RepoOutcome:
    repo_id: str
    diffs: list[VariantDiff]
    card_changed: bool
    commits: list[str] = field(default_factory=list)
    pr_url: str | None = None


# Files an OS or a file manager leaves in folders: skipped with a warning, never published.
OS_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "Icon\r", ".directory"})


def _is_litter(name: str) -> bool:
    return name in OS_LITTER or name.startswith("._")


def local_variant_files(repo_dir: Path, variant: Variant, say: Callable[[str], None] = lambda _: None
                        ) -> dict[str, Path]:
    """Repo path -> local file for one variant: exactly the files its build-info lists (and build-info itself),
    each a regular file inside the build (a symbolic link is never followed out of it). Any other file in the
    variant folder is refused, OS litter (`.DS_Store`, `._*`, ...) skipped with a warning."""
    folder = repo_dir / variant.folder
    info_path = folder / BUILD_INFO
    if not info_path.exists() and not info_path.is_symlink():
        raise PublishError(f"{variant.id} is not built in {repo_dir} (run `publisher build` first)")
    _regular_file(info_path, folder)
    info = read_build_info(info_path)
    prefix = variant.folder
    files = {f"{prefix}/{BUILD_INFO}": info_path}
    for name in info.files:
        if name.startswith("../"):
            if name != f"../{variant.zip_name}":
                raise PublishError(f"{info_path}: lists {name}, which is not this variant's zip")
            path, repo_path = repo_dir / variant.zip_name, variant.zip_name
            if not path.exists() and not path.is_symlink():
                raise PublishError(f"{variant.id}: {variant.zip_name} is listed in build-info.json but missing")
        else:
            parts = PurePosixPath(name).parts
            if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
                raise PublishError(f"{info_path}: lists '{name}', which is not a path inside the variant folder")
            path, repo_path = folder.joinpath(*parts), f"{prefix}/{'/'.join(parts)}"
            if not path.exists() and not path.is_symlink():
                raise PublishError(f"{variant.id}: {name} is listed in build-info.json but missing (rebuild it)")
        _regular_file(path, repo_dir)
        files[repo_path] = path
    listed = {p for p in files.values()}
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in sorted(names + [d for d in dirs if (Path(root) / d).is_symlink()]):
            path = Path(root) / name
            if path in listed:
                continue
            shown = path.relative_to(repo_dir).as_posix()
            if _is_litter(name):
                say(f"warning: {shown} is not in build-info.json: left out (OS litter)")
                continue
            raise PublishError(f"{variant.id}: {shown} is in the variant folder but not in build-info.json: "
                               "only built files are published (remove it, or rebuild)")
    return files


def _regular_file(path: Path, inside: Path) -> None:
    """`path` is a regular file (not a link) and every folder above it up to `inside` is a real folder."""
    for part in [path, *path.relative_to(inside).parents]:
        if part == Path("."):
            continue
        at = part if part.is_absolute() else inside / part
        if at.is_symlink():
            raise PublishError(f"{at}: a symbolic link in the build; a build writes regular files only, and "
                               "publishing never follows a link out of it")
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise PublishError(f"{path}: not a regular file")


def _same(local: Path, remote: RemoteFile, sha256: str | None) -> bool:
    if local.stat().st_size != remote.size:
        return False
    if remote.sha256 is not None:
        return (sha256 or sha256_file(local)) == remote.sha256
    return remote.git_oid == git_blob_id_of_file(local)


def diff_variant(variant: Variant, local: dict[str, Path], remote: dict[str, RemoteFile]) -> VariantDiff:
    folder = variant.folder
    info = read_build_info(local[f"{folder}/{BUILD_INFO}"])
    known = {f"{folder}/{name}" if not name.startswith("../") else name[3:]: entry.sha256
             for name, entry in info.files.items()}
    diff = VariantDiff(variant.id, folder)
    for path, file in local.items():
        size = file.stat().st_size
        if path not in remote:
            diff.added.append(FileChange(path, file, size, known.get(path)))
        elif not _same(file, remote[path], known.get(path)):
            diff.changed.append(FileChange(path, file, size, known.get(path)))
    for path, entry in remote.items():
        owned = path.startswith(folder + "/") or path == variant.zip_name
        if owned and path not in local:
            diff.removed.append(FileChange(path, None, entry.size))
    return diff


def remote_tree(api: Any, repo_id: str, revision: str | None) -> dict[str, RemoteFile]:
    from huggingface_hub.hf_api import RepoFile

    tree: dict[str, RemoteFile] = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=revision):
        if isinstance(entry, RepoFile):
            tree[entry.path] = RemoteFile(size=entry.size, sha256=entry.lfs.sha256 if entry.lfs else None,
                                          git_oid=entry.blob_id)
    return tree


def _operations(diff: VariantDiff) -> list[Any]:
    """The commit's operations. The client hashes each file it is given (its upload_info): that sha256 must be the
    one build-info recorded, or the file changed since it was built and nothing is sent."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = []
    for change in diff.added + diff.changed:
        op = CommitOperationAdd(path_in_repo=change.path, path_or_fileobj=str(change.local))
        sent = op.upload_info.sha256.hex()
        if change.sha256 is not None and sent != change.sha256:
            raise PublishError(f"{change.path}: its content changed since it was built (sha256 {sent[:16]}..., "
                               f"build-info records {change.sha256[:16]}...): rebuild before publishing")
        ops.append(op)
    ops += [CommitOperationDelete(path_in_repo=c.path) for c in diff.removed]
    return ops


TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _http_status(exc: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for item in _chain(exc):
        if isinstance(item, HfHubHTTPError) and item.response is not None:
            return int(item.response.status_code)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (a PublishError wraps the client's error)."""
    seen: list[BaseException] = []
    item: BaseException | None = exc
    while item is not None and item not in seen:
        seen.append(item)
        item = item.__cause__ or item.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """A failure worth another try: HTTP 408/429/5xx, or the connection broke or timed out. Everything else (a
    refusal, a missing local file, a permission error) fails at once with its own message."""
    import http.client

    if isinstance(exc, PublishError):
        return exc.transient
    status = _http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    return isinstance(exc, (*transport_errors(), ConnectionError, TimeoutError, http.client.IncompleteRead))


def retry_after(exc: BaseException, cap_s: float = 300.0) -> float | None:
    """The server's Retry-After (seconds, or an HTTP date) on a 429/503, capped; None when it sent none."""
    import email.utils
    import time

    from huggingface_hub.errors import HfHubHTTPError

    for item in _chain(exc):
        if isinstance(item, HfHubHTTPError) and item.response is not None:
            value = item.response.headers.get("Retry-After")
            if not value:
                return None
            try:
                seconds = float(value)
            except ValueError:
                parsed = email.utils.parsedate_to_datetime(value) if value else None
                if parsed is None:
                    return None
                seconds = parsed.timestamp() - time.time()
            return max(0.0, min(seconds, cap_s))
    return None


def publish_repo(api: Any, repo_id: str, repo_dir: Path, variants: Sequence[Variant], endpoint: str,
                 dry_run: bool = False, create_pr: bool = False, say: Callable[[str], None] = lambda _: None,
                 attempts: int = 4, backoff_s: float = 1.0, token_name: str = "HF_TOKEN",
                 notes: dict[str, str] | None = None) -> RepoOutcome:
    """Publish the given variants of one repo (one commit each; the card rides with the last commit).

    A transient failure (5xx, 429, a dropped connection) is retried with backoff; each attempt diffs against the
    remote tree again, so what already landed is not sent twice and a commit that landed before its answer was
    lost is recognised. A refusal (412: someone else committed; 401/403) stops at once with one clear line."""
    import time

    last: BaseException | None = None
    commits: list[str] = []
    pr_url: str | None = None
    for attempt in range(1, attempts + 1):
        try:
            # a retry after the first commit opened a PR continues on that PR instead of opening another
            pr_revision = _pr_revision(pr_url) if pr_url else None
            outcome = _publish_once(api, repo_id, repo_dir, variants, endpoint, dry_run, create_pr, say, pr_revision,
                                    token_name, notes or {})
            outcome.commits = commits + outcome.commits
            outcome.pr_url = outcome.pr_url or pr_url
            return outcome
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                if is_transient(exc):
                    raise PublishError(f"{repo_id}: gave up after {attempts} attempts: {_first_line(exc)}; "
                                       "what landed is complete per variant, rerun to finish") from exc
                raise
            partial = getattr(exc, "outcome", None)
            if partial is not None:
                commits += partial.commits
                pr_url = pr_url or partial.pr_url
            last = exc
            delay = backoff_s * 2 ** (attempt - 1)
            delay = max(delay, retry_after(exc) or 0.0)  # the Hub says when to come back
            say(f"{repo_id}: attempt {attempt} failed ({_first_line(exc)}); retrying in {delay:.0f} s")
            time.sleep(delay)
    raise PublishError(f"{repo_id}: publishing failed: {_first_line(last)}")  # pragma: no cover


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines() if exc is not None else []
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _publish_once(api: Any, repo_id: str, repo_dir: Path, variants: Sequence[Variant], endpoint: str,
                  dry_run: bool, create_pr: bool, say: Callable[[str], None], pr_revision: str | None = None,
                  token_name: str = "HF_TOKEN", notes: dict[str, str] | None = None) -> RepoOutcome:
    """One attempt: diff against main (or against the PR a previous attempt opened) and commit what differs;
    `notes`: a folder's addition to its commit message."""
    from huggingface_hub.errors import RepositoryNotFoundError

    from publisher.publish.card import card_text

    try:
        info = api.repo_info(repo_id, revision=pr_revision)
        head: str | None = info.sha
        remote = remote_tree(api, repo_id, head)
    except RepositoryNotFoundError:
        head, remote = None, {}
    locals_ = {v.id: local_variant_files(repo_dir, v, say) for v in variants}
    diffs = [diff_variant(v, locals_[v.id], remote) for v in variants]
    infos = []
    for folder in sorted(p for p in repo_dir.iterdir() if (p / BUILD_INFO).exists()):
        infos.append(read_build_info(folder / BUILD_INFO).to_json())
    card = card_text(repo_id, infos, endpoint)
    card_bytes = card.encode()
    remote_card = remote.get(CARD)
    card_changed = remote_card is None or remote_card.git_oid != git_blob_id(card_bytes)
    outcome = RepoOutcome(repo_id, diffs, card_changed)
    if dry_run:
        return outcome
    pending = [d for d in diffs if not d.empty]
    operations = [_operations(diff) for diff in pending]  # every file checked before anything is written
    if head is None:
        api.create_repo(repo_id, exist_ok=True)
        head = api.repo_info(repo_id).sha
    revision = pr_revision
    for index, (diff, ops) in enumerate(zip(pending, operations, strict=True)):
        last = index == len(pending) - 1
        if last and card_changed:
            from huggingface_hub import CommitOperationAdd

            ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card_bytes))
        say(f"{repo_id}: committing {diff.folder} ({len(diff.added)} added, {len(diff.changed)} changed, "
            f"{len(diff.removed)} removed)")
        try:
            head = _commit(api, repo_id, ops, f"Publish {diff.folder}", head, create_pr, revision, outcome, token_name,
                           (notes or {}).get(diff.folder))
        except Exception as exc:
            exc.outcome = outcome  # type: ignore[attr-defined]  # what landed, read by the retry
            raise
        revision = outcome.pr_url and _pr_revision(outcome.pr_url)
    if not pending and card_changed:
        from huggingface_hub import CommitOperationAdd

        say(f"{repo_id}: updating the model card")
        _commit(api, repo_id, [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card_bytes)],
                "Update model card", head, create_pr, revision, outcome, token_name)
    return outcome


def _pr_revision(pr_url: str) -> str:
    return f"refs/pr/{pr_url.rstrip('/').rsplit('/', 1)[1]}"


def _commit(api: Any, repo_id: str, ops: list[Any], message: str, parent: str | None, create_pr: bool,
            pr_revision: str | None, outcome: RepoOutcome, token_name: str = "HF_TOKEN",
            description: str | None = None) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if pr_revision:  # later variants go on the PR the first one opened
            info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=pr_revision,
                                     commit_description=description)
        else:
            info = api.create_commit(repo_id, operations=ops, commit_message=message, parent_commit=parent,
                                     create_pr=create_pr, commit_description=description)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 412:
            raise PublishError(f"{repo_id} changed while publishing (another publisher committed first); "
                               "nothing of this variant was written: rerun to publish on top of it") from exc
        if status in (401, 403):
            raise PublishError(f"{repo_id}: the Hub refused the write ({status}): check {token_name} (the token this "
                               "command sent) and its permissions") from exc
        # a 5xx/429 is retried: the next attempt diffs again, so a commit that did land is not sent twice
        raise PublishError(f"{repo_id}: commit failed ({status}): {str(exc).splitlines()[0]}",
                           transient=status in TRANSIENT_STATUS) from exc
    outcome.commits.append(info.oid)
    if info.pr_url:
        outcome.pr_url = info.pr_url
    return str(info.oid)
