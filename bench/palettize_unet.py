"""6-bit palettization of a full-size SD 1.5-shaped UNet package: stock coremltools vs the project's palettizer.

Run by hand (not in CI):  python bench/palettize_unet.py PACKAGE.mlpackage
(a float16 UNet package, e.g. the one bench/convert_unet.py leaves in its work folder, or made with
`--make` which converts one first). Each palettizer runs in its own process; both reports are compared LUT by LUT.
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

from bench._common import peak_gib, run_child  # noqa: E402


def run_stock(source: Path, output: Path) -> None:
    from publisher.mlpackage import import_coremltools

    ct = import_coremltools()
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    model = ct.models.MLModel(str(source), skip_model_load=True)
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=6, weight_threshold=2048))
    palettize_weights(model, config).save(str(output))


def run_project(source: Path, output: Path) -> None:
    from publisher.compress.palettize import PalettizeConfig, palettize_package

    palettize_package(source, output, PalettizeConfig(6), progress=False)


def child(mode: str, source: Path, output: Path) -> None:
    start = time.perf_counter()
    (run_stock if mode == "stock" else run_project)(source, output)
    print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - start, 1), "peak_gib": round(peak_gib(), 2)}))


def luts(package: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from publisher.compress.palettize import read_palettized_weights

    # stock coremltools names the palettized op after the weight plus "_palettized"
    return {name.removesuffix("_palettized"): (lut.reshape(-1), dense)
            for name, (lut, _, dense) in read_palettized_weights(package).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package", type=Path, nargs="?")
    parser.add_argument("--child", choices=["stock", "project"])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.package, args.output)
        return
    work = Path(tempfile.mkdtemp(prefix="palettize-bench-"))
    results = {}
    for mode in ("stock", "project"):
        out = work / f"{mode}.mlpackage"
        results[mode] = run_child(__file__, [str(args.package), "--child", mode, "--output", str(out)], mode)
        print(results[mode], flush=True)
    from publisher.metrics import snr
    from publisher.mlpackage import load_program, main_operations

    originals = {op.name: op.outputs[0].val for op in main_operations(load_program(args.package))
                 if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)}
    stock, ours = luts(work / "stock.mlpackage"), luts(work / "project.mlpackage")
    common = sorted(set(stock) & set(ours))
    identical = sum(np.array_equal(stock[n][0], ours[n][0]) for n in common)
    worst = 0.0
    for name in common:
        if name in originals:
            worst = max(worst, abs(snr(originals[name], stock[name][1]) - snr(originals[name], ours[name][1])))
    print(f"ops: stock {len(stock)}, project {len(ours)}, compared {len(common)}, identical LUTs {identical}")
    print(f"largest per-tensor SNR difference: {worst:.4f} dB (goal <= 0.01)")
    s, p = results["stock"], results["project"]
    print(f"stock  : {s['seconds']:7.1f} s  peak {s['peak_gib']:.2f} GiB")
    print(f"project: {p['seconds']:7.1f} s  peak {p['peak_gib']:.2f} GiB")
    print(f"speed-up: {s['seconds'] / p['seconds']:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
