"""What goes in is what was listed, what goes out is what was built: source, publish and fetch integrity.

Attacks by an untrusted source repo, a lying or broken server and a messy build folder; each check fails on code
that trusts what it is given. The lying server is a small HTTP server here that answers the calls the unmodified
client makes (`shared/docs/hub-protocol.md`) with what the attack needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import json
import socket
import struct
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from publisher.convert.weight_files import _safetensors_header, check_safetensors, index_shards
from publisher.engine.source import fetch_source
from publisher.errors import PublisherError, SourceError
from publisher.fetch import FetchError, fetch_variant, safe_extract
from publisher.util.net import NetworkError
from publisher.vocabulary import Component

# -- sources -------------------------------------------------------------------------------------------------

def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_safetensors_headers_are_checked_before_anything_is_allocated(tmp_path: Path) -> None:
    # 22 KB on disk that claims a 1.6 GB tensor: refused by the header checks, nothing allocated from them
    huge = _raw_safetensors(tmp_path / "huge.safetensors", {"w": {"dtype": "F32", "shape": [100_000, 4_000],
                                                                  "data_offsets": [0, 1_600_000_000]}}, b"\0" * 22_000)
    overlap = _raw_safetensors(tmp_path / "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    for path in (huge, overlap):
        with pytest.raises(SourceError, match=f"{path.name}: not a valid safetensors file"):
            check_safetensors(path)
        with pytest.raises(SourceError, match="not a valid safetensors file"):
            _safetensors_header(path)
    good = _raw_safetensors(tmp_path / "good.safetensors", {"a": {"dtype": "F32", "shape": [2, 2],
                                                                  "data_offsets": [0, 16]}},
                            np.arange(4, dtype=np.float32).tobytes())
    start, header = _safetensors_header(good)
    assert header["a"]["shape"] == [2, 2] and start == good.stat().st_size - 16


@pytest.mark.parametrize("name", ["../../secret-00001-of-00001.safetensors", "/etc/passwd",
                                  "diffusion_pytorch_model-00001-of-00002.safetensors/../../x",
                                  "model-00001-of-00001.safetensors"])
def test_a_shard_index_opens_only_shards_of_its_own_copy(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    _raw_safetensors(folder / shard, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    (tmp_path / "secret-00001-of-00001.safetensors").write_bytes(b"elsewhere on the machine")
    index = "diffusion_pytorch_model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"weight_map": {"a": shard, "b": name}}))
    with pytest.raises(SourceError, match="not a shard of this copy"):
        index_shards(folder, index)
    (folder / index).write_text(json.dumps({"weight_map": {"a": shard}}))
    assert index_shards(folder, index) == [shard]


def _push_source(api: HfApi, repo: str, unet_files: dict[str, bytes]) -> None:
    from huggingface_hub import CommitOperationAdd

    files = {"model_index.json": b"{}", "tokenizer/vocab.json": b"{}", "tokenizer/merges.txt": b"#version\n",
             "unet/config.json": b"{}", **{f"unet/{k}": v for k, v in unet_files.items()}}
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, operations=[CommitOperationAdd(path, data) for path, data in files.items()],
                      commit_message="source")


def test_source_downloads_are_checked_against_the_hubs_listing(staging_hub, hf_api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = "attacker/tampered-source"
    weights = _raw_safetensors(tmp_path / "w.safetensors", {"a": {"dtype": "F32", "shape": [256],
                                                                  "data_offsets": [0, 1024]}}, b"\1" * 1024)
    _push_source(hf_api, repo, {"diffusion_pytorch_model.safetensors": weights.read_bytes()})
    fetched = fetch_source(repo, "main", [Component.UNET], tmp_path / "cache", endpoint=staging_hub.url,
                           token=staging_hub.token)
    listed = {f.path: f for f in fetched.files}
    assert all(f.verified for f in fetched.files)
    # every file, git-stored ones too, is on record with the sha256 of the bytes the build loads
    for path, item in listed.items():
        assert item.sha256 == hashlib.sha256((fetched.path / path).read_bytes()).hexdigest(), path
    # the server's blob changes under the same listing: the next fetch (fresh cache) refuses it
    entry = next(e for e in hf_api.list_repo_tree(repo, recursive=True)
                 if isinstance(e, RepoFile) and e.lfs is not None)
    blob = staging_hub.root / "blobs" / entry.lfs.sha256[:2] / entry.lfs.sha256
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + b"\2")
        with pytest.raises(SourceError, match="does not match the checksum the Hub lists"):
            fetch_source(repo, "main", [Component.UNET], tmp_path / "cache2", endpoint=staging_hub.url,
                         token=staging_hub.token)
    finally:
        blob.write_bytes(original)
    # the bad copy was dropped from the cache: the rerun downloads it again and passes
    again = fetch_source(repo, "main", [Component.UNET], tmp_path / "cache2", endpoint=staging_hub.url,
                         token=staging_hub.token)
    assert {f.path: f.sha256 for f in again.files} == {p: f.sha256 for p, f in listed.items()}


def test_a_source_index_pointing_outside_is_refused_at_fetch(staging_hub, hf_api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = "attacker/escaping-index"
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    data = _raw_safetensors(tmp_path / "s.safetensors", {"a": {"dtype": "F32", "shape": [1],
                                                               "data_offsets": [0, 4]}}, b"\0" * 4).read_bytes()
    _push_source(hf_api, repo, {shard: data, "diffusion_pytorch_model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": shard, "b": "../../../../etc/hostname"}}).encode()})
    with pytest.raises(SourceError, match="not a shard of this copy"):
        fetch_source(repo, "main", [Component.UNET], tmp_path / "cache", endpoint=staging_hub.url,
                     token=staging_hub.token)


# -- a lying server ---------------------------------------------------------------------------------------------

COMMIT = "c" * 40


class _Liar(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, tuple[int, Any]]] = {}  # path -> (listed size, body bytes or a writer)
    downloads: ClassVar[list[str]] = []
    hub = True

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if not self.hub:
            body = b"<html>not found</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/api/models/") and "/tree/" in self.path:
            self._json([{"type": "file", "path": path, "size": size, "oid": "0" * 40,
                         "lfs": {"oid": "0" * 64, "size": size, "pointerSize": 130}}
                        for path, (size, _) in self.files.items()])
        elif self.path.startswith("/api/models/"):
            self._json({"id": "liar/repo", "sha": COMMIT, "private": False, "siblings": []})
        elif "/resolve/" in self.path:
            path = self.path.split(f"/resolve/{COMMIT}/", 1)[1]
            self.downloads.append(path)
            _, body = self.files[path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if callable(body):
                body(self.wfile)
            else:
                self.wfile.write(body)
        else:
            self.send_error(404)


@contextlib.contextmanager
def lying_server(files: dict[str, tuple[int, Any]], hub: bool = True) -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Liar,), {"files": files, "downloads": [], "hub": hub})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.downloads
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_is_cut_off_at_its_listed_size(tmp_path: Path) -> None:
    sent = {"bytes": 0}

    def flood(out: Any) -> None:  # 100 MiB for a file listed at 1 KiB
        block = b"x" * (1 << 20)
        with contextlib.suppress(OSError):
            for _ in range(100):
                out.write(block)
                sent["bytes"] += len(block)

    with lying_server({"original/packages/a.bin": (1024, flood)}) as (url, _):
        with pytest.raises(FetchError, match="sent more than the 1024 bytes it lists"):
            fetch_variant("liar/repo", "original/packages", tmp_path / "to", endpoint=url)
    assert not (tmp_path / "to").exists()  # a target this fetch made is removed again
    assert sent["bytes"] < 100 * (1 << 20)  # the client stopped reading


def test_a_huge_listing_is_refused_before_any_download(tmp_path: Path) -> None:
    with lying_server({"original/packages/a.bin": (1_200_000_000_000, b"")}) as (url, downloads):
        with pytest.raises(FetchError, match=r"1200000000000 bytes listed, more than the \d+ allowed \(--max-bytes\)"):
            fetch_variant("liar/repo", "original/packages", tmp_path / "to", endpoint=url)
        assert downloads == []
    assert not (tmp_path / "to").exists()


def test_a_stalling_server_is_given_up_on(tmp_path: Path) -> None:
    stop = threading.Event()

    def trickle(out: Any) -> None:  # a byte at a time, forever (until the test ends)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                out.write(b"x")
                out.flush()
                stop.wait(0.2)

    try:
        with lying_server({"original/packages/a.bin": (10 * 2**20, trickle)}) as (url, _):
            with pytest.raises(FetchError, match="stalled"):
                fetch_variant("liar/repo", "original/packages", tmp_path / "to", endpoint=url, stall_s=1.0)
    finally:
        stop.set()


def test_a_service_that_is_not_a_hub_is_said_so(tmp_path: Path) -> None:
    with lying_server({}, hub=False) as (url, _):
        with pytest.raises(NetworkError) as info:
            fetch_variant("liar/repo", "original/packages", tmp_path / "to", endpoint=url)
    host = url.removeprefix("http://")
    assert str(info.value).startswith(f"listing the files of liar/repo@main at {host}: ")
    assert "is " + host + " a Hub?" in str(info.value)


def test_a_refused_connection_names_the_host_and_the_action(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(NetworkError) as info:
        fetch_variant("org/repo", "original/packages", tmp_path / "to", endpoint=f"http://127.0.0.1:{port}")
    assert str(info.value).startswith(f"listing the files of org/repo@main at 127.0.0.1:{port}: ")
    assert "refused" in str(info.value).lower()
    assert not (tmp_path / "to").exists()


def test_a_second_fetch_into_the_same_folder_waits_its_turn(staging_hub, hf_api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = "tester/locked-fetch"
    hf_api.create_repo(repo, exist_ok=True)
    hf_api.upload_file(path_or_fileobj=b"weights", path_in_repo="original/packages/a.bin", repo_id=repo)
    target = tmp_path / "to"
    target.mkdir()
    # a fetch of the same variant holds the folder (as a running process would)
    (target / ".publisher-fetch").mkdir()
    lock = target / ".publisher-fetch" / f"{hashlib.sha256(b'original/packages').hexdigest()[:16]}.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FetchError, match=r"another fetch of original/packages into .* is running"):
            fetch_variant(repo, "original/packages", target, endpoint=staging_hub.url, token=staging_hub.token)
        assert not (target / "original").exists()
    result = fetch_variant(repo, "original/packages", target, endpoint=staging_hub.url, token=staging_hub.token)
    assert [p.read_bytes() for p in result.files] == [b"weights"]
    assert sorted(p.name for p in target.iterdir()) == ["original"]  # no staging left behind


# -- archives -------------------------------------------------------------------------------------------------

def _zip(path: Path, entries: list[tuple[str, bytes]], compress: bool = False) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate on purpose
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return path


@pytest.mark.parametrize(("entries", "message"), [
    ([("top/a.txt", b"1"), ("top/a.txt", b"2")], "entry 'top/a.txt' appears twice"),
    ([("top/Vocab.json", b"1"), ("top/vocab.json", b"2")], "are one file on a case-insensitive disk"),
    ([("top", b"a file where the folder goes")], "everything must lie in top/"),
    ([("top/zeros.bin", b"\0" * (8 << 20))], "expands"),
])
def test_zips_that_would_not_unpack_as_listed_are_refused(tmp_path: Path, entries: list[tuple[str, bytes]],
                                                          message: str) -> None:
    archive = _zip(tmp_path / "a.zip", entries, compress=True)
    target = tmp_path / "target"
    with pytest.raises(FetchError, match=message):
        safe_extract(archive, target, top_folder="top")
    assert not target.exists()


def test_a_damaged_zip_is_one_line_and_leaves_no_target(staging_hub, hf_api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = "tester/damaged-zip"
    hf_api.create_repo(repo, exist_ok=True)
    good = _zip(tmp_path / "z.zip", [("z/vocab.json", b"{}" * 1000)], compress=True).read_bytes()
    broken = good[:40] + bytes(b ^ 0xFF for b in good[40:80]) + good[80:]
    hf_api.upload_file(path_or_fileobj=broken, path_in_repo="z.zip", repo_id=repo)
    with pytest.raises(FetchError, match=r"z\.zip: a damaged or unsupported zip"):
        fetch_variant(repo, "z.zip", tmp_path / "new", endpoint=staging_hub.url, token=staging_hub.token)
    assert not (tmp_path / "new").exists()


# -- publish ---------------------------------------------------------------------------------------------------

def _fake_build(tmp_path: Path, namespace: str) -> tuple[Any, Path, Path, dict[str, bytes]]:
    """A variant folder as a build leaves it (files and their build-info), without converting anything."""
    from publisher.build_info import BUILD_INFO, BuildInfo, write_build_info
    from publisher.manifest import load_manifests
    from publisher.plan import build_plan
    from tests.helpers import write_manifest

    manifest = write_manifest(tmp_path / "m")
    variant = next(v for v in build_plan(load_manifests([manifest]), namespace).variants
                   if v.repo_id.endswith("coreml-tiny-sd") and v.attention.folder == "original")
    repo_dir = tmp_path / "out" / variant.repo_id
    folder = repo_dir / "original"
    built = {"packages/a.mlpackage/Manifest.json": b"{}", "packages/a.mlpackage/weight.bin": b"w" * 100}
    for name, data in built.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    info = BuildInfo.model_validate({
        "variant": variant.to_json(), "source": {"repo": "tiny/sd", "revision": "main", "commit": COMMIT},
        "manifest": {"name": "tiny-sd", "variant_sha256": "0" * 64}, "tools": {}, "compiled": False,
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in built.items()}})
    write_build_info(folder / BUILD_INFO, info)
    return variant, repo_dir, manifest, built


def test_publish_sends_exactly_what_build_info_lists(staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from publisher.build_info import BUILD_INFO
    from publisher.publish.hub import PublishError, publish_repo

    variant, repo_dir, _, built = _fake_build(tmp_path, "integrity-listed")
    folder = repo_dir / "original"
    api = HfApi(endpoint=staging_hub.url, token=staging_hub.token)
    warnings: list[str] = []

    def publish() -> Any:
        return publish_repo(api, variant.repo_id, repo_dir, [variant], staging_hub.url, say=warnings.append)

    # a secret beside the build is refused, nothing is sent
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    with pytest.raises(PublishError, match=r"original/\.env is in the variant folder but not in build-info.json"):
        publish()
    (folder / ".env").unlink()
    # a listed file replaced by a link to something outside the build is never followed
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"w" * 100)
    (folder / "packages/a.mlpackage/weight.bin").unlink()
    (folder / "packages/a.mlpackage/weight.bin").symlink_to(outside)
    with pytest.raises(PublishError, match="a symbolic link in the build"):
        publish()
    (folder / "packages/a.mlpackage/weight.bin").unlink()
    # a listed file whose bytes changed since the build: refused as the client hashes it
    (folder / "packages/a.mlpackage/weight.bin").write_bytes(b"v" * 100)
    with pytest.raises(PublishError, match="its content changed since it was built"):
        publish()
    (folder / "packages/a.mlpackage/weight.bin").write_bytes(b"w" * 100)
    assert not api.repo_exists(variant.repo_id)  # nothing of the refused attempts went up
    # OS litter is left out with a warning; exactly the listed files (and build-info) go up
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    publish()
    assert any(".DS_Store is not in build-info.json: left out" in w for w in warnings)
    remote = sorted(e.path for e in api.list_repo_tree(variant.repo_id, recursive=True) if isinstance(e, RepoFile))
    assert remote == sorted([".gitattributes", "README.md", f"original/{BUILD_INFO}", *(f"original/{n}" for n in built)])


def test_a_refused_token_names_the_one_the_command_sent(staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from publisher.manifest import load_manifests
    from publisher.publish import PublishOptions, publish

    variant, _, manifest, _ = _fake_build(tmp_path, "integrity-token")
    options = PublishOptions(out=tmp_path / "out", namespace="integrity-token", target="staging", endpoint=staging_hub.url,
                             token="not-the-staging-token", variants=[variant.id])
    with pytest.raises(PublisherError) as info:
        publish(load_manifests([manifest]), options)
    message = str(info.value)
    assert message.startswith(f"publishing {variant.repo_id} at {staging_hub.url.removeprefix('http://')}: ")
    assert "check STAGING_HUB_TOKEN, the token this command sent" in message and "HF_TOKEN" not in \
        message.replace("STAGING_HUB_TOKEN", "")
