"""Zip a ~2 GiB Resources-shaped folder the way the build does and compare with a raw copy of the same files.

Run by hand (not in CI):  python bench/zip_resources.py [--gib 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from publisher.layout import write_zip  # noqa: E402

# relative sizes of an SD 1.5 Resources folder (float16): UNet dominates
SHARES = {"Unet.mlmodelc": 0.72, "TextEncoder.mlmodelc": 0.11, "VAEDecoder.mlmodelc": 0.045,
          "VAEEncoder.mlmodelc": 0.032, "SafetyChecker.mlmodelc": 0.093}


def make_resources(root: Path, total: int) -> None:
    block = os.urandom(16 * 1024 * 1024)
    for name, share in SHARES.items():
        folder = root / name / "weights"
        folder.mkdir(parents=True)
        remaining = int(total * share)
        with open(folder / "weight.bin", "wb") as handle:
            while remaining > 0:
                handle.write(block[: min(remaining, len(block))])
                remaining -= len(block)
        for small in ("model.mil", "coremldata.bin", "metadata.json"):
            (root / name / small).write_bytes(os.urandom(20_000))
    (root / "vocab.json").write_bytes(os.urandom(800_000))
    (root / "merges.txt").write_bytes(os.urandom(500_000))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zip-bench-"))
    resources = work / "compiled"
    make_resources(resources, int(args.gib * 2**30))
    size = sum(p.stat().st_size for p in resources.rglob("*") if p.is_file())
    # this disk's write-back speed swings from one run to the next: alternate the two (and which goes first), take
    # medians, time each to the end of os.sync() so that both pay for their writes, and delete each output (synced)
    # before the next timing, so that both write into the same free space (a zip timed while a 2 GiB copy still
    # sat on the disk was measured 2x slower than one timed after deleting it)
    def timed(run: Callable[[Path], None], target: Path) -> float:
        os.sync()
        start = time.perf_counter()
        run(target)
        os.sync()
        elapsed = time.perf_counter() - start
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.sync()
        return elapsed

    def copy(target: Path) -> None:
        shutil.copytree(resources, target)

    def zip_(target: Path) -> None:
        write_zip(resources, target, "repo_original_compiled")

    copies, zips = [], []
    for round_ in range(args.rounds):
        if round_ % 2 == 0:
            copies.append(timed(copy, work / "copy"))
            zips.append(timed(zip_, work / "resources.zip"))
        else:
            zips.append(timed(zip_, work / "resources.zip"))
            copies.append(timed(copy, work / "copy"))
    copy_s, zip_s = statistics.median(copies), statistics.median(zips)
    mib = size / 2**20
    print(f"folder: {mib:.0f} MiB, {args.rounds} rounds (copy and zip alternating, each first in turn)")
    print(f"raw copy: median {copy_s:6.2f} s  {mib / copy_s:7.1f} MiB/s  (runs: {', '.join(f'{t:.2f}' for t in copies)})")
    print(f"zip     : median {zip_s:6.2f} s  {mib / zip_s:7.1f} MiB/s  (runs: {', '.join(f'{t:.2f}' for t in zips)})")
    print(f"zip / raw copy throughput: {copy_s / zip_s:.2f}x (goal >= 0.8x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
