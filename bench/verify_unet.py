"""Execute a full-size SD 1.5- (or SDXL-) shaped UNet package with the reference executor, next to one PyTorch CPU
forward.

Run by hand (not in CI):  python bench/verify_unet.py [--source DIR --package PKG] [--family sdxl]
Without arguments it makes a random-weight SD 1.5 UNet and converts it first (ORIGINAL attention). Each side runs in
its own process; both print wall time and peak RSS, and the PSNR between them is printed (>= 35 dB expected).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import full_size_unet_package, peak_gib, run_child  # noqa: E402


def child(mode: str, source: Path, package: Path, out: Path, family: str) -> None:
    import torch

    from publisher.convert.components import example_inputs, load_component
    from publisher.family import family_named
    from publisher.vocabulary import Attention, Component

    resolution = 1024 if family == "sdxl" else 512
    model_family = family_named(family)
    spec = model_family.model_spec(Component.UNET, model_family.dims(source, resolution))
    inputs = example_inputs(spec)
    start = time.perf_counter()
    if mode == "torch":
        loaded = load_component(source, Component.UNET, Attention.ORIGINAL, resolution, family=family)
        start = time.perf_counter()
        with torch.no_grad():
            result = loaded.module(*inputs).numpy()
    else:
        from publisher.mlpackage import load_program
        from publisher.verify.executor import run_program

        program = load_program(package)  # like the model load on the PyTorch side, not timed
        start = time.perf_counter()
        result = run_program(program, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
                             )["noise_pred"]
    seconds = time.perf_counter() - start
    np.save(out, result)
    print(json.dumps({"mode": mode, "seconds": round(seconds, 1), "peak_gib": round(peak_gib(), 2)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--child", choices=["torch", "executor"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.source, args.package, args.out, args.family)
        return
    work = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    source, package = full_size_unet_package(work, args.source, args.package)
    results = {}
    for mode in ("torch", "executor"):
        results[mode] = run_child(__file__, ["--child", mode, "--source", str(source), "--package", str(package),
                                             "--out", str(work / f"{mode}.npy"), "--family", args.family], mode)
        print(results[mode], flush=True)
    from publisher.metrics import psnr

    value = psnr(np.load(work / "torch.npy"), np.load(work / "executor.npy"))
    t, e = results["torch"], results["executor"]
    print(f"PyTorch forward : {t['seconds']:7.1f} s  peak {t['peak_gib']:.2f} GiB")
    print(f"executor        : {e['seconds']:7.1f} s  peak {e['peak_gib']:.2f} GiB")
    print(f"ratio executor/PyTorch: {e['seconds'] / t['seconds']:.2f}x (goal <= 3x); PSNR {value:.1f} dB")


if __name__ == "__main__":
    main()
