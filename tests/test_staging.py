"""The staging Hub through the unmodified huggingface_hub client (and raw HTTP where the client cannot go)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from publisher.staging.process import StagingHub


def stats(hub: StagingHub) -> dict:
    conn = _conn(hub)
    conn.request("GET", "/api/staging/stats", headers={"Authorization": f"Bearer {hub.token}"})
    return json.loads(conn.getresponse().read())


def _conn(hub: StagingHub) -> http.client.HTTPConnection:
    url = urlparse(hub.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=30)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "upload"
    (root / "original" / "packages" / "Model.mlpackage" / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (root / "notes.txt").write_text("hello staging\n")
    (root / "original" / "packages" / "Model.mlpackage" / "Manifest.json").write_text('{"a": 1}\n')
    weights = root / "original" / "packages" / "Model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    weights.write_bytes(os.urandom(20 * 1024 * 1024))
    (root / "split_einsum_v2" / "packages").mkdir(parents=True)
    (root / "split_einsum_v2" / "packages" / "other.txt").write_text("other\n")
    return root


def test_create_repo_twice(hf_api: HfApi) -> None:
    url = hf_api.create_repo("tester/twice")
    assert url.repo_id == "tester/twice"
    again = hf_api.create_repo("tester/twice", exist_ok=True)
    assert again.repo_id == "tester/twice"
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_repo("tester/twice")
    assert info.value.response.status_code == 409
    # the Hub matches repo ids case-insensitively
    assert hf_api.repo_info("Tester/Twice").id == "tester/twice"


def test_upload_folder_tree_paths_info_and_downloads(hf_api: HfApi, repo_id: str, folder: Path,
                                                     tmp_path: Path, staging_hub: StagingHub) -> None:
    info = hf_api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="first")
    assert info.oid
    entries = {e.path: e for e in hf_api.list_repo_tree(repo_id, recursive=True, expand=True)}
    weight_path = "original/packages/Model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    weight = folder / weight_path
    assert entries[weight_path].lfs is not None
    assert entries[weight_path].lfs.sha256 == sha256_of(weight)
    assert entries[weight_path].size == weight.stat().st_size
    assert entries[weight_path].last_commit.oid == info.oid
    assert entries["notes.txt"].lfs is None
    assert {"original", "original/packages", "split_einsum_v2"} <= set(entries)
    assert entries[".gitattributes"].last_commit.title == "initial commit"
    # non-recursive listing of a sub-folder
    top = [e.path for e in hf_api.list_repo_tree(repo_id, path_in_repo="original/packages")]
    assert top == ["original/packages/Model.mlpackage"]

    paths = hf_api.get_paths_info(repo_id, ["notes.txt", "original", "missing.txt"], expand=True)
    assert sorted(p.path for p in paths) == ["notes.txt", "original"]

    downloaded = hf_hub_download(repo_id, "notes.txt", token=staging_hub.token)
    assert Path(downloaded).read_text() == "hello staging\n"

    local = tmp_path / "snapshot"
    snapshot_download(repo_id, allow_patterns="original/packages/*", local_dir=local, token=staging_hub.token)
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert got == sorted(["original/packages/Model.mlpackage/Manifest.json", weight_path])
    assert sha256_of(local / weight_path) == sha256_of(weight)


def test_second_identical_upload_sends_no_bytes(hf_api: HfApi, repo_id: str, folder: Path,
                                                staging_hub: StagingHub) -> None:
    first = hf_api.upload_folder(folder_path=folder, repo_id=repo_id)
    before = stats(staging_hub)["bytes_received"]
    second = hf_api.upload_folder(folder_path=folder, repo_id=repo_id)
    after = stats(staging_hub)["bytes_received"]
    assert second.oid == first.oid  # no new commit
    assert after == before  # no LFS bytes, no commit payload


def test_create_commit_adds_and_deletes(hf_api: HfApi, repo_id: str, folder: Path) -> None:
    hf_api.upload_folder(folder_path=folder, repo_id=repo_id)
    hf_api.create_commit(repo_id, commit_message="swap", operations=[
        CommitOperationAdd("new/file.txt", b"new content"),
        CommitOperationDelete("notes.txt"),
        CommitOperationDelete("split_einsum_v2/", is_folder=True),
    ])
    files = set(hf_api.list_repo_files(repo_id))
    assert "new/file.txt" in files
    assert "notes.txt" not in files
    assert not any(f.startswith("split_einsum_v2/") for f in files)
    with pytest.raises(EntryNotFoundError):
        hf_api.create_commit(repo_id, commit_message="bad", operations=[CommitOperationDelete("never-there.txt")])


def test_stale_parent_commit_is_refused(hf_api: HfApi, repo_id: str) -> None:
    base = hf_api.repo_info(repo_id).sha
    hf_api.create_commit(repo_id, commit_message="a", operations=[CommitOperationAdd("a.txt", b"a")],
                         parent_commit=base)
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_commit(repo_id, commit_message="b", operations=[CommitOperationAdd("b.txt", b"b")],
                             parent_commit=base)
    assert info.value.response.status_code == 412
    assert "The branch was updated since you opened this page" in str(info.value)
    assert "b.txt" not in hf_api.list_repo_files(repo_id)


def test_writes_need_the_token(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    anonymous = HfApi(endpoint=staging_hub.url, token=False)
    with pytest.raises(HfHubHTTPError) as info:
        anonymous.create_commit(repo_id, commit_message="x", operations=[CommitOperationAdd("x.txt", b"x")])
    assert info.value.response.status_code == 401
    wrong = HfApi(endpoint=staging_hub.url, token="not-the-token")
    with pytest.raises(HfHubHTTPError):
        wrong.create_repo("tester/not-allowed")
    # reads of public repos stay open
    assert anonymous.repo_info(repo_id).id == repo_id
    assert wrong.whoami is not None
    assert hf_api.whoami()["name"] == "staging"


def test_private_repo_is_invisible_without_token(hf_api: HfApi, staging_hub: StagingHub) -> None:
    hf_api.create_repo("tester/secret", private=True)
    hf_api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="tester/secret")
    anonymous = HfApi(endpoint=staging_hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.repo_info("tester/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/secret", "s.txt", token=False)
    assert hf_api.repo_info("tester/secret").private is True


def test_model_card_push_and_yaml_validation(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    card = ModelCard("---\nlicense: mit\ntags: [coreml]\n---\n# Card\n")
    card.push_to_hub(repo_id, token=staging_hub.token)
    assert "# Card" in Path(hf_hub_download(repo_id, "README.md", token=staging_hub.token)).read_text()
    bad = ModelCard("---\nlicense: 5\ntags: [1, 2]\n---\n# Card\n")
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md") as info:
        bad.push_to_hub(repo_id, token=staging_hub.token)
    assert 'tags\\" must be an array of strings' in str(info.value)
    assert 'license\\" must be a string' in str(info.value)
    # a malformed model-index, sent as the client sends any README (the client's own parser refuses it earlier)
    conn = _conn(staging_hub)
    conn.request("POST", "/api/validate-yaml", body=json.dumps(
        {"content": "---\nmodel-index: {name: x}\n---\n", "repoType": "model"}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["errors"] == [{"message": '"model-index" must be an array'}]
    conn.request("POST", "/api/validate-yaml", body=json.dumps({"content": "---\nlicense: [unclosed\n---\n"}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read())["errors"][0]["message"].startswith("Invalid YAML in metadata (line 2)")


def test_create_pr(hf_api: HfApi, repo_id: str) -> None:
    main_before = hf_api.repo_info(repo_id).sha
    info = hf_api.create_commit(repo_id, commit_message="proposal", create_pr=True,
                                operations=[CommitOperationAdd("pr.txt", b"pr")])
    assert info.pr_url and info.pr_url.endswith("/discussions/1")
    assert info.pr_revision == "refs/pr/1"
    assert hf_api.repo_info(repo_id).sha == main_before
    assert "pr.txt" in hf_api.list_repo_files(repo_id, revision="refs/pr/1")
    refs = hf_api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    discussions = list(hf_api.get_repo_discussions(repo_id))
    assert [(d.num, d.is_pull_request) for d in discussions] == [(1, True)]


def test_branches_and_delete_repo(hf_api: HfApi, repo_id: str) -> None:
    hf_api.create_branch(repo_id, branch="dev")
    hf_api.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id=repo_id, revision="dev")
    assert "d.txt" in hf_api.list_repo_files(repo_id, revision="dev")
    assert "d.txt" not in hf_api.list_repo_files(repo_id)
    hf_api.delete_branch(repo_id, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        hf_api.list_repo_files(repo_id, revision="dev")
    hf_api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_api.repo_info(repo_id)
    hf_api.delete_repo(repo_id, missing_ok=True)


def test_range_requests_and_served_bytes(hf_api: HfApi, repo_id: str, staging_hub: StagingHub, tmp_path: Path) -> None:
    content = os.urandom(3 * 1024 * 1024)
    hf_api.upload_file(path_or_fileobj=content, path_in_repo="big.bin", repo_id=repo_id)
    conn = _conn(staging_hub)
    path = f"/{repo_id}/resolve/main/big.bin"
    conn.request("GET", path, headers={"Range": "bytes=1000-"})
    response = conn.getresponse()
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes 1000-{len(content) - 1}/{len(content)}"
    assert response.read() == content[1000:]
    # huggingface_hub 2.4 downloads into a process-unique temp file (no resume from a shared .incomplete file), so
    # Range is exercised over raw HTTP above; the client's download is counted by the server byte for byte
    cache = tmp_path / "cache"
    sha = hashlib.sha256(content).hexdigest()
    before = stats(staging_hub)
    result = Path(hf_hub_download(repo_id, "big.bin", cache_dir=cache, token=staging_hub.token))
    assert result.read_bytes() == content
    after = stats(staging_hub)
    assert after["requests"].get("resolve", 0) - before["requests"].get("resolve", 0) >= 1
    assert after["bytes_sent"]["resolve"] - before["bytes_sent"].get("resolve", 0) == len(content)
    conn.request("HEAD", path)
    head = conn.getresponse()
    head.read()
    assert head.getheader("X-Linked-Etag") == f'"{sha}"'
    assert head.getheader("X-Linked-Size") == str(len(content))
    assert head.getheader("X-Repo-Commit") == hf_api.repo_info(repo_id).sha


def test_missing_entry_and_revision_codes(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.txt", token=staging_hub.token)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "README.md", revision="no-such-branch", token=staging_hub.token)


def test_bad_input_is_refused_and_nothing_partial_is_visible(hf_api: HfApi, repo_id: str,
                                                             staging_hub: StagingHub) -> None:
    head_before = hf_api.repo_info(repo_id).sha
    auth = {"Authorization": f"Bearer {staging_hub.token}"}
    conn = _conn(staging_hub)

    def post(path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict, dict]:
        conn.request("POST", path, body=body, headers={**auth, "Content-Type": content_type})
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data) if data else {}

    # path traversal (a backslash is an ordinary character on the Hub: see the test of names with backslashes)
    for bad in ("../escape.txt", "a/../b.txt", "/abs.txt", "a//b.txt"):
        line = json.dumps({"key": "file", "value": {"path": bad, "content": "eA==", "encoding": "base64"}})
        status, headers, body = post(f"/api/models/{repo_id}/commit/main",
                                     b'{"key":"header","value":{"summary":"x"}}\n' + line.encode(),
                                     "application/x-ndjson")
        assert status == 422, (bad, body)
        assert headers.get("x-request-id")
    # malformed NDJSON: 400 with a message, and the same keep-alive connection still works afterwards
    status, _, body = post(f"/api/models/{repo_id}/commit/main", b"{not json\n", "application/x-ndjson")
    assert status == 400 and "Malformed NDJSON at line 1" in body["error"]
    # an LFS object announced but never uploaded cannot be committed
    ghost = {"key": "lfsFile", "value": {"path": "ghost.bin", "algo": "sha256", "oid": "0" * 64, "size": 5}}
    status, _, body = post(f"/api/models/{repo_id}/commit/main",
                           b'{"key":"header","value":{"summary":"x"}}\n' + json.dumps(ghost).encode(),
                           "application/x-ndjson")
    assert status == 422
    # an upload whose bytes do not match the announced sha256 is refused and not stored
    data = b"real content"
    oid = hashlib.sha256(data).hexdigest()
    status, _, batch = post(f"/{repo_id}.git/info/lfs/objects/batch",
                            json.dumps({"operation": "upload", "transfers": ["basic"],
                                        "objects": [{"oid": oid, "size": len(data)}]}).encode())
    href = urlparse(batch["objects"][0]["actions"]["upload"]["href"])
    conn.request("PUT", f"{href.path}?{href.query}", body=b"fake content")
    response = conn.getresponse()
    response.read()
    assert response.status == 400
    conn.request("PUT", f"{href.path}?{href.query.replace('sig=', 'sig=0')}", body=data)
    response = conn.getresponse()
    response.read()
    assert response.status == 403  # a tampered signature
    status, _, batch = post(f"/{repo_id}.git/info/lfs/objects/batch",
                            json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).encode())
    assert "actions" in batch["objects"][0], "a refused upload must not count as stored"
    # an upload cut off mid-body leaves nothing behind
    raw = _conn(staging_hub)
    raw.putrequest("PUT", f"{href.path}?{href.query}")
    raw.putheader("Content-Length", str(len(data)))
    raw.endheaders()
    raw.send(data[:4])
    raw.close()
    assert hf_api.repo_info(repo_id).sha == head_before
    assert not list((staging_hub.root / "blobs").rglob(oid))


def test_hf_cli_upload_and_download(repo_id: str, staging_hub: StagingHub, folder: Path, tmp_path: Path) -> None:
    hf = Path(sys.executable).parent / "hf"
    env = {**os.environ, "HF_TOKEN": staging_hub.token or ""}
    upload = subprocess.run([str(hf), "upload", repo_id, str(folder), ".", "--commit-message", "cli"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert upload.returncode == 0, upload.stderr
    out = tmp_path / "cli-download"
    download = subprocess.run([str(hf), "download", repo_id, "--include", "original/packages/*", "--local-dir",
                               str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert download.returncode == 0, download.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert files == ["original/packages/Model.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
                     "original/packages/Model.mlpackage/Manifest.json"]


def _raw(hub: StagingHub, method: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = _conn(hub)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {hub.token}", **(headers or {})})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_hostile_requests_get_the_right_4xx(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    """Round two: bounded objects and bodies, safe error headers, no 500 on malformed input, full parent ids."""
    head = hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id).oid
    # an LFS object the Hub would refuse: answered per object, no part URL is built
    status, _, body = _raw(staging_hub, "POST", f"/{repo_id}.git/info/lfs/objects/batch", json.dumps(
        {"operation": "upload", "transfers": ["basic", "multipart"],
         "objects": [{"oid": "a" * 64, "size": 10**18}]}), {"Content-Type": "application/vnd.git-lfs+json"})
    # one part URL per 64 MiB of 10^18 bytes is 15 billion URLs: the unbounded server never answers (the
    # connection's timeout catches that hang); the answer's size bounds the work
    assert status == 200 and len(body) < 4096
    answer = json.loads(body)["objects"][0]
    assert answer["error"]["code"] == 422 and "actions" not in answer
    # bodies past the limit are refused from the announced length, unread
    status, headers, _ = _raw(staging_hub, "POST", "/api/validate-yaml", b"{}",
                              {"Content-Type": "application/json", "Content-Length": str(400 * 2**20)})
    assert status == 413
    # error text with NUL/CR/LF or non-Latin-1 characters still makes a well-formed answer
    for path in (f"/{repo_id}/resolve/main/a%00b", f"/{repo_id}/resolve/main/%E6%97%A5%E6%9C%AC",
                 "/api/models/tester/%EF%BD%81bc"):
        status, headers, body = _raw(staging_hub, "GET", path)
        assert 400 <= status < 500, (path, status, body)
        message = headers["x-error-message"]  # present and well-formed
        assert message and "\n" not in message and "\r" not in message and "\x00" not in message
    # malformed input is a 4xx, never a 500
    status, _, _ = _raw(staging_hub, "DELETE", "/api/repos/delete", json.dumps({"name": "x", "type": 5}),
                        {"Content-Type": "application/json"})
    assert status == 400
    status, _, _ = _raw(staging_hub, "GET", f"/{repo_id}/resolve/main/a.txt", headers={"Range": "bytes=" + "9" * 5000})
    assert 400 <= status < 500
    status, _, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/preupload/main", json.dumps(
        {"files": [{"path": "b.bin", "size": -5, "sample": ""}]}), {"Content-Type": "application/json"})
    assert status == 400
    for parent in (123, head[:1], head[:12]):
        ndjson = "\n".join(json.dumps(line) for line in (
            {"key": "header", "value": {"summary": "s", "parentCommit": parent}},
            {"key": "file", "value": {"path": "b.txt", "content": "eA==", "encoding": "base64"}}))
        status, _, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/commit/main", ndjson,
                            {"Content-Type": "application/x-ndjson"})
        assert status in (400, 412), (parent, status)
    assert hf_api.repo_info(repo_id).sha == head  # none of it landed


def test_pattern_matching_is_bounded() -> None:
    import threading

    from publisher.staging.patterns import pattern_matches

    # the regex version took 5 s for ten '*a' against 40 characters, x4-5 per extra '*a': forty never finish.
    # The join's timeout only catches that hang; the matcher's work is linear in pattern x path
    answer: list[bool] = []
    worker = threading.Thread(target=lambda: answer.append(
        pattern_matches("x/" + "*a" * 40 + "b", "x/" + "a" * 1000)), daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert answer == [False]
    for pattern, path, expected in [("*.bin", "a/b/c.bin", True), ("a/*.bin", "a/b/c.bin", False),
                                    ("a/**/c.bin", "a/x/y/c.bin", True), ("/build", "x/build/y", False),
                                    ("build", "x/build/y.txt", True), ("a/b", "a/bc", False)]:
        assert pattern_matches(pattern, path) is expected, (pattern, path)


def _upload_session(hub: StagingHub, repo_id: str, oid: str, size: int) -> dict:
    """The `upload` action the LFS batch answers for one object (multipart above 256 MiB)."""
    status, _, body = _raw(hub, "POST", f"/{repo_id}.git/info/lfs/objects/batch", json.dumps(
        {"operation": "upload", "transfers": ["basic", "multipart"], "objects": [{"oid": oid, "size": size}]}),
        {"Content-Type": "application/vnd.git-lfs+json"})
    assert status == 200
    return json.loads(body)["objects"][0]["actions"]["upload"]


def _put_part(hub: StagingHub, session: dict, number: int, payload: bytes) -> int:
    url = urlparse(session["header"][str(number)])
    return _raw(hub, "PUT", f"{url.path}?{url.query}", payload)[0]


def _complete(hub: StagingHub, session: dict, oid: str) -> tuple[int, bytes]:
    url = urlparse(session["href"])
    count = len([k for k in session["header"] if k.isdigit()])
    parts = [{"partNumber": n, "etag": "x"} for n in range(1, count + 1)]
    status, _, body = _raw(hub, "POST", f"{url.path}?{url.query}", json.dumps({"oid": oid, "parts": parts}),
                           {"Content-Type": "application/json"})
    return status, body


def test_concurrent_multipart_uploads_of_one_object(staging_hub: StagingHub, repo_id: str) -> None:
    """Two upload sessions of the same 300 MiB object, interleaved: each writes its own file; the first completion
    seals its session and adopts the file; a late part write of that session is refused; the second completion
    succeeds (the object exists)."""
    block = os.urandom(1 << 20)
    data = block * 300
    oid = hashlib.sha256(data).hexdigest()
    sessions = [_upload_session(staging_hub, repo_id, oid, len(data)) for _ in range(2)]
    assert sessions[0]["href"] != sessions[1]["href"]
    chunk = int(sessions[0]["header"]["chunk_size"])
    count = len([k for k in sessions[0]["header"] if k.isdigit()])

    def put(session: dict, number: int, payload: bytes | None = None) -> int:
        part = payload if payload is not None else data[(number - 1) * chunk:number * chunk]
        return _put_part(staging_hub, session, number, part)

    for number in range(1, count):
        assert put(sessions[0], number) == 200
    for number in range(1, count + 1):
        assert put(sessions[1], number) == 200
    # completed twice at once (a client's retry): the second waits for the first's answer
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: _complete(staging_hub, sessions[1], oid)[0], range(2)))
    assert answers == [200, 200]
    assert put(sessions[1], 1, b"late bytes") == 409  # a late writer of the finished session is refused
    assert put(sessions[0], count) == 200
    assert _complete(staging_hub, sessions[0], oid)[0] == 200  # idempotent: the object exists
    blob = staging_hub.root / "blobs" / oid[:2] / oid
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == oid


def test_parts_hashed_as_they_arrive_never_vouch_for_rewritten_bytes(staging_hub: StagingHub, repo_id: str) -> None:
    """Completion trusts the sha256 taken while parts arrive in order only if no byte was written twice or out of
    order: parts sent backwards, or a part first sent right and then overwritten, are hashed from the file."""
    data = os.urandom(1 << 20) * 260  # 5 parts of 64 MiB (the last one 4 MiB)
    oid = hashlib.sha256(data).hexdigest()
    blob = staging_hub.root / "blobs" / oid[:2] / oid

    # 1. right bytes in order, then part 2 overwritten with other bytes: the running hash still matches the oid,
    #    the file does not; completion must refuse it
    session = _upload_session(staging_hub, repo_id, oid, len(data))
    chunk = int(session["header"]["chunk_size"])
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for number, part in enumerate(parts, 1):
        assert _put_part(staging_hub, session, number, part) == 200
    assert _put_part(staging_hub, session, 2, bytes(len(parts[1]))) == 200
    status, body = _complete(staging_hub, session, oid)
    assert status == 400 and b"does not match" in body
    assert not blob.exists()

    # 2. parts sent backwards, with part 3 first sent wrong and then right: hashed from the file, accepted
    session = _upload_session(staging_hub, repo_id, oid, len(data))
    assert _put_part(staging_hub, session, 3, bytes(len(parts[2]))) == 200
    for number in range(len(parts), 0, -1):
        assert _put_part(staging_hub, session, number, parts[number - 1]) == 200
    assert _complete(staging_hub, session, oid)[0] == 200
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == oid


def test_trees_the_hub_refuses_are_refused(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    from huggingface_hub import CommitOperationCopy
    from huggingface_hub.errors import HfHubHTTPError

    hf_api.upload_file(path_or_fileobj=b"hello", path_in_repo="x/y.txt", repo_id=repo_id)
    head = hf_api.repo_info(repo_id).sha
    for path in ("x/y.txt/inner", "x", "a\nb", "a\x1bb"):  # file/folder clashes, control characters
        with pytest.raises(HfHubHTTPError) as info:
            hf_api.upload_file(path_or_fileobj=b"z", path_in_repo=path, repo_id=repo_id)
        assert info.value.response.status_code == 422, path
    with pytest.raises(EntryNotFoundError):  # deleting what is not there is not an (empty) commit
        hf_api.delete_folder("nothere", repo_id=repo_id)
    for ndjson in ([{"key": "header", "value": {"summary": "s"}},
                    {"key": "file", "value": {"path": ".git/config", "content": "eA==", "encoding": "base64"}}],
                   [{"key": "header", "value": {"summary": "s"}},  # a regular file above 10 MB: LFS only
                    {"key": "file", "value": {"path": "big.txt", "encoding": "base64",
                                              "content": __import__("base64").b64encode(b"x" * (11 << 20)).decode()}}],
                   [{"key": "header", "value": {"summary": "s"}},  # nothing changes: an empty commit
                    {"key": "file", "value": {"path": "x/y.txt", "content": "aGVsbG8=", "encoding": "base64"}}]):
        status, _, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/commit/main",
                            "\n".join(json.dumps(line) for line in ndjson), {"Content-Type": "application/x-ndjson"})
        assert status in (400, 413, 422), ndjson[1]["value"]["path"]
    assert hf_api.repo_info(repo_id).sha == head
    # what the client relies on: copies (regular and LFS), formatted commit titles
    hf_api.upload_file(path_or_fileobj=os.urandom(11 << 20), path_in_repo="big.bin", repo_id=repo_id)
    hf_api.create_commit(repo_id, [CommitOperationCopy("x/y.txt", "copy.txt"), CommitOperationCopy("big.bin", "b2.bin")],
                         commit_message="copies <b>")
    assert {"copy.txt", "b2.bin"} <= set(hf_api.list_repo_files(repo_id))
    assert hf_api.get_paths_info(repo_id, ["b2.bin"])[0].lfs.sha256 == hf_api.get_paths_info(repo_id, ["big.bin"])[
        0].lfs.sha256
    commits = hf_api.list_repo_commits(repo_id, formatted=True)
    assert commits[0].formatted_title == "copies &lt;b&gt;"


def test_leftovers_are_collected(tmp_path: Path) -> None:
    """Blobs no commit references (a failed commit's uploads) and killed uploads' temp files go once they are old;
    referenced or young ones stay."""
    import time

    from publisher.staging.storage import HubStore

    store = HubStore(tmp_path / "hub")
    try:
        repo, _ = store.create_repo("model", "t/r", False, "tester")
        kept = store.put_bytes(b"committed")
        store.commit(repo, "main", [("file", {"path": "a.txt", "_sha256": kept, "_size": 9,
                                              "_git_oid": "0" * 40})], "s", "", None, False, "tester")
        orphan, young = store.put_bytes(b"failed commit"), store.put_bytes(b"commit still to come")
        old = time.time() - 3 * 3600
        for sha in (kept, orphan):
            os.utime(store.blob_path(sha), (old, old))
        fd, temp = store.new_temp()
        os.close(fd)
        os.utime(temp, (old, old))
        assert store.collect_blobs(2 * 3600) == 1
        assert store.clean_temp(3600) == 1
        assert not store.blob_path(orphan).exists() and not temp.exists()
        assert store.blob_path(kept).exists() and store.blob_path(young).exists()
    finally:
        store.close()


def test_eight_clients_upload_one_object_at_once(staging_hub: StagingHub, tmp_path: Path) -> None:
    """8 unmodified clients push the same 110 MB object at once (to 8 repos): all succeed, the stored bytes hash
    to the oid, and the server's memory stays flat (it streams every body to disk)."""
    import threading

    from huggingface_hub import HfApi

    def rss_kib() -> int:
        status = Path(f"/proc/{staging_hub.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

    path = tmp_path / "same.bin"
    path.write_bytes(os.urandom(1 << 20) * 110)
    oid = sha256_of(path)
    idle = rss_kib()
    peak = [idle]
    errors: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_kib())

    def push(index: int) -> None:
        try:
            api = HfApi(endpoint=staging_hub.url, token=staging_hub.token)
            api.create_repo(f"tester/concurrent-{index}", exist_ok=True)
            api.upload_file(path_or_fileobj=str(path), path_in_repo="same.bin", repo_id=f"tester/concurrent-{index}")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    watcher.join()
    assert errors == []
    assert sha256_of(staging_hub.root / "blobs" / oid[:2] / oid) == oid
    assert (peak[0] - idle) / 1024 < 200, f"server RSS grew by {(peak[0] - idle) / 1024:.0f} MiB"


def test_pull_requests_tags_and_card_metadata(hf_api: HfApi, repo_id: str, staging_hub: StagingHub,
                                              tmp_path: Path) -> None:
    from huggingface_hub import CommitOperationAdd, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    hf_api.upload_file(path_or_fileobj=b"v1", path_in_repo="m.txt", repo_id=repo_id)
    pr = hf_api.create_pull_request(repo_id, title="a change")
    assert pr.is_pull_request and pr.target_branch == "refs/heads/main" and pr.status == "open"
    oid = hf_api.create_commit(repo_id, [CommitOperationAdd("m.txt", b"v2")], commit_message="on the PR",
                               revision=pr.git_reference).oid
    assert hf_api.list_repo_refs(repo_id, include_pull_requests=True).pull_requests[0].target_commit == oid
    assert hf_hub_download(repo_id, "m.txt", revision="main", cache_dir=str(tmp_path / "c")) is not None
    assert Path(hf_hub_download(repo_id, "m.txt", revision="main", cache_dir=str(tmp_path / "c"))).read_bytes() == b"v1"
    hf_api.create_tag(repo_id, tag="v1.0")
    assert [t.name for t in hf_api.list_repo_refs(repo_id).tags] == ["v1.0"]
    assert Path(hf_hub_download(repo_id, "m.txt", revision="v1.0", cache_dir=str(tmp_path / "c"))).read_bytes() == b"v1"
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_tag(repo_id, tag="v1.0")
    assert info.value.response.status_code == 409
    # a card whose metadata does not parse never lands (the client checks it first; a raw commit is refused too)
    ndjson = "\n".join(json.dumps(line) for line in (
        {"key": "header", "value": {"summary": "card"}},
        {"key": "file", "value": {"path": "README.md", "encoding": "base64",
                                  "content": __import__("base64").b64encode(b"---\nlicense: [\n---\ntext").decode()}}))
    status, headers, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/commit/main", ndjson,
                              {"Content-Type": "application/x-ndjson"})
    assert status == 400 and "README.md" in headers["x-error-message"]
    assert "README.md" not in hf_api.list_repo_files(repo_id)


def test_listing_moving_squashing_implicit_folder_deletes_and_licenses(hf_api: HfApi, repo_id: str) -> None:
    """Client calls the held-out tests found missing: list_models, move_repo, super_squash_history, a folder deleted
    by its name without a slash, the Hub's license identifiers in card metadata."""
    from huggingface_hub import CommitOperationDelete

    hf_api.upload_file(path_or_fileobj=b"a", path_in_repo="folder/a.txt", repo_id=repo_id)
    hf_api.upload_file(path_or_fileobj=b"b", path_in_repo="folder/sub/b.txt", repo_id=repo_id)
    hf_api.create_commit(repo_id, [CommitOperationDelete("folder")], commit_message="rm folder")
    assert hf_api.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):  # neither a file nor a folder
        hf_api.create_commit(repo_id, [CommitOperationDelete("folder")], commit_message="again")

    owner, name = repo_id.split("/")
    assert repo_id in [m.id for m in hf_api.list_models(author=owner)]
    assert [m.id for m in hf_api.list_models(search=name)] == [repo_id]
    assert hf_api.list_models(author="nobody-at-all") is not None and not list(hf_api.list_models(author="nobody-x"))

    assert len(hf_api.list_repo_commits(repo_id)) == 4
    hf_api.super_squash_history(repo_id, commit_message="squashed")
    commits = hf_api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == ["squashed"]
    assert hf_api.list_repo_files(repo_id) == [".gitattributes"]  # same tree

    moved = f"{owner}/{name}-moved"
    hf_api.move_repo(repo_id, moved)
    # the old name keeps reaching the moved repo (the Hub's redirect), until a repo of that name is created
    assert hf_api.repo_info(moved).id == moved and hf_api.repo_info(repo_id).id == moved
    hf_api.create_repo(repo_id)
    assert hf_api.repo_info(repo_id).id == repo_id and hf_api.list_repo_files(moved) == [".gitattributes"]
    hf_api.delete_repo(repo_id)
    with pytest.raises(ValueError, match="license"):  # a license the Hub does not know: the client's check refuses it
        hf_api.upload_file(path_or_fileobj=b"---\nlicense: not-a-license\n---\n# card\n", path_in_repo="README.md",
                           repo_id=moved)
    hf_api.upload_file(path_or_fileobj=b"---\nlicense: openrail++\n---\n# card\n", path_in_repo="README.md",
                       repo_id=moved)
    hf_api.delete_repo(moved)


def test_round_three_refs_names_and_bounds(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    """Refs as the Hub keeps them, repo ids compared exactly, stats behind the token, malformed input a 4xx."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    hf_api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id=repo_id)
    # a repo id of one segment is a missing repo in the Hub's words (the client tells it from a missing revision)
    assert not hf_api.repo_exists("no-namespace") and not hf_api.revision_exists("no-namespace", "main")
    with pytest.raises(RepositoryNotFoundError):
        hf_api.list_repo_commits("no-namespace")
    assert not hf_api.revision_exists(repo_id, "nowhere") and hf_api.revision_exists(repo_id, "main")
    hf_api.create_tag(repo_id, tag="v1")
    tagged = hf_api.list_repo_refs(repo_id).tags[0].target_commit
    # refs/heads/x and refs/tags/x are two refs (huggingface_hub's own tests create a branch named like a tag); a
    # second ref of one kind and name is refused in the Hub's words; the name resolves to the branch
    hf_api.create_branch(repo_id, branch="v1")
    with pytest.raises(HfHubHTTPError, match="Reference refs/heads/v1 already exists") as info:
        hf_api.create_branch(repo_id, branch="v1")
    assert info.value.response.status_code == 409
    hf_api.upload_file(path_or_fileobj=b"on the branch", path_in_repo="a.txt", repo_id=repo_id, revision="v1")
    assert hf_api.repo_info(repo_id, revision="v1").sha != tagged
    hf_api.delete_branch(repo_id, branch="v1")
    assert hf_api.repo_info(repo_id, revision="v1").sha == tagged
    hf_api.create_branch(repo_id, branch="b2")
    with pytest.raises(HfHubHTTPError, match="Cannot delete refs/heads/main"):
        hf_api.delete_branch(repo_id, branch="main")
    with pytest.raises(RevisionNotFoundError):  # a missing revision is named before a bad tag name
        hf_api.create_tag(repo_id, tag="bad tag", revision="nowhere")
    hf_api.create_tag(repo_id, tag="v2")
    hf_api.delete_tag(repo_id, tag="v2")
    with pytest.raises(RevisionNotFoundError):
        hf_api.delete_tag(repo_id, tag="v2")
    # deleting a "branch" named like a tag's ref deletes nothing; a commit cannot move a tag
    status, _, _ = _raw(staging_hub, "DELETE", f"/api/models/{repo_id}/branch/refs%2Ftags%2Fv1")
    assert status == 404
    with pytest.raises(HfHubHTTPError):
        hf_api.create_commit(repo_id, operations=[CommitOperationAdd("b.txt", b"two")], commit_message="x",
                             revision="refs/tags/v1")
    refs = hf_api.list_repo_refs(repo_id)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", tagged)]
    assert {b.name for b in refs.branches} == {"main", "b2"}
    # the Kelvin sign (U+212A) folds to "k" in Unicode, not in ASCII: it reaches no repo
    owner = repo_id.split("/")[0]
    hf_api.create_repo(f"{owner}/k", exist_ok=True)
    status, _, _ = _raw(staging_hub, "GET", f"/api/models/{owner}/%E2%84%AA")
    assert status in (401, 404)
    # the server's counters are for the token's holder; a negative cursor is refused, not read from the end
    conn = _conn(staging_hub)
    conn.request("GET", "/api/staging/stats")
    assert conn.getresponse().status == 401
    status, _, _ = _raw(staging_hub, "GET", f"/api/models/{repo_id}/tree/main?cursor=-5")
    assert status == 400
    # a signature that is not ASCII is a refusal, not a crash
    oid = "a" * 64
    status, headers, _ = _raw(staging_hub, "PUT", f"/lfs/upload/{oid}?size=1&expires=99999999999&sig=%C3%A9", b"x")
    assert status == 403 and "x-error-message" in headers


def test_validate_yaml_bounds_alias_bombs_and_nesting(staging_hub: StagingHub) -> None:
    """A few KB of YAML aliases would expand to billions of values to check (and errors to report): refused by
    the alias count, the answer stays small; deep nesting is a 4xx, not a crash."""
    levels = ["a0: &a0 [{name: 1, results: [{task: 1, dataset: 1, metrics: [1]}]}]"]
    for level in range(1, 9):
        previous = f"*a{level - 1}"
        levels.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    card = "---\n" + "\n".join(levels) + "\nmodel-index: *a8\n---\n"
    assert len(card) < 4096
    status, _, body = _raw(staging_hub, "POST", "/api/validate-yaml", json.dumps({"content": card}),
                           {"Content-Type": "application/json"})
    assert status == 400 and len(body) < 4096
    assert "aliases" in json.loads(body)["error"]
    # 30 aliases of a small list: accepted by the alias bound, the walk and the error list stay bounded
    card = "---\nm: &m [{name: 1}]\nmodel-index: [" + ", ".join(["*m"] * 30) + "]\n---\n"
    status, _, body = _raw(staging_hub, "POST", "/api/validate-yaml", json.dumps({"content": card}),
                           {"Content-Type": "application/json"})
    assert status == 400 and len(json.loads(body)["errors"]) <= 100
    deep = "---\nx: " + "[" * 5000 + "]" * 5000 + "\n---\n"
    status, headers, _ = _raw(staging_hub, "POST", "/api/validate-yaml", json.dumps({"content": deep}),
                              {"Content-Type": "application/json"})
    assert 400 <= status < 500 and "x-error-message" in headers


def test_half_sent_headers_are_dropped_and_others_served(tmp_path: Path) -> None:
    """Slowloris: connections that never finish their headers are closed after the header deadline (1 s here),
    and another client is served while they hang."""
    import socket

    from huggingface_hub import HfApi

    from publisher.staging.process import start_staging_hub

    with start_staging_hub(tmp_path / "hub", token="t", env={"PUBLISHER_STAGING_HEADER_DEADLINE_S": "1"}) as hub:
        host, port = urlparse(hub.url).hostname, urlparse(hub.url).port
        slow = []
        for _ in range(20):
            sock = socket.create_connection((host, port))
            sock.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
            sock.settimeout(120)  # only catches a server that keeps them forever
            slow.append(sock)
        api = HfApi(endpoint=hub.url, token="t")
        api.create_repo("t/served", exist_ok=True)
        assert api.repo_exists("t/served")
        for sock in slow:
            assert sock.recv(1024) == b""  # closed by the server, not by this test
            sock.close()


def test_held_open_connections_cannot_fill_the_cap(tmp_path: Path) -> None:
    """More half-sent requests than the connection cap (512): the oldest connections in no request are closed as new
    ones arrive, and another client is served (uvicorn's cap alone answered it 503 until the header deadline)."""
    import socket

    from huggingface_hub import HfApi

    from publisher.staging.process import start_staging_hub
    from publisher.staging.server import MAX_CONNECTIONS

    with start_staging_hub(tmp_path / "hub", token="t") as hub:
        host, port = urlparse(hub.url).hostname, urlparse(hub.url).port
        held = []
        for _ in range(MAX_CONNECTIONS + 100):
            sock = socket.create_connection((host, port))
            sock.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(sock)
        try:
            status, _, _ = _raw(hub, "GET", "/api/models")
            assert status == 200
            api = HfApi(endpoint=hub.url, token="t")
            api.create_repo("t/served")
            assert api.repo_exists("t/served")
            held[0].settimeout(120)  # only catches a server that keeps it forever
            assert held[0].recv(1024) == b""  # the oldest was closed by the server
        finally:
            for sock in held:
                sock.close()


def test_paths_info_is_bounded_and_finds_folders_by_index(hf_api: HfApi, repo_id: str, staging_hub: StagingHub
                                                          ) -> None:
    """paths-info needs no token on a public repo: its work is bounded by the paths asked (at most 1000), each
    looked up, not scanned against every file."""
    from huggingface_hub import CommitOperationAdd

    hf_api.create_commit(repo_id, operations=[CommitOperationAdd(f"d{i % 7}/f{i}.txt", b"x") for i in range(60)],
                         commit_message="files")
    entries = hf_api.get_paths_info(repo_id, ["d3", "d3/f3.txt", "missing", "d3/f3.txt"])
    assert sorted((type(e).__name__, e.path) for e in entries) == [("RepoFile", "d3/f3.txt"), ("RepoFolder", "d3")]
    form = "&".join(f"paths=p{i}" for i in range(1001))
    status, headers, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/paths-info/main", form,
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "1000 at most" in headers["x-error-message"]


def test_preupload_bounds_its_ignore_matching(hf_api: HfApi, repo_id: str, staging_hub: StagingHub) -> None:
    """300 patterns of '*a' against long paths took 25 s on the event loop: the matching work is bounded first."""
    gitignore = "\n".join("*a" * 40 + f"b{i}" for i in range(300))
    files = [{"path": "x/" + "a" * 200 + f"{i}.bin", "size": 1, "sample": ""} for i in range(200)]
    status, headers, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/preupload/main",
                              json.dumps({"files": files, "gitIgnore": gitignore}),
                              {"Content-Type": "application/json"})
    assert status == 400 and "more matching than one preupload does" in headers["x-error-message"]
    # an ordinary one is answered
    status, _, body = _raw(staging_hub, "POST", f"/api/models/{repo_id}/preupload/main",
                           json.dumps({"files": files[:2], "gitIgnore": "*.log\n"}), {"Content-Type": "application/json"})
    assert status == 200 and [f["shouldIgnore"] for f in json.loads(body)["files"]] == [False, False]


def test_tree_pages_come_from_one_listing(tmp_path: Path) -> None:
    """Each page of a tree listing used to recompute the whole tree (5.5 s a page at 110k files): a commit never
    changes, so its listing is made once and its pages are cut from it."""
    from publisher.staging.app import HubApp
    from publisher.staging.storage import HubStore

    store = HubStore(tmp_path / "hub")
    try:
        repo, _ = store.create_repo("model", "t/r", False, "tester")
        ops = [("file", {"path": f"d/f{i}.txt", "_sha256": store.put_bytes(b"%d" % i), "_size": len(b"%d" % i),
                         "_git_oid": "0" * 40}) for i in range(30)]
        commit, _ = store.commit(repo, "main", ops, "s", "", None, False, "tester")
        hub = HubApp(store, token="t")
        reads: list[str] = []
        real = store.files
        store.files = lambda *args: reads.append(args[0]) or real(*args)  # type: ignore[method-assign]
        first = hub._tree_items(repo, commit, "", True, False)
        again = hub._tree_items(repo, commit, "", True, False)
        assert again == first and len(first) == 32 and reads == [commit]  # 30 files, their folder, .gitattributes
        hub._tree_items(repo, commit, "", False, False)  # another listing is its own
        assert len(reads) == 2
    finally:
        store.close()


def test_a_name_with_backslashes_is_one_file_and_fetch_refuses_to_write_it(hf_api: HfApi, repo_id: str,
                                                                         staging_hub: StagingHub,
                                                                         tmp_path: Path) -> None:
    """As the Hub: `folder/..\\..\\escape.txt` is a file of `folder/` (the client is the one that must not write
    it outside its target); `publisher fetch` refuses it in one line and writes nothing."""
    from publisher.errors import PublisherError
    from publisher.fetch import fetch_variant

    name = "folder/..\\..\\escape.txt"
    hf_api.upload_file(path_or_fileobj=b"x", path_in_repo=name, repo_id=repo_id)
    assert name in hf_api.list_repo_files(repo_id)
    with pytest.raises(PublisherError, match="a path that would land outside the target"):
        fetch_variant(repo_id, "folder", tmp_path / "to", endpoint=staging_hub.url, token=staging_hub.token)
    assert not any((tmp_path / "to").rglob("*escape*")) and not (tmp_path / "escape.txt").exists()


def test_gates_relative_names_and_the_hubs_wording(hf_api: HfApi, repo_id: str, staging_hub: StagingHub,
                                                  tmp_path: Path) -> None:
    """What huggingface_hub's own tests expect of the Hub (bench/hf_hub_suite.py runs them): a gated repo's setting is
    kept and reported, its files need a token; a name that starts outside the repo (`..\\x`) is a 422; a move onto
    an existing repo is refused in the Hub's words."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    hf_api.upload_file(path_or_fileobj=b"gated content", path_in_repo="file.txt", repo_id=repo_id)
    hf_api.update_repo_settings(repo_id, gated="manual")
    assert hf_api.model_info(repo_id).gated == "manual"
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "file.txt", token=False, cache_dir=tmp_path / "anonymous")
    owner_copy = hf_hub_download(repo_id, "file.txt", token=staging_hub.token, cache_dir=tmp_path / "owner")
    assert Path(owner_copy).read_bytes() == b"gated content"
    hf_api.update_repo_settings(repo_id, gated=False)
    assert hf_api.model_info(repo_id).gated is False
    assert HfApi(endpoint=staging_hub.url, token=False).model_info(repo_id).gated is False

    for name in ("..\\escape.txt", ".\\x"):
        with pytest.raises(HfHubHTTPError) as info:
            hf_api.upload_file(path_or_fileobj=b"x", path_in_repo=name, repo_id=repo_id)
        assert info.value.response.status_code == 422, name
    other = f"{repo_id}-other"
    hf_api.create_repo(other)
    with pytest.raises(HfHubHTTPError, match=r"A model repository called .* already exists"):
        hf_api.move_repo(repo_id, other)
    hf_api.delete_repo(other)


def test_values_of_the_wrong_type_are_a_4xx(repo_id: str, staging_hub: StagingHub) -> None:
    """JSON fields of the wrong type (found by fuzzing every route's fields) are refused with a 4xx and the Hub's
    X-Error-Message, never a 500."""
    for body in ({"name": "x", "type": [1]}, {"name": ["x"], "organization": "o"}, {"name": "x", "organization": {}}):
        status, headers, _ = _raw(staging_hub, "DELETE", "/api/repos/delete", json.dumps(body))
        assert status == 400 and "x-error-message" in headers, body
    status, _, _ = _raw(staging_hub, "POST", "/api/repos/move", json.dumps({"fromRepo": repo_id, "toRepo": "a/b",
                                                                           "type": {"a": 1}}))
    assert status == 400
    for content in (1, None, [], {"a": 1}):
        lines = [{"key": "header", "value": {"summary": "s"}},
                 {"key": "file", "value": {"path": "p.txt", "content": content}}]
        status, headers, _ = _raw(staging_hub, "POST", f"/api/models/{repo_id}/commit/main",
                                  "\n".join(json.dumps(line) for line in lines))
        assert status == 400 and "must be strings" in headers["x-error-message"], content
