"""One client's heavy request does not stall the staging Hub's other clients (round three).

The checks are about order, not time: other clients' requests are answered while the heavy one is still in flight
(a stalled event loop or a read waiting for the writer's lock answers none of them until it is over). The
latencies themselves are figures of `bench/staging_latency.py`.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi

from publisher.staging.process import StagingHub
from publisher.staging.storage import HubStore

DEADLOCK_GUARD_S = 120  # only reached when a read waits for the writer forever: the failure being tested


def _request(hub: StagingHub, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    url = urlparse(hub.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {hub.token}"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_others_are_answered_during_a_commit_of_thousands_of_files(hf_api: HfApi, repo_id: str,
                                                                   staging_hub: StagingHub) -> None:
    """A commit of 2000 regular files (decoding, hashing, writing blobs, then one transaction) runs off the event
    loop: a second client's repo-info requests are answered while it is in flight."""
    lines = [{"key": "header", "value": {"summary": "many files"}}]
    lines += [{"key": "file", "value": {"path": f"many/{i:05d}.txt", "encoding": "base64",
                                        "content": base64.b64encode(f"file {i}".encode()).decode()}}
              for i in range(2000)]
    body = b"\n".join(json.dumps(line).encode() for line in lines)
    status, answered = _answered_during(staging_hub, f"/api/models/{repo_id}", lambda: _request(
        staging_hub, "POST", f"/api/models/{repo_id}/commit/main", body))
    assert status == 200
    assert len(hf_api.list_repo_files(repo_id)) == 2001
    # a stalled loop answers at most the request it was serving when the commit arrived
    assert answered >= 5, answered


def _answered_during(hub: StagingHub, probe_path: str, heavy: Callable[[], tuple[int, bytes]]) -> tuple[int, int]:
    """(the heavy request's status, how many probe requests were answered while it was in flight)."""
    answered_during: list[int] = []
    finished = threading.Event()
    outcome: dict[str, tuple[int, bytes]] = {}

    def run() -> None:
        outcome["heavy"] = heavy()
        finished.set()

    worker = threading.Thread(target=run)
    worker.start()
    while not finished.is_set():
        status, _ = _request(hub, "GET", probe_path)
        assert status == 200
        if not finished.is_set():
            answered_during.append(status)
        finished.wait(0.02)
    worker.join()
    return outcome["heavy"][0], len(answered_during)


def test_others_are_answered_while_a_big_card_is_validated(repo_id: str, staging_hub: StagingHub) -> None:
    """validate-yaml needs no token: a card's metadata at its 256 KiB bound is parsed (~0.6 s with libyaml, 2.1 s
    in PyYAML's pure-Python loader before) off the event loop."""
    lines, size = [], 0
    while size < 250_000:
        lines.append(f"key_{len(lines)}: [a, b, {{c: d, e: [1, 2, 3]}}]")
        size += len(lines[-1]) + 1
    body = json.dumps({"content": "---\n" + "\n".join(lines) + "\n---\n"}).encode()
    status, answered = _answered_during(staging_hub, f"/api/models/{repo_id}",
                                        lambda: _request(staging_hub, "POST", "/api/validate-yaml", body))
    assert status == 200
    assert answered >= 5, answered


def test_reads_do_not_wait_for_a_write_in_progress(tmp_path: Path) -> None:
    """A write transaction holds the store's writer lock for as long as it runs (thousands of files); reads go
    through their own connections (WAL) and see the last committed state meanwhile."""
    store = HubStore(tmp_path / "hub")
    repo, _ = store.create_repo("model", "t/r", False, "t")
    head = store.resolve(repo, "main")
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store._lock, store._transaction():
            store._db.execute("UPDATE refs SET commit_oid='0' WHERE repo=?", (repo.pk,))  # not committed yet
            inside.set()
            release.wait()
            raise RuntimeError("rolled back")

    seen: dict[str, object] = {}

    def reader() -> None:
        found = store.get_repo("model", "T/R")
        seen["repo"] = found.id if found else None
        seen["head"] = store.resolve(repo, "main")
        seen["files"] = [f.path for f in store.files(head)]
        seen["refs"] = store.refs(repo)

    writing = threading.Thread(target=lambda: _swallow(writer))
    writing.start()
    inside.wait()
    reading = threading.Thread(target=reader)
    reading.start()
    reading.join(DEADLOCK_GUARD_S)
    answered = not reading.is_alive()
    release.set()
    writing.join()
    reading.join()
    assert answered, "a read waited for the writer"
    assert seen == {"repo": "t/r", "head": head, "files": [".gitattributes"], "refs": {"main": head}}
    assert store.resolve(repo, "main") == head  # the write was rolled back
    store.close()


def _swallow(function: object) -> None:
    try:
        function()  # type: ignore[operator]
    except RuntimeError:
        pass
