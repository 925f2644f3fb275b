"""The macOS job's verification path at full size: a stored reference, no PyTorch model.

Run by hand (not in CI; ~5 minutes):  python bench/verify_stored.py [--source DIR --package PKG]
Without arguments it makes a random-weight SD 1.5-shaped UNet, converts it (ORIGINAL attention) and, in its own
process, computes the stored reference as the build's verify step does (PyTorch, on Linux). Then, each in a fresh
process, `compare` runs the package against that stored reference with (1) a stand-in runtime that only returns
the stored outputs (the path's own cost: what is left of a 7 GB macOS runner for Core ML) and (2) the executor;
each prints its peak RSS and whether torch, diffusers or transformers were imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import full_size_unet_package, peak_gib, run_child  # noqa: E402


def make_reference(source: Path, package: Path, out: Path) -> None:
    from publisher.verify.fidelity import compute_reference
    from publisher.vocabulary import Attention

    start = time.perf_counter()
    compute_reference(package, source, "unet", Attention.ORIGINAL, 512).save(out)
    print(json.dumps({"mode": "reference", "seconds": round(time.perf_counter() - start, 1),
                      "peak_gib": round(peak_gib(), 2), "mib": round(out.stat().st_size / 2**20, 1)}))


class StoredOutputs:
    """Returns the reference's own outputs: the path minus any model."""

    name = "stand-in"

    def __init__(self, reference: object) -> None:
        self.reference = reference

    def run(self, package: Path, inputs: object) -> dict:
        return dict(self.reference.outputs)  # type: ignore[attr-defined]


def check(mode: str, package: Path, reference_path: Path) -> None:
    from publisher.verify.fidelity import Reference, compare
    from publisher.verify.runtime import ExecutorRuntime

    start = time.perf_counter()
    reference = Reference.load(reference_path)
    runtime = StoredOutputs(reference) if mode == "stand-in" else ExecutorRuntime()
    result = compare(package, reference, runtime)
    print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - start, 1),
                      "peak_gib": round(peak_gib(), 2), "min_psnr_db": round(result.min_psnr_db, 1),
                      "imported": sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--child", choices=["reference", "stand-in", "executor"])
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    if args.child == "reference":
        make_reference(args.source, args.package, args.reference)
        return
    if args.child:
        check(args.child, args.package, args.reference)
        return
    work = Path(tempfile.mkdtemp(prefix="verify-stored-bench-"))
    source, package = full_size_unet_package(work, args.source, args.package)
    reference = work / "reference.npz"
    common = ["--source", str(source), "--package", str(package), "--reference", str(reference)]
    for mode in ("reference", "stand-in", "executor"):
        print(run_child(__file__, ["--child", mode, *common], mode), flush=True)


if __name__ == "__main__":
    main()
