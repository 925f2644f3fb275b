"""Full-size SD 1.5-shaped UNet (random weights): plain trace + convert vs the project's converter.

Run by hand (not in CI; ~10 minutes, ~9 GiB):  python bench/convert_unet.py [--attention ORIGINAL]
Each path runs in its own process; each prints its stages, wall time and peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def rss() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20


def stage(name: str, start: float) -> None:
    now, peak = rss()
    print(f"  {name:<28} t={time.perf_counter() - start:7.1f} s  rss={now:5.2f} GiB  peak={peak:5.2f} GiB", flush=True)


def make_source(folder: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(folder / "unet")


def run_plain(source: Path, output: Path, attention: str) -> None:
    """What a straightforward converter does: fp32 model, jit.trace, ct.convert, save."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from publisher.contract import ModelDims, model_spec
    from publisher.convert.attention import apply_attention
    from publisher.convert.components import Unet, example_inputs
    from publisher.convert.coreml import import_coremltools
    from publisher.manifest import Attention, Component

    ct = import_coremltools()
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(source / "unet", low_cpu_mem_usage=False).eval()
    module = Unet(apply_attention(unet, Attention(attention)), Attention(attention))
    spec = model_spec(Component.UNET, ModelDims(resolution=512, text_hidden=768))
    stage("load", start)
    traced = torch.jit.trace(module, example_inputs(spec), check_trace=False)
    stage("trace", start)
    model = ct.convert(traced, inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=np.float32) for t in spec.inputs],
                       outputs=[ct.TensorType(name=t.name) for t in spec.outputs], convert_to="mlprogram",
                       compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS16,
                       skip_model_load=True)
    stage("convert", start)
    model.save(str(output))
    stage("save", start)


def run_project(source: Path, output: Path, attention: str) -> None:
    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.manifest import Attention, Component, DeploymentTarget

    start = time.perf_counter()
    convert_component(source, Component.UNET, Attention(attention), 512, DeploymentTarget.iOS16, output,
                      PackageMetadata("bench/sd15@random", "mit", Attention(attention)),
                      progress=lambda name: stage(name, start))


def child(mode: str, source: Path, output: Path, attention: str) -> None:
    start = time.perf_counter()
    (run_plain if mode == "plain" else run_project)(source, output, attention)
    _now, peak = rss()
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) / 2**20
    print(json.dumps({"mode": mode, "wall_s": round(time.perf_counter() - start, 1), "peak_gib": round(peak, 2),
                      "package_mib": round(size, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attention", default="ORIGINAL")
    parser.add_argument("--child", choices=["plain", "project"])
    parser.add_argument("--source", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.source, args.output, args.attention)
        return
    work = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    make_source(work / "source")
    results = {}
    for mode in ("plain", "project"):
        print(f"{mode}:", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--source", str(work / "source"),
                               "--output", str(work / f"{mode}.mlpackage"), "--attention", args.attention],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        for line in lines[:-1]:
            print(line)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{mode} failed")
        results[mode] = json.loads(lines[-1])
        print(f"  -> {results[mode]}")
    plain, project = results["plain"], results["project"]
    print(f"plain  : {plain['wall_s']:7.1f} s  peak {plain['peak_gib']:.2f} GiB  {plain['package_mib']:.1f} MiB")
    print(f"project: {project['wall_s']:7.1f} s  peak {project['peak_gib']:.2f} GiB  {project['package_mib']:.1f} MiB")
    print(f"peak RSS ratio project/plain: {project['peak_gib'] / plain['peak_gib']:.2f} (goal <= 0.70)")


if __name__ == "__main__":
    main()
