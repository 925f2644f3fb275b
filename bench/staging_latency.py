"""Other clients' latency while one client attacks the staging Hub: each attack of "Staging Hub, round three" runs
in a thread while a probe client asks for a small repo's info every 20 ms on its own connection.

Run by hand (not in CI):  python bench/staging_latency.py [--work DIR] [--files 3000] [--tree-files 110000]
Prints, per attack: its own wall time, the probes answered during it, and their median and worst latency.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import staging_client_env, write_random  # noqa: E402

TOKEN = "bench-token"


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 600) -> tuple[int, bytes]:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def commit_body(lines: list[dict]) -> bytes:
    header = {"key": "header", "value": {"summary": "bench", "description": ""}}
    return b"\n".join(json.dumps(line).encode() for line in [header, *lines])


def add_files(url: str, repo: str, count: int, prefix: str) -> None:
    lines = [{"key": "file", "value": {"path": f"{prefix}/{i:06d}.txt", "encoding": "base64",
                                       "content": base64.b64encode(f"{prefix} {i}".encode()).decode()}}
             for i in range(count)]
    status, data = request(url, "POST", f"/api/models/{repo}/commit/main", commit_body(lines),
                           {"Content-Type": "application/x-ndjson"})
    assert status == 200, data[:300]


def measure(url: str, name: str, attack: Callable[[], object]) -> None:
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            status, _ = request(url, "GET", "/api/models/bench/probe")
            assert status == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    start = time.perf_counter()
    prober.start()
    try:
        attack()
    finally:
        wall = time.perf_counter() - start
        done.set()
        prober.join()
    worst = max(latencies) if latencies else float("nan")
    middle = statistics.median(latencies) if latencies else float("nan")
    print(f"{name:<34} attack {wall:7.2f} s | probes {len(latencies):4d} | median {middle * 1000:7.1f} ms | "
          f"worst {worst * 1000:8.1f} ms", flush=True)


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--tree-files", type=int, default=110_000)
    parser.add_argument("--upload-mib", type=int, default=1024)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="staging-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    port = staging_client_env(work)
    from publisher.staging.process import start_staging_hub

    with start_staging_hub(work / "hub", port=port, token=TOKEN) as hub:
        url = hub.url
        for repo in ("bench/probe", "bench/big", "bench/tree"):
            request(url, "POST", "/api/repos/create", json.dumps({"name": repo.split("/")[1],
                                                                  "organization": "bench"}).encode())
        measure(url, f"commit of {args.files} files", lambda: add_files(url, "bench/big", args.files, "many"))

        def delete_all() -> None:
            lines = [{"key": "deletedFile", "value": {"path": f"many/{i:06d}.txt"}} for i in range(args.files)]
            status, data = request(url, "POST", "/api/models/bench/big/commit/main", commit_body(lines),
                                   {"Content-Type": "application/x-ndjson"})
            assert status == 200, data[:300]

        measure(url, f"delete of {args.files} files", delete_all)
        chunk = 10_000
        for start in range(0, args.tree_files, chunk):
            add_files(url, "bench/tree", min(chunk, args.tree_files - start), f"part{start // chunk:03d}")
        measure(url, f"tree page of {args.tree_files} files",
                lambda: request(url, "GET", "/api/models/bench/tree/tree/main?recursive=true"))
        measure(url, "second tree page (same listing)",
                lambda: request(url, "GET", "/api/models/bench/tree/tree/main?recursive=true&cursor=1000"))
        form = "&".join(f"paths=part000/{i:06d}.txt" for i in range(1000)).encode()
        measure(url, f"paths-info, 1000 paths of {args.tree_files}",
                lambda: request(url, "POST", "/api/models/bench/tree/paths-info/main", form,
                                {"Content-Type": "application/x-www-form-urlencoded"}))
        measure(url, f"repo info of {args.tree_files} files",
                lambda: request(url, "GET", "/api/models/bench/tree"))
        bomb = ["a0: &a0 [{name: 1, results: [{task: 1, dataset: 1, metrics: [1]}]}]"]
        bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        card = "---\n" + "\n".join(bomb) + "\nmodel-index: *a8\n---\n"
        measure(url, "validate-yaml alias bomb", lambda: request(url, "POST", "/api/validate-yaml",
                                                                 json.dumps({"content": card}).encode(),
                                                                 {"Content-Type": "application/json"}))

        big = [f"key_{i}: [a, b, {{c: d, e: [1, 2, 3]}}]" for i in range(6000)]
        measure(url, "validate-yaml 256 KiB card", lambda: request(url, "POST", "/api/validate-yaml", json.dumps(
            {"content": "---\n" + "\n".join(big) + "\n---\n"}).encode(), {"Content-Type": "application/json"}))

        def slowloris() -> None:
            host, port_ = urlparse(url).hostname, urlparse(url).port
            socks = []
            for _ in range(1000):
                sock = socket.create_connection((host, port_))
                sock.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(sock)
            time.sleep(3)
            for sock in socks:
                sock.close()

        measure(url, "1000 half-sent requests (3 s)", slowloris)

        # an upload through the unmodified client: its parts' bodies are read raw and hashed off the event loop
        from huggingface_hub import HfApi

        payload = work / "payload.bin"
        write_random(payload, args.upload_mib * 1024 * 1024)
        api = HfApi(endpoint=url, token=TOKEN)
        measure(url, f"upload of {args.upload_mib} MiB (LFS parts)", lambda: api.upload_file(
            path_or_fileobj=str(payload), path_in_repo="payload.bin", repo_id="bench/big"))
        payload.unlink()


if __name__ == "__main__":
    main()
