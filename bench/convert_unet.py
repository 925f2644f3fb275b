"""Full-size SD 1.5-shaped UNet (random weights): plain trace + convert vs the project's converter.

Run by hand (not in CI; ~10 minutes, ~9 GiB):  python bench/convert_unet.py [--attention ORIGINAL] [--chunks]
Each path runs in its own process; each prints its stages, wall time and peak RSS (VmHWM). Both paths convert the
same ANE-shaped module (publisher.convert.unet); the project's package is then described by its op counts
(conv, linear, matmul, transpose, einsum; attention layers). `--chunks` also converts the two UNet chunks with the
project's converter and prints their sizes.
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

    from publisher.contract import ModelDims
    from publisher.convert.components import Unet, example_inputs
    from publisher.families.sd import sd_model_spec as model_spec
    from publisher.manifest import Attention, Component
    from publisher.mlpackage import import_coremltools

    ct = import_coremltools()
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(source / "unet", low_cpu_mem_usage=False).eval()
    module = Unet(unet, Attention(attention))
    spec = model_spec(Component.UNET, ModelDims(resolution=512, text_hidden=768))
    stage("load", start)
    traced = torch.jit.trace(module, example_inputs(spec), check_trace=False)
    stage("trace", start)
    model = ct.convert(traced, inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(t.dtype).type)
                                       for t in spec.inputs],
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


def run_chunks(source: Path, output: Path, attention: str) -> None:
    from publisher.convert.chunk import convert_unet_chunks
    from publisher.convert.coreml import PackageMetadata
    from publisher.manifest import Attention, DeploymentTarget

    output.mkdir(parents=True, exist_ok=True)
    convert_unet_chunks(source, Attention(attention), 512, DeploymentTarget.iOS16,
                        (output / "chunk1.mlpackage", output / "chunk2.mlpackage"),
                        PackageMetadata("bench/sd15@random", "mit", Attention(attention)))


def _size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def op_counts(package: Path) -> dict[str, int]:
    from publisher.mlpackage import load_program, main_operations

    counts: dict[str, int] = {}
    for op in main_operations(load_program(package)):
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return {kind: counts.get(kind, 0) for kind in ("conv", "linear", "matmul", "transpose", "einsum", "reshape")}


def child(mode: str, source: Path, output: Path, attention: str) -> None:
    start = time.perf_counter()
    {"plain": run_plain, "project": run_project, "chunks": run_chunks}[mode](source, output, attention)
    _now, peak = rss()
    result: dict[str, object] = {"mode": mode, "wall_s": round(time.perf_counter() - start, 1),
                                 "peak_gib": round(peak, 2)}
    if mode == "chunks":
        result["chunk_mib"] = [round(_size_mib(output / f"chunk{i}.mlpackage"), 1) for i in (1, 2)]
        result["chunk_weight_bytes"] = [(output / f"chunk{i}.mlpackage" / "Data" / "com.apple.CoreML" / "weights" /
                                         "weight.bin").stat().st_size for i in (1, 2)]
    else:
        result["package_mib"] = round(_size_mib(output), 1)
    if mode == "project":
        result["ops"] = op_counts(output)
        result["attention_layers"] = 32  # SD 1.5: 16 transformer blocks, self- and cross-attention each
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attention", default="ORIGINAL")
    parser.add_argument("--child", choices=["plain", "project", "chunks"])
    parser.add_argument("--chunks", action="store_true", help="also convert the two UNet chunks")
    parser.add_argument("--source", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.source, args.output, args.attention)
        return
    work = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    make_source(work / "source")
    results = {}
    for mode in ("plain", "project", "chunks") if args.chunks else ("plain", "project"):
        print(f"{mode}:", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--source", str(work / "source"),
                               "--output", str(work / (mode if mode == "chunks" else f"{mode}.mlpackage")),
                               "--attention", args.attention],
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
    print(f"project ops: {project['ops']} for {project['attention_layers']} attention layers")
    if "chunks" in results:
        chunks = results["chunks"]
        gb = [b / 1e9 for b in chunks["chunk_weight_bytes"]]
        print(f"chunks: {chunks['chunk_mib']} MiB; weights {gb[0]:.3f} GB + {gb[1]:.3f} GB "
              f"(difference {abs(gb[0] - gb[1]) / max(gb):.1%}; goal: each < 1 GB, within 10%)")


if __name__ == "__main__":
    main()
