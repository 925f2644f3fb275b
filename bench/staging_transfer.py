"""Upload and download a 1 GiB LFS file through the staging Hub on loopback, next to a raw disk copy.

Run by hand (not in CI):  python bench/staging_transfer.py [--size-mib 1024] [--repeat 3]
Prints MiB/s for: raw copy, the unmodified client's floor (`client_floor`), upload (client hash + LFS PUT +
commit), download (hf_hub_download), each the median of
`--repeat` rounds (a fresh random file per round: the Hub would not take the same object twice), and the server's
RSS before and after (peak from /proc/PID/status VmHWM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import staging_client_env, write_random  # noqa: E402


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


SINK = r"""
import socket, sys
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(4)
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = conn.recv(1 << 20)
            if not data:
                break
            buffer += data
        if b"\r\n\r\n" not in buffer:
            break
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        left = length - len(buffer)
        buffer = b""
        view = bytearray(1 << 20)
        while left > 0:
            left -= conn.recv_into(view, min(left, len(view)))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.close()
"""


def client_floor(source: Path, size: int) -> tuple[float, float]:
    """The unmodified client's own floor for an upload on this machine: its sha256 pass over the file (building the
    `CommitOperationAdd`) and its part uploads (`huggingface_hub.lfs._upload_parts_iteratively`, in the staging Hub's
    part size) to a server that only reads and discards, in a process of its own: (hash seconds, send seconds)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import _upload_parts_iteratively

    start = time.perf_counter()
    operation = CommitOperationAdd(path_in_repo="payload.bin", path_or_fileobj=str(source))
    assert operation.upload_info.sha256  # hashed lazily: this is the pass
    hashed = time.perf_counter() - start
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())  # type: ignore[union-attr]
        from publisher.staging.http import MULTIPART_CHUNK

        part = MULTIPART_CHUNK  # the staging Hub's multipart chunk, which the client follows
        urls = [f"http://127.0.0.1:{port}/part/{n}" for n in range(1, -(-size // part) + 1)]
        start = time.perf_counter()
        _upload_parts_iteratively(operation=operation, sorted_parts_urls=urls, chunk_size=part)
        sent = time.perf_counter() - start
    finally:
        sink.kill()
        sink.wait()
    return hashed, sent


def _rounds(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="staging-bench-"))
    port = staging_client_env(work)
    from huggingface_hub import HfApi, hf_hub_download

    from publisher.staging.process import start_staging_hub

    size = args.size_mib * 1024 * 1024
    mib = size / 2**20
    source = work / "payload.bin"
    token = "bench-token"
    raw, up, down, floor = [], [], [], []
    with start_staging_hub(work / "hub", port=port, token=token) as hub:
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo("bench/transfer")
        rss_start, _ = rss_kib(hub.process.pid)
        for round_ in range(args.repeat):
            write_random(source, size)
            start = time.perf_counter()
            shutil.copyfile(source, work / "copy.bin")
            os.sync()
            raw.append(time.perf_counter() - start)
            (work / "copy.bin").unlink()
            hashed, sent = client_floor(source, size)
            floor.append(hashed + sent)
            start = time.perf_counter()
            api.upload_file(path_or_fileobj=str(source), path_in_repo=f"payload{round_}.bin", repo_id="bench/transfer")
            up.append(time.perf_counter() - start)
            start = time.perf_counter()
            path = hf_hub_download("bench/transfer", f"payload{round_}.bin", token=token, cache_dir=work / "cache")
            down.append(time.perf_counter() - start)
            assert Path(path).stat().st_size == size
            shutil.rmtree(work / "cache")
        rss_end, peak = rss_kib(hub.process.pid)
    raw_s, up_s, down_s, floor_s = (statistics.median(times) for times in (raw, up, down, floor))
    print(f"file: {mib:.0f} MiB, median of {args.repeat} rounds")
    print(f"raw disk copy : {raw_s:6.2f} s  {mib / raw_s:7.1f} MiB/s  (rounds: {_rounds(raw)})")
    print(f"client floor  : {floor_s:6.2f} s  (its sha256 pass + the bytes through its HTTP session to a discarding "
          f"server; rounds: {_rounds(floor)})")
    print(f"upload        : {up_s:6.2f} s  {mib / up_s:7.1f} MiB/s  ({up_s / floor_s:.2f}x the client floor, "
          f"{raw_s / up_s:.2f}x raw copy; includes the client's sha256 pass; rounds: {_rounds(up)})")
    # the floor of each round is measured right before its upload, under the same load: the ratio of the two
    # is steadier than the ratio of medians on a machine whose speed drifts
    ratios = [u / f for u, f in zip(up, floor, strict=True)]
    print(f"upload/floor  : {statistics.median(ratios):6.2f}x  median of the rounds' own ratios "
          f"(rounds: {_rounds(ratios)}); best upload / best floor {min(up) / min(floor):.2f}x")
    print(f"download      : {down_s:6.2f} s  {mib / down_s:7.1f} MiB/s  ({raw_s / down_s:.2f}x raw copy; "
          f"rounds: {_rounds(down)})")
    print(f"server RSS    : start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB "
          f"(growth {(peak - rss_start) / 1024:.1f} MiB)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
