"""Mixed-bit pre-analysis of a full-size SD 1.5-shaped UNet (random weights) on this machine's CPU.

Run by hand (not in CI):  python bench/mixed_bit.py [--latent 16] [--samples 2] [--agreement 12] [--apply]
- the analysis as the build runs it (publisher.compress.sensitivity.analyze, target 4.5 bits): wall time, peak RSS;
- `--agreement N`: single-layer 4-bit sensitivities of N layers (spread over the UNet) at the analysis latent size
  and at the full 64x64, and the Spearman rank correlation between the two rankings;
- `--apply`: the float16 UNet package converted, the chosen recipe applied, and a uniform 6-bit palettization
  for comparison: package sizes.
Each part runs in a process of its own, so each peak RSS is that part's alone.
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

from bench._common import peak_gib, run_child  # noqa: E402


def make(work: Path) -> dict:
    from bench.convert_unet import make_source

    make_source(work / "source")
    return {"peak_gib": round(peak_gib(), 2)}


def analysis(work: Path, latent: int, samples: int) -> dict:
    from publisher.compress.sensitivity import analyze

    start = time.perf_counter()
    record, apple = analyze(work / "source", 512, {"mixed_bit": {"target_bits": 4.5}}, "bench/sd15-random",
                            progress=True, latent=latent, samples=samples)
    seconds = time.perf_counter() - start
    (work / "analysis").mkdir(exist_ok=True)
    (work / "analysis" / "analysis.json").write_text(json.dumps(record))
    (work / "analysis" / "pre-analysis.json").write_text(json.dumps(apple))
    return {"seconds": round(seconds, 1), "peak_gib": round(peak_gib(), 2), "layers": len(record["layers"]),
            "chosen_bits": record["chosen"]["average_bits"], "chosen_psnr_db": record["chosen"]["predicted_psnr_db"],
            "uniform": record["uniform"], "curve": [(p["average_bits"], p["psnr_db"]) for p in record["curve"]],
            "estimated_layers": {b: len(names) for b, names in record["estimated"].items()},
            "estimate_check": record["estimate_check"]}


def agreement(work: Path, latent: int, count: int) -> dict:
    import numpy as np

    from publisher.compress.palettize_scheme import Granularity
    from publisher.compress.sensitivity import UnetProbe, _Weights

    def sensitivities(size: int) -> tuple[list[str], list[float], float]:
        probe = UnetProbe(work / "source", size * 8, samples=1)
        candidates = probe.candidates()
        picked = [candidates[i] for i in np.linspace(0, len(candidates) - 1, count).round().astype(int)]
        weights = _Weights(picked, Granularity.PER_TENSOR, 16)
        start = time.perf_counter()
        values = []
        for candidate in picked:
            weights.set(candidate, 4)
            values.append(float(np.mean(probe.psnrs(probe.output_from(candidate.stage)))))
            weights.set(candidate, 16)
        return [c.name for c in picked], values, (time.perf_counter() - start) / count

    names, small, small_seconds = sensitivities(latent)
    _, full, full_seconds = sensitivities(64)
    rank_small, rank_full = np.argsort(np.argsort(small)), np.argsort(np.argsort(full))
    spearman = float(np.corrcoef(rank_small, rank_full)[0, 1])
    return {"layers": count, "spearman": round(spearman, 3), "seconds_per_layer": {str(latent): round(small_seconds, 2),
            "64": round(full_seconds, 2)}, "peak_gib": round(peak_gib(), 2),
            "pairs": [(n, round(a, 1), round(b, 1)) for n, a, b in zip(names, small, full, strict=True)]}


def apply(work: Path) -> dict:
    from publisher.compress.palettize_scheme import SCHEME, PalettizeSettings
    from publisher.compress.scheme import CompressContext
    from publisher.convert.coreml import PackageMetadata, convert_isolated
    from publisher.deployment import DeploymentTarget
    from publisher.vocabulary import Attention, Component

    package = work / "unet.mlpackage"
    start = time.perf_counter()
    convert_isolated(work / "source", Component.UNET, Attention.ORIGINAL, 512, DeploymentTarget.iOS17, package,
                     PackageMetadata("bench/sd15@random", "mit", Attention.ORIGINAL))
    converted = time.perf_counter() - start

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    context = CompressContext(deployment_target=DeploymentTarget.iOS17, component="unet",
                              analysis=work / "analysis", progress=False)
    start = time.perf_counter()
    mixed = SCHEME.apply(package, work / "mixed.mlpackage", PalettizeSettings(type="palettize", mixed_bit={
        "target_bits": 4.5}), context)
    mixed_seconds = time.perf_counter() - start
    six = SCHEME.apply(package, work / "six.mlpackage", PalettizeSettings(type="palettize", nbits=6), context)
    return {"convert_seconds": round(converted, 1), "apply_seconds": round(mixed_seconds, 1),
            "float16_bytes": size(package), "mixed_bytes": mixed["package_bytes"], "six_bit_bytes": six["package_bytes"],
            "mixed_average_bits": SCHEME.figures(mixed)["bits"], "matched_ops": mixed["mixed_bit"]["matched_ops"],
            "analysed_layers": mixed["mixed_bit"]["layers"], "peak_gib": round(peak_gib(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--agreement", type=int, default=0, help="layers to compare at --latent and 64")
    parser.add_argument("--apply", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part is not None:  # a child: one part, its JSON on the last line
        work = args.work
        result = {"make": lambda: make(work), "analysis": lambda: analysis(work, args.latent, args.samples),
                  "agreement": lambda: agreement(work, args.latent, args.agreement),
                  "apply": lambda: apply(work)}[args.part]()
        print(json.dumps(result))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mixed-bit-bench."))
    common = ["--work", str(work), "--latent", str(args.latent), "--samples", str(args.samples),
              "--agreement", str(args.agreement)]
    if not (work / "source" / "unet").exists():
        print("source:", run_child(__file__, [*common, "--part", "make"], "make"), flush=True)
    result = run_child(__file__, [*common, "--part", "analysis"], "analysis")
    print(f"analysis (latent {args.latent}, {args.samples} samples): {json.dumps(result)}", flush=True)
    if args.agreement:
        print("agreement:", json.dumps(run_child(__file__, [*common, "--part", "agreement"], "agreement")), flush=True)
    if args.apply:
        print("apply:", json.dumps(run_child(__file__, [*common, "--part", "apply"], "apply")), flush=True)


if __name__ == "__main__":
    main()
