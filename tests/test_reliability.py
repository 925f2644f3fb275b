"""Reliability and security: bad manifests, injected Hub faults, kills, races, secrets, safe downloads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from publisher.cli import main
from publisher.engine.build import BuildOptions, build
from publisher.fetch import FetchError, fetch_variant, safe_extract
from publisher.manifest import load_manifests
from publisher.plan import build_plan
from publisher.publish.hub import PublishError, publish_repo
from publisher.staging.process import start_staging_hub
from publisher.store import BuildStore
from tests.helpers import seed_store, write_manifest

pytestmark = pytest.mark.slow  # converts, builds or publishes models

BAD = Path(__file__).parent / "bad_manifests"
VARIANT = "rel/coreml-tiny-sd/original"


def _expected() -> dict[str, str]:
    rows = (line.split("\t", 1) for line in (BAD / "expected.tsv").read_text().splitlines())
    return {name: text for name, text in rows}


@pytest.mark.parametrize("name", sorted(_expected()))
def test_bad_manifest_is_one_line_and_nothing_happens(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = BAD / name
    expected = _expected()[name].replace("F:", f"error: {path}:", 1)
    for command in (["validate", str(path)], ["build", str(path), "--no-compile", "--out", str(tmp_path / "out"),
                                              "--store", str(tmp_path / "store")],
                    ["publish", str(path), "--out", str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        captured = capsys.readouterr()
        assert exit_info.value.code == 1
        assert captured.err.splitlines() == [expected], command
        assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()  # nothing built


def test_corpus_is_large_and_covers_the_kinds() -> None:
    names = sorted(_expected())
    assert len(names) >= 30
    assert {"yaml", "empty", "unknown", "nbits", "repo", "huge", "utf8", "duplicate"} <= {
        kind for kind in ("yaml", "empty", "unknown", "nbits", "repo", "huge", "utf8", "duplicate")
        if any(kind in n for n in names)}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, staging_hub, two_repo_build):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("reliability")
    manifest = write_manifest(work / "manifests")
    seed_store(two_repo_build, work / "store")  # the conversions are the build tests' (only the assembly runs here)
    options = BuildOptions(out=work / "out", store=work / "store", namespace="rel", compile=False,
                           endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False,
                           variants=[VARIANT])
    result = build(load_manifests([manifest]), options)
    assert result.ok
    return work, manifest, options


def _variant(manifest: Path):  # type: ignore[no-untyped-def]
    return next(v for v in build_plan(load_manifests([manifest]), "rel").variants if v.id == VARIANT)


def _remote_state(api: HfApi, repo: str) -> dict[str, str]:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        entries = list(api.list_repo_tree(repo, recursive=True))
    except RepositoryNotFoundError:  # the publish stopped before creating it: nothing is visible
        return {}
    return {e.path: (e.lfs.sha256 if e.lfs else e.blob_id) for e in entries
            if isinstance(e, RepoFile) and e.path.startswith("original/")}


def _local_state(repo_dir: Path) -> dict[str, str]:
    state = {}
    for path in sorted((repo_dir / "original").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            rel = path.relative_to(repo_dir).as_posix()
            state[rel] = hashlib.sha256(data).hexdigest() if path.name in ("weight.bin", "model.mlmodel") \
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return state


def test_injected_faults_never_leave_a_mix(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, manifest, _ = built
    variant = _variant(manifest)
    repo_dir = work / "out" / "rel" / "coreml-tiny-sd"
    new = _local_state(repo_dir)
    rng = random.Random(20261126)
    kinds = ["create_repo", "repo_info", "tree", "preupload", "lfs_batch", "lfs_put", "commit", "validate_yaml"]
    series = []
    for trial in range(6):
        plan = {kind: [[rng.randint(1, 2), rng.choice([500, 429, 503, "drop"])]] for kind in rng.sample(kinds, 2)}
        root = tmp_path / f"hub{trial}"
        with start_staging_hub(root, token="t", env={"PUBLISHER_STAGING_FAULTS": json.dumps(plan)}) as hub:
            api = HfApi(endpoint=hub.url, token="t")
            outcome = "published"
            try:
                publish_repo(api, variant.repo_id, repo_dir, [variant], hub.url, backoff_s=0.2)
            except PublishError as exc:
                outcome = f"stopped: {exc}"
            state = _remote_state(api, variant.repo_id)
            assert state in ({}, new), f"a mix is visible after {plan}"
            publish_repo(api, variant.repo_id, repo_dir, [variant], hub.url, backoff_s=0.2)  # converges
            assert _remote_state(api, variant.repo_id) == new
            again = publish_repo(api, variant.repo_id, repo_dir, [variant], hub.url, backoff_s=0.2)
            assert again.commits == []
            request = urllib.request.Request(f"{hub.url}/api/staging/stats", headers={"Authorization": "Bearer t"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                seen = json.loads(answer.read())["requests"]
            fired = sum(seen.get(kind, 0) >= nth for kind, faults in plan.items() for nth, _ in faults)
        series.append((plan, outcome, fired))
    fired = sum(f for _, _, f in series)
    print(f"fault series: {len(series)} trials, {fired} faults fired, outcomes: "
          f"{sum(o == 'published' for _, o, _ in series)} published after retries, "
          f"{sum(o != 'published' for _, o, _ in series)} stopped cleanly; all converged on rerun")
    # the series proves something only if faults were hit: a plan aimed at requests a publish never makes would not
    assert fired >= 6


def test_two_publishers_race(built, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, manifest, options = built
    variant = _variant(manifest)
    # a second build of the same variant with other settings: different build-info, same packages
    other_manifest = tmp_path / "m" / "tiny-sd.yaml"
    other_manifest.parent.mkdir()
    other_manifest.write_text(manifest.read_text().replace(
        "    layouts: [packages]\n  - repo", "    compute_units: {ORIGINAL: CPU_AND_NE}\n    layouts: [packages]\n"
        "  - repo", 1))
    other = build(load_manifests([other_manifest]), BuildOptions(**{**options.__dict__, "out": tmp_path / "out2"}))
    assert other.ok
    other_variant = _variant(other_manifest)
    dirs = [work / "out" / variant.repo_id, tmp_path / "out2" / variant.repo_id]
    barrier = threading.Barrier(2, timeout=60)
    results: dict[int, object] = {}

    class RacingApi(HfApi):
        def create_commit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            barrier.wait()  # both have read the same head before either commits
            return super().create_commit(*args, **kwargs)

    def run(index: int) -> None:
        api = RacingApi(endpoint=staging_hub.url, token=staging_hub.token)
        try:
            results[index] = publish_repo(api, variant.repo_id, dirs[index], [[variant, other_variant][index]],
                                          staging_hub.url, backoff_s=0.2)
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert len(errors) == 1, results
    assert isinstance(errors[0], PublishError)
    assert "changed while publishing (another publisher committed first)" in str(errors[0])
    loser = next(i for i, r in results.items() if isinstance(r, Exception))
    api = HfApi(endpoint=staging_hub.url, token=staging_hub.token)
    assert _remote_state(api, variant.repo_id) == _local_state(dirs[1 - loser])  # the winner, whole
    rerun = publish_repo(api, variant.repo_id, dirs[loser], [[variant, other_variant][loser]], staging_hub.url)
    assert len(rerun.commits) == 1
    assert _remote_state(api, variant.repo_id) == _local_state(dirs[loser])


def test_token_never_leaks(built, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, manifest, _options = built
    sentinel = staging_hub.token
    env = {**os.environ, "STAGING_HUB_TOKEN": sentinel, "PUBLISHER_SOURCE_ENDPOINT": staging_hub.url}
    base = [sys.executable, "-m", "publisher"]
    outputs = []
    commands = [
        ["build", str(manifest), "--no-compile", "--namespace", "rel", "--variant", VARIANT,
         "--out", str(work / "out"), "--store", str(work / "store")],
        ["publish", str(manifest), "--namespace", "rel", "--variant", VARIANT, "--out", str(work / "out"),
         "--endpoint", staging_hub.url],
        ["status", str(manifest), "--namespace", "rel", "--endpoint", staging_hub.url],
        ["fetch", "rel/coreml-tiny-sd", "--variant", "original/packages", "--to", str(tmp_path / "fetched"),
         "--endpoint", staging_hub.url],
        ["publish", str(manifest), "--namespace", "rel", "--out", str(work / "out"), "--endpoint",
         "http://127.0.0.1:9"],  # fails: the error text must not carry the token either
        ["--debug", "fetch", "rel/no-such-repo", "--variant", "x", "--to", str(tmp_path / "x"), "--endpoint",
         staging_hub.url],
    ]
    for command in commands:
        result = subprocess.run(base + command, env=env, capture_output=True, text=True, timeout=600)
        outputs.append(result.stdout + result.stderr)
    assert "error:" in outputs[4] and "Traceback" in outputs[5]  # the failures did fail, with their texts
    scanned = 0
    for root in (work / "out", work / "store" / "objects", tmp_path / "fetched"):
        for path in root.rglob("*"):
            if (path.is_file() and path.suffix in (".json", ".md", ".txt", "")) or path.name == "README.md":
                outputs.append(path.read_text(errors="replace"))
                scanned += 1
    outputs.append(staging_hub.log.read_text(errors="replace"))
    assert scanned > 10
    for text in outputs:
        assert sentinel not in text


class _Listener:
    """A plain socket server that answers every request 404 and keeps every byte it received."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.received += data
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass


def test_real_hub_token_never_goes_to_another_endpoint(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """HF_TOKEN is for huggingface.co only: publish, dry runs, status, fetch and the source fetch of a build send
    nothing of it to a listener standing where the staging Hub would be; STAGING_HUB_TOKEN does reach it."""
    work, manifest, _ = built
    listener = _Listener()
    real = "hf_realtokenSENTINEL0123456789"
    env = {k: v for k, v in os.environ.items() if k != "STAGING_HUB_TOKEN"}
    env.update(HF_TOKEN=real, PUBLISHER_SOURCE_ENDPOINT=listener.url)
    base = [sys.executable, "-m", "publisher"]
    commands = [
        ["publish", str(manifest), "--namespace", "rel", "--out", str(work / "out"), "--endpoint", listener.url,
         "--dry-run"],
        ["publish", str(manifest), "--namespace", "rel", "--out", str(work / "out"), "--endpoint", listener.url],
        ["status", str(manifest), "--namespace", "rel", "--endpoint", listener.url],
        ["fetch", "rel/coreml-tiny-sd", "--variant", "original/packages", "--to", str(tmp_path / "f"),
         "--target", "staging", "--endpoint", listener.url],
        ["build", str(manifest), "--no-compile", "--namespace", "other", "--out", str(tmp_path / "o"),
         "--store", str(tmp_path / "s")],
    ]
    for command in commands:
        subprocess.run(base + command, env=env, capture_output=True, text=True, timeout=300)
    assert listener.received.count(b"\r\n\r\n") >= len(commands)  # every command did call the listener
    assert real.encode() not in listener.received
    # the check can fail: the staging token does travel to the same listener
    env["STAGING_HUB_TOKEN"] = "staging-SENTINEL-42"
    subprocess.run(base + commands[2], env=env, capture_output=True, text=True, timeout=300)
    assert b"Bearer staging-SENTINEL-42" in listener.received
    assert real.encode() not in listener.received


def test_fetch_verifies_and_refuses_tampering(built, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, manifest, _ = built
    variant = _variant(manifest)
    api = HfApi(endpoint=staging_hub.url, token=staging_hub.token)
    publish_repo(api, variant.repo_id, work / "out" / variant.repo_id, [variant], staging_hub.url)
    result = fetch_variant(variant.repo_id, "original/packages", tmp_path / "ok", endpoint=staging_hub.url,
                           token=staging_hub.token)
    assert len(result.files) >= 12  # 4 packages (no safety checker at 256) x 3 files
    built_files = {p.relative_to(work / "out" / variant.repo_id).as_posix(): p.read_bytes()
                   for p in (work / "out" / variant.repo_id / "original" / "packages").rglob("*") if p.is_file()}
    assert {p.relative_to(tmp_path / "ok").as_posix(): p.read_bytes() for p in result.files} == built_files
    # tamper with one stored blob on the Hub's disk: the download no longer matches the Hub's own metadata
    weight = next(e for e in api.list_repo_tree(variant.repo_id, recursive=True)
                  if isinstance(e, RepoFile) and e.lfs and e.path.endswith("weight.bin"))
    blob = staging_hub.root / "blobs" / weight.lfs.sha256[:2] / weight.lfs.sha256
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(FetchError, match="does not match the Hub's"):
        fetch_variant(variant.repo_id, "original/packages", tmp_path / "bad", endpoint=staging_hub.url,
                      token=staging_hub.token)
    assert not (tmp_path / "bad").exists()  # all or nothing: no verified half of the variant is left behind
    (tmp_path / "ok" / "keep.txt").write_text("mine")
    with pytest.raises(FetchError, match="does not match the Hub's"):  # into a folder holding the good copy
        fetch_variant(variant.repo_id, "original/packages", tmp_path / "ok", endpoint=staging_hub.url,
                      token=staging_hub.token)
    assert {p.relative_to(tmp_path / "ok").as_posix(): p.read_bytes() for p in result.files} == built_files
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["keep.txt", "original"]
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    env = {**os.environ, "STAGING_HUB_TOKEN": staging_hub.token}
    missing = subprocess.run([sys.executable, "-m", "publisher", "fetch", variant.repo_id, "--variant", "nothing",
                              "--to", str(tmp_path / "n"), "--endpoint", staging_hub.url],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.startswith(f"error: {variant.repo_id}@")


def _zip_bytes(entries: dict[str, bytes | None], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            if data is None:
                archive.writestr(zipfile.ZipInfo(name), b"")
            else:
                archive.writestr(name, data)
    return buffer.getvalue()


def test_fetch_of_a_zip_owns_only_its_paths(hf_api, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = "tester/zips"
    hf_api.create_repo(repo, exist_ok=True)
    top = "zips_original_compiled"
    cases = {
        "good": _zip_bytes({f"{top}/vocab.json": b"{}", f"{top}/Unet.mlmodelc/coremldata.bin": b"x" * 10}),
        "cache": _zip_bytes({f"{top}/vocab.json": b"{}", ".cache/huggingface/x": b"wipe"}),
        "clash": _zip_bytes({f"{top}/a": b"file", f"{top}/a/b": b"inside"}),
        # small on the wire (its listed size passes --max-bytes), large unpacked
        "bomb": _zip_bytes({f"{top}/zeros.bin": b"\0" * 3_000_000}, zipfile.ZIP_DEFLATED),
    }
    target = tmp_path / "to"
    (target / ".cache").mkdir(parents=True)
    (target / ".cache" / "keep").write_text("download metadata")
    (target / top).mkdir()
    (target / top / "old.txt").write_text("the previous good copy")
    expected = {
        "cache": "refusing entry '.cache/huggingface/x' (everything must lie in zips_original_compiled/)",
        "clash": "'zips_original_compiled/a' is both a file and a folder in the archive",
        "bomb": "3000000 bytes uncompressed, more than the 1000000 allowed",
    }
    for name, message in expected.items():
        hf_api.upload_file(path_or_fileobj=cases[name], path_in_repo=f"{top}.zip", repo_id=repo)
        with pytest.raises(FetchError, match=re.escape(message)):
            fetch_variant(repo, f"{top}.zip", target, endpoint=staging_hub.url, token=staging_hub.token,
                          max_bytes=1_000_000)
        assert sorted(p.name for p in target.iterdir()) == [".cache", top]  # untouched
        assert (target / ".cache" / "keep").read_text() == "download metadata"
        assert [p.name for p in (target / top).iterdir()] == ["old.txt"]
    assert not list(tmp_path.glob(".extract-*"))
    hf_api.upload_file(path_or_fileobj=cases["good"], path_in_repo=f"{top}.zip", repo_id=repo)
    result = fetch_variant(repo, f"{top}.zip", target, endpoint=staging_hub.url, token=staging_hub.token)
    assert result.extracted == target / top
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        ".cache/keep", f"{top}.zip", f"{top}/Unet.mlmodelc/coremldata.bin", f"{top}/vocab.json"]


@pytest.mark.parametrize(("entry", "message"), [
    ("../evil.txt", "would land outside"), ("/abs/evil.txt", "would land outside"),
    ("ok/../../evil.txt", "would land outside"), ("C:/evil.txt", "would land outside"),
    ("link", "symbolic link")])
def test_unsafe_zip_entries_are_refused(tmp_path: Path, entry: str, message: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("repo_original_compiled/vocab.json", "{}")
        info = zipfile.ZipInfo(entry)
        if entry == "link":
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
        else:
            archive.writestr(info, "x")
    path = tmp_path / "a.zip"
    path.write_bytes(buffer.getvalue())
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(FetchError, match=message):
        safe_extract(path, target)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_kill_series_then_complete(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    manifest = write_manifest(tmp_path / "manifests")
    env = {**os.environ, "STAGING_HUB_TOKEN": staging_hub.token, "PUBLISHER_SOURCE_ENDPOINT": staging_hub.url}
    command = [sys.executable, "-m", "publisher", "build", str(manifest), "--no-compile", "--namespace", "rel",
               "--variant", VARIANT, "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]
    kills = 0
    tmp = tmp_path / "store" / "tmp"
    for _ in range(3):
        # killed in the middle of a step: as soon as the build has a step's output half-written in the store
        before = set(tmp.iterdir()) if tmp.exists() else set()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        while process.poll() is None and not (tmp.exists() and set(tmp.iterdir()) - before):
            time.sleep(0.05)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    store = BuildStore(tmp_path / "store")
    keys = [p.name for p in store.objects.glob("*/*") if p.is_dir()]
    assert keys and all(store.get(key) is not None for key in keys)  # every stored output hashes right
    print(f"kill series: {kills} kills, {len(keys)} stored outputs verified after the final run")
    assert kills == 3  # each run was killed inside a step (a run that finished first would be a test bug)


def _http_error(status: int, headers: dict[str, str] | None = None) -> BaseException:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "http://127.0.0.1:9/api/models/a/b/commit/main")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, headers=headers or {}, request=request))


def test_only_transient_failures_are_retried() -> None:
    import httpx2

    from publisher.publish.hub import PublishError, is_transient, retry_after

    for transient in (_http_error(503), _http_error(429), _http_error(500), httpx2.ConnectError("refused"),
                      httpx2.ReadTimeout("slow"), ConnectionResetError("reset")):
        assert is_transient(transient), transient
    for final in (_http_error(404), _http_error(401), _http_error(412), FileNotFoundError("x.mlpackage"),
                  PermissionError("denied"), IsADirectoryError("a dir"), ValueError("bad")):
        assert not is_transient(final), final
    wrapped = PublishError("commit failed (503)", transient=True)
    wrapped.__cause__ = _http_error(503, {"Retry-After": "7"})
    assert retry_after(wrapped) == 7.0
    assert retry_after(_http_error(429, {"Retry-After": "100000"})) == 300.0  # capped
    assert retry_after(_http_error(503)) is None


def test_a_bug_says_it_is_one(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Expected failures (bad input, files, network) are one line; an unexpected exception says it is a bug."""
    import publisher.cli.manifests as manifests_cli

    def broken(*_: object, **__: object) -> None:
        raise KeyError("variant")

    monkeypatch.setattr(manifests_cli, "load_manifests", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "manifests"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("error: internal error (a bug in coreml-publisher, not in your input): KeyError: 'variant'")
    assert "--debug" in err and "Traceback" not in err

    def unreachable(*_: object, **__: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", "x.yaml")

    monkeypatch.setattr(manifests_cli, "load_manifests", unreachable)
    with pytest.raises(SystemExit):
        main(["validate", "manifests"])
    err = capsys.readouterr().err
    assert err.startswith("error: FileNotFoundError: ") and "internal error" not in err
