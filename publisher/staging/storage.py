"""The staging Hub's storage: content-addressed blobs on disk (blobs.py), repos/commits/refs/trees in SQLite.

A commit is one SQLite transaction: readers see the branch before it or after it, never half of it.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from publisher.staging.blobs import BlobFiles
from publisher.staging.errors import StoreError
from publisher.staging.patterns import lfs_patterns, pattern_matches
from publisher.util.hashing import git_blob_id

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS whatever their name
SEED_COMMIT_TITLE = "initial commit"

# The Hub seeds a new repo with a .gitattributes that sends common binary formats to LFS.
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS)

_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def repo_key(repo_id: str) -> str:
    """Repo ids compare case-insensitively in ASCII only: Unicode folding would let the Kelvin sign (U+212A) reach
    repo `k` (a Hub repo id is ASCII; a non-ASCII one matches no repo)."""
    return repo_id.translate(_ASCII_LOWER)


@dataclass(frozen=True)
class Repo:
    pk: int
    type: str
    id: str
    private: bool
    created: str
    gated: str = ""  # "", "auto" or "manual" (the Hub's `gated` setting; "" answers False)


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool
    last_commit: str

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)




def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_SEGMENT_RE.fullmatch(p) for p in parts) or ".." in repo_id:
        raise StoreError(400, f"Invalid repo id '{repo_id}': expected 'namespace/name'", "InvalidRepoId")


def check_path(path: str) -> str:
    """A file path inside a repo as the Hub accepts it: relative, no '.', '..' or empty segment, no control
    character, nothing under `.git/`. Segments are split at '/' only: a backslash is an ordinary character of a name
    on the Hub (`folder/..\\..\\file` is one file in `folder/`); a client writing files refuses what would land
    outside its folder (huggingface_hub does, and so does `publisher fetch`). A path that starts by leaving the repo
    in either spelling (`..\\file`, `../file`) is refused, as the Hub refuses it (huggingface_hub's tests)."""
    if not path or path.startswith("/") or len(path) > 1024 or re.search(r"[\x00-\x1f\x7f]", path):
        raise StoreError(422, f"Invalid path {path!r}", "InvalidPath")
    if re.split(r"[/\\]", path, maxsplit=1)[0] in (".", ".."):
        raise StoreError(422, f"Invalid path {path!r}: it starts outside the repo", "InvalidPath")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise StoreError(422, f"Invalid path {path!r}: no empty, '.' or '..' segments", "InvalidPath")
        if segment == ".git":
            raise StoreError(422, f"Invalid path {path!r}: nothing can be written under '.git/'", "InvalidPath")
    return path


def _check_tree(current: dict[str, Any], changes: dict[str, Any]) -> None:
    """The tree after a commit: no path may be both a file and a folder, and a commit must change something."""
    after = {p for p in current if changes.get(p, current[p]) is not None} | {p for p, e in changes.items() if e}
    folders = {"/".join(p.split("/")[:i]) for p in after for i in range(1, p.count("/") + 1)}
    clash = sorted(after & folders)
    if clash:
        raise StoreError(422, f"'{clash[0]}' would be both a file and a folder", "InvalidPath")
    def same(a: Any, b: Any) -> bool:
        return (a is None) == (b is None) and (a is None or (a.sha256, a.lfs) == (b.sha256, b.lfs))

    if all(same(current.get(path), entry) for path, entry in changes.items()):
        raise StoreError(400, "No files have been modified since last commit (empty commit)", "EmptyCommit")


class HubStore(BlobFiles):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        for folder in (self.blobs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        # one writer connection under the lock; reads go through a connection per thread and never wait for the
        # lock (WAL: a reader sees the last committed state while a commit of thousands of files is written)
        self._lock = threading.RLock()
        self._writer: int | None = None  # the thread inside a write transaction: its reads see its own writes
        self._readers = threading.local()
        self._db = sqlite3.connect(self.root / "hub.sqlite", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS repos(pk INTEGER PRIMARY KEY, type TEXT NOT NULL, id TEXT NOT NULL,
                key TEXT NOT NULL, private INTEGER NOT NULL, created TEXT NOT NULL, UNIQUE(type, key));
            CREATE TABLE IF NOT EXISTS commits(oid TEXT PRIMARY KEY, repo INTEGER NOT NULL, parent TEXT,
                seq INTEGER NOT NULL, title TEXT NOT NULL, message TEXT NOT NULL, date TEXT NOT NULL,
                author TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS files(commit_oid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
                sha256 TEXT NOT NULL, git_oid TEXT NOT NULL, lfs INTEGER NOT NULL, last_commit TEXT NOT NULL,
                PRIMARY KEY(commit_oid, path));
            CREATE TABLE IF NOT EXISTS refs(repo INTEGER NOT NULL, name TEXT NOT NULL, commit_oid TEXT NOT NULL,
                PRIMARY KEY(repo, name));
            CREATE TABLE IF NOT EXISTS discussions(repo INTEGER NOT NULL, num INTEGER NOT NULL, title TEXT NOT NULL,
                is_pr INTEGER NOT NULL, status TEXT NOT NULL, created TEXT NOT NULL, author TEXT NOT NULL,
                PRIMARY KEY(repo, num));
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS renamed(type TEXT NOT NULL, key TEXT NOT NULL, repo INTEGER NOT NULL,
                PRIMARY KEY(type, key));
        """)
        if "gated" not in {row["name"] for row in self._db.execute("PRAGMA table_info(repos)")}:  # older stores
            self._db.execute("ALTER TABLE repos ADD COLUMN gated TEXT NOT NULL DEFAULT ''")
        secret = self._db.execute("SELECT value FROM meta WHERE key='secret'").fetchone()
        if secret is None:
            self._db.execute("INSERT INTO meta VALUES('secret', ?)", (secrets.token_hex(32),))
            secret = self._db.execute("SELECT value FROM meta WHERE key='secret'").fetchone()
        self.secret = bytes.fromhex(secret["value"])
        self._seq = int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM commits").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        if self._writer == threading.get_ident():
            yield self._db
            return
        reader = getattr(self._readers, "db", None)
        if reader is None:
            reader = sqlite3.connect(self.root / "hub.sqlite", isolation_level=None)
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA query_only=1")
            self._readers.db = reader
        yield reader

    # -- repos -------------------------------------------------------------------------------------------

    def _repo_from_row(self, row: sqlite3.Row) -> Repo:
        return Repo(pk=row["pk"], type=row["type"], id=row["id"], private=bool(row["private"]), created=row["created"],
                    gated=row["gated"])

    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        """The repo of that id, or the one renamed from it (the Hub keeps an old name working after a move)."""
        with self._read() as db:
            row = db.execute("SELECT * FROM repos WHERE type=? AND key=?", (repo_type, repo_key(repo_id))).fetchone()
            if row is None:
                row = db.execute("SELECT repos.* FROM renamed JOIN repos ON repos.pk=renamed.repo "
                                 "WHERE renamed.type=? AND renamed.key=?", (repo_type, repo_key(repo_id))).fetchone()
        return self._repo_from_row(row) if row else None

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> tuple[Repo, bool]:
        check_repo_id(repo_id)
        with self._lock, self._transaction():
            row = self._db.execute("SELECT * FROM repos WHERE type=? AND key=?", (repo_type, repo_key(repo_id))).fetchone()
            if row:
                return self._repo_from_row(row), False
            created = now_iso()
            cursor = self._db.execute("INSERT INTO repos(type, id, key, private, created) VALUES(?,?,?,?,?)",
                                      (repo_type, repo_id, repo_key(repo_id), int(private), created))
            self._db.execute("DELETE FROM renamed WHERE type=? AND key=?", (repo_type, repo_key(repo_id)))
            repo = Repo(pk=int(cursor.lastrowid or 0), type=repo_type, id=repo_id, private=private, created=created)
            content = DEFAULT_GITATTRIBUTES.encode()
            sha256 = self.put_bytes(content)
            oid = self._new_commit(repo, None, SEED_COMMIT_TITLE, "", author)
            self._db.execute("INSERT INTO files VALUES(?,?,?,?,?,?,?)",
                             (oid, ".gitattributes", len(content), sha256, git_blob_id(content), 0, oid))
            self._db.execute("INSERT INTO refs VALUES(?,?,?)", (repo.pk, "main", oid))
            return repo, True

    def delete_repo(self, repo: Repo) -> None:
        with self._lock, self._transaction():
            oids = [r[0] for r in self._db.execute("SELECT oid FROM commits WHERE repo=?", (repo.pk,))]
            self._db.executemany("DELETE FROM files WHERE commit_oid=?", [(o,) for o in oids])
            for table, column in (("commits", "repo"), ("refs", "repo"), ("discussions", "repo"), ("renamed", "repo"),
                                  ("repos", "pk")):
                self._db.execute(f"DELETE FROM {table} WHERE {column}=?", (repo.pk,))

    def set_private(self, repo: Repo, private: bool) -> None:
        with self._lock:
            self._db.execute("UPDATE repos SET private=? WHERE pk=?", (int(private), repo.pk))

    def set_gated(self, repo: Repo, gated: str) -> None:
        with self._lock:
            self._db.execute("UPDATE repos SET gated=? WHERE pk=?", (gated, repo.pk))

    # -- refs and revisions ------------------------------------------------------------------------------

    def refs(self, repo: Repo) -> dict[str, str]:
        with self._read() as db:
            return {r["name"]: r["commit_oid"] for r in
                    db.execute("SELECT name, commit_oid FROM refs WHERE repo=? ORDER BY name", (repo.pk,))}

    def resolve(self, repo: Repo, revision: str) -> str:
        name = revision.removeprefix("refs/heads/")
        with self._read() as db:
            # a branch and a tag may share a name (refs/heads/x, refs/tags/x): the branch wins, as a commit's target
            row = db.execute("SELECT commit_oid FROM refs WHERE repo=? AND name IN (?, ?) ORDER BY name=? DESC",
                             (repo.pk, name, f"refs/tags/{name}", name)).fetchone()
            if row:
                return str(row[0])
            if re.fullmatch(r"[0-9a-f]{7,40}", revision):
                rows = db.execute("SELECT oid FROM commits WHERE repo=? AND oid LIKE ?",
                                  (repo.pk, revision + "%")).fetchall()
                if len(rows) == 1:
                    return str(rows[0][0])
        raise StoreError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_branch(self, repo: Repo, name: str, starting_point: str | None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", name) or ".." in name or name.startswith("refs/"):
            raise StoreError(400, f"Invalid branch name '{name}'")
        with self._lock, self._transaction():
            if name in self.refs(repo):  # the Hub's wording, which clients match
                raise StoreError(409, f"Reference refs/heads/{name} already exists")
            oid = self.resolve(repo, starting_point or "main")
            self._db.execute("INSERT INTO refs VALUES(?,?,?)", (repo.pk, name, oid))

    def delete_branch(self, repo: Repo, name: str) -> None:
        if name == "main":
            raise StoreError(403, "Cannot delete refs/heads/main")
        if name.startswith("refs/"):  # tags and pull requests' refs are not branches
            raise StoreError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        with self._lock:
            cursor = self._db.execute("DELETE FROM refs WHERE repo=? AND name=?", (repo.pk, name))
        if cursor.rowcount == 0:
            raise StoreError(404, f"Invalid rev id: {name}", "RevisionNotFound")

    def delete_tag(self, repo: Repo, tag: str) -> None:
        with self._lock:
            cursor = self._db.execute("DELETE FROM refs WHERE repo=? AND name=?", (repo.pk, f"refs/tags/{tag}"))
        if cursor.rowcount == 0:
            raise StoreError(404, f"Invalid rev id: {tag} is not a tag", "RevisionNotFound")

    # -- trees and history -------------------------------------------------------------------------------

    def files(self, commit: str, prefix: str = "") -> list[FileEntry]:
        with self._read() as db:
            if prefix:
                rows = db.execute("SELECT * FROM files WHERE commit_oid=? AND (path=? OR substr(path, 1, ?)=?) "
                                  "ORDER BY path", (commit, prefix, len(prefix) + 1, prefix + "/")).fetchall()
            else:
                rows = db.execute("SELECT * FROM files WHERE commit_oid=? ORDER BY path", (commit,)).fetchall()
        return [FileEntry(path=r["path"], size=r["size"], sha256=r["sha256"], git_oid=r["git_oid"], lfs=bool(r["lfs"]),
                          last_commit=r["last_commit"]) for r in rows]

    def file(self, commit: str, path: str) -> FileEntry | None:
        found = [f for f in self.files(commit, path) if f.path == path]
        return found[0] if found else None

    def commit_info(self, oid: str) -> dict[str, Any]:
        with self._read() as db:
            row = db.execute("SELECT * FROM commits WHERE oid=?", (oid,)).fetchone()
        return dict(row) if row else {}

    def history(self, commit: str) -> list[dict[str, Any]]:
        log = []
        oid: str | None = commit
        while oid:
            info = self.commit_info(oid)
            if not info:
                break
            log.append(info)
            oid = info["parent"]
        return log

    def list_repos(self, repo_type: str) -> list[Repo]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM repos WHERE type=? ORDER BY created, pk", (repo_type,)).fetchall()
        return [self._repo_from_row(row) for row in rows]

    def move_repo(self, repo: Repo, new_id: str) -> Repo:
        check_repo_id(new_id)
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM repos WHERE type=? AND key=?", (repo.type, repo_key(new_id))).fetchone():
                raise StoreError(409, f"A {repo.type} repository called {new_id} already exists")
            self._db.execute("UPDATE repos SET id=?, key=? WHERE pk=?", (new_id, repo_key(new_id), repo.pk))
            # the old name keeps answering for this repo until a repo of that name is created
            self._db.execute("DELETE FROM renamed WHERE type=? AND key=?", (repo.type, repo_key(new_id)))
            self._db.execute("INSERT OR REPLACE INTO renamed VALUES(?,?,?)", (repo.type, repo_key(repo.id), repo.pk))
        return Repo(pk=repo.pk, type=repo.type, id=new_id, private=repo.private, created=repo.created, gated=repo.gated)

    def super_squash(self, repo: Repo, branch: str, message: str, author: str) -> str:
        """The branch's tree as one commit without a parent (the Hub's super-squash); the old commits stay
        reachable from other refs only."""
        with self._lock, self._transaction():
            if branch not in self.refs(repo) or branch.startswith("refs/tags/"):  # a branch or a PR's ref
                raise StoreError(400 if branch in self.refs(repo) else 404,
                                 f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
            head = self.refs(repo)[branch]
            oid = self._new_commit(repo, None, message, "", author)
            self._db.execute("INSERT INTO files SELECT ?, path, size, sha256, git_oid, lfs, ? FROM files "
                             "WHERE commit_oid=?", (oid, oid, head))
            self._db.execute("UPDATE refs SET commit_oid=? WHERE repo=? AND name=?", (oid, repo.pk, branch))
            return oid

    def discussions(self, repo: Repo) -> list[dict[str, Any]]:
        with self._read() as db:
            return [dict(r) for r in db.execute("SELECT * FROM discussions WHERE repo=? ORDER BY num DESC", (repo.pk,))]

    # -- commits -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        self._writer = threading.get_ident()
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._writer = None

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, author: str) -> str:
        self._seq += 1
        date = now_iso()
        oid = hashlib.sha1(f"{repo.pk}\0{parent}\0{title}\0{message}\0{date}\0{self._seq}\0{secrets.token_hex(8)}"
                           .encode()).hexdigest()
        self._db.execute("INSERT INTO commits VALUES(?,?,?,?,?,?,?,?)",
                         (oid, repo.pk, parent, self._seq, title, message, date, author))
        return oid

    def commit(self, repo: Repo, revision: str, operations: Iterable[tuple[str, dict[str, Any]]], summary: str,
               description: str, parent_commit: str | None, create_pr: bool, author: str) -> tuple[str, int | None]:
        """Apply operations as one commit on `revision` (or on a new PR ref). Returns (commit oid, PR number)."""
        ops = list(operations)
        with self._lock, self._transaction():
            head = self.resolve(repo, revision)
            branch = revision.removeprefix("refs/heads/")
            branches = self.refs(repo)
            # a commit moves a branch or a pull request's ref, never a tag
            if branch not in branches or (branch.startswith("refs/") and not re.fullmatch(r"refs/pr/\d+", branch)):
                raise StoreError(400, f"Revision '{revision}' is not a branch: commits go to a branch", "RevisionNotFound")
            base = head
            if parent_commit:
                if create_pr:
                    base = self.resolve(repo, parent_commit)
                elif head != parent_commit:  # a full commit id, as the Hub compares it (no prefix matching)
                    raise StoreError(412, "The branch was updated since you opened this page. "
                                          "Please refresh and try again.")
            current = {f.path: f for f in self.files(base)}
            ordered = sorted(current)  # a folder's files are one range of it: found by bisection, not a scan
            changes: dict[str, FileEntry | None] = {}
            added: dict[str, None] = {}  # paths this commit adds that the base does not have

            def inside(folder: str) -> list[str]:
                """The files under `folder/` now (the base's, with this commit's changes so far)."""
                start = bisect.bisect_left(ordered, folder + "/")
                end = bisect.bisect_left(ordered, folder + "0")  # "0" follows "/" in code point order
                found = [p for p in ordered[start:end] if changes.get(p, current[p]) is not None]
                return found + [p for p in added if p.startswith(folder + "/") and changes.get(p) is not None]
            for kind, value in ops:
                path = str(value.get("path", ""))
                path = check_path(path.rstrip("/") if kind == "deletedFolder" else path)
                if kind == "file":
                    sha256, size, git_oid = value["_sha256"], value["_size"], value["_git_oid"]
                    changes[path] = FileEntry(path, size, sha256, git_oid, False, "")
                    if path not in current:
                        added[path] = None
                elif kind == "lfsFile":
                    sha256, size = str(value.get("oid", "")), value.get("size")
                    if size is None and re.fullmatch(r"[0-9a-f]{64}", sha256) and self.blob_path(sha256).exists():
                        size = self.blob_path(sha256).stat().st_size  # a copy of a stored object names no size
                    if value.get("algo", "sha256") != "sha256" or not isinstance(size, int) or isinstance(size, bool):
                        raise StoreError(400, f"lfsFile '{path}': algo must be sha256 and size an integer")
                    if not self.has_blob(sha256, size):
                        raise StoreError(422, f"lfsFile '{path}': LFS object {sha256} of {size} bytes was not uploaded",
                                         "LfsObjectNotFound")
                    changes[path] = FileEntry(path, size, sha256, git_blob_id(lfs_pointer(sha256, size)), True, "")
                    if path not in current:
                        added[path] = None
                elif kind == "deletedFile":
                    if changes.get(path, current.get(path)) is not None:
                        changes[path] = None
                        continue
                    under = inside(path)
                    if not under:
                        raise StoreError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for existing in under:  # a folder named without its trailing slash: the Hub deletes it
                        changes[existing] = None
                elif kind == "deletedFolder":
                    under = inside(path)
                    if not under:
                        raise StoreError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for existing in under:
                        changes[existing] = None
                else:
                    raise StoreError(400, f"Unknown operation '{kind}'")
            _check_tree(current, changes)
            oid = self._new_commit(repo, base, summary, description, author)
            self._db.execute("INSERT INTO files SELECT ?, path, size, sha256, git_oid, lfs, last_commit FROM files "
                             "WHERE commit_oid=?", (oid, base))
            for path, entry in changes.items():
                self._db.execute("DELETE FROM files WHERE commit_oid=? AND path=?", (oid, path))
                if entry is None:
                    continue
                previous = current.get(path)
                unchanged = previous is not None and previous.sha256 == entry.sha256 and previous.lfs == entry.lfs
                last = previous.last_commit if unchanged and previous else oid
                self._db.execute("INSERT INTO files VALUES(?,?,?,?,?,?,?)",
                                 (oid, path, entry.size, entry.sha256, entry.git_oid, int(entry.lfs), last))
            number: int | None = None
            if create_pr:
                number = 1 + int(self._db.execute("SELECT COALESCE(MAX(num), 0) FROM discussions WHERE repo=?",
                                                  (repo.pk,)).fetchone()[0])
                self._db.execute("INSERT INTO discussions VALUES(?,?,?,?,?,?,?)",
                                 (repo.pk, number, summary, 1, "open", now_iso(), author))
                self._db.execute("INSERT INTO refs VALUES(?,?,?)", (repo.pk, f"refs/pr/{number}", oid))
            else:
                self._db.execute("UPDATE refs SET commit_oid=? WHERE repo=? AND name=?", (oid, repo.pk, branch))
            return oid, number

    def open_discussion(self, repo: Repo, title: str, author: str, pull_request: bool = False) -> int:
        """A discussion, or a pull request: then a ref `refs/pr/<num>` starts at main's head, for commits to go to."""
        with self._lock, self._transaction():
            number = 1 + int(self._db.execute("SELECT COALESCE(MAX(num), 0) FROM discussions WHERE repo=?",
                                              (repo.pk,)).fetchone()[0])
            self._db.execute("INSERT INTO discussions VALUES(?,?,?,?,?,?,?)",
                             (repo.pk, number, title, int(pull_request), "open", now_iso(), author))
            if pull_request:
                self._db.execute("INSERT INTO refs VALUES(?,?,?)", (repo.pk, f"refs/pr/{number}",
                                                                    self.resolve(repo, "main")))
            return number

    def discussion(self, repo: Repo, number: int) -> dict[str, Any]:
        with self._read() as db:
            row = db.execute("SELECT * FROM discussions WHERE repo=? AND num=?", (repo.pk, number)).fetchone()
        if row is None:
            raise StoreError(404, f"Discussion {number} not found", "DiscussionNotFound")
        return dict(row)

    def create_tag(self, repo: Repo, tag: str, revision: str) -> None:
        with self._lock, self._transaction():
            oid = self.resolve(repo, revision)  # a missing revision is named first, as on the Hub
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", tag) or ".." in tag:
                raise StoreError(400, f"Invalid tag name '{tag}'")
            if f"refs/tags/{tag}" in self.refs(repo):
                raise StoreError(409, f"Reference refs/tags/{tag} already exists")
            self._db.execute("INSERT INTO refs VALUES(?,?,?)", (repo.pk, f"refs/tags/{tag}", oid))

    def upload_mode(self, repo: Repo, commit: str, path: str, size: int) -> str:
        if size > LFS_SIZE_THRESHOLD:
            return "lfs"
        attributes = self.file(commit, ".gitattributes")
        patterns = lfs_patterns(self.read_blob(attributes.sha256).decode("utf-8", "replace")) if attributes else []
        return "lfs" if any(pattern_matches(p, path) for p in patterns) else "regular"

    def gitignore(self, commit: str) -> str:
        entry = self.file(commit, ".gitignore")
        return self.read_blob(entry.sha256).decode("utf-8", "replace") if entry else ""

    def collect_blobs(self, older_than_s: float) -> int:
        """Remove blobs no commit references (a failed commit's uploads, a deleted repo's files) once they are
        older than `older_than_s`: younger ones may belong to an upload whose commit is still to come (a blob an
        upload finds already stored is touched, so it counts as young again)."""
        cutoff = time.time() - older_than_s
        removed = 0
        with self._lock:  # no commit lands between the list of references and the removals
            referenced = {row[0] for row in self._db.execute("SELECT DISTINCT sha256 FROM files")}
            for blob in self.blobs.glob("*/*"):
                try:
                    if blob.name not in referenced and blob.stat().st_mtime < cutoff:
                        blob.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed
