"""Full-size SD 1.5- or SDXL-shaped UNet (random weights): plain trace + convert vs the project's converter.

Run by hand (not in CI; SD 1.5 ~10 minutes, ~9 GiB; SDXL much more):
    python bench/convert_unet.py [--family sd|sdxl] [--attention ORIGINAL] [--chunks] [--modes project,plain]
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

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.57 B parameters)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FAMILIES = {"sd": (SD15_UNET, 512, "bench/sd15@random"), "sdxl": (SDXL_UNET, 1024, "bench/sdxl@random")}


def rss() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20


def stage(name: str, start: float) -> None:
    now, peak = rss()
    print(f"  {name:<28} t={time.perf_counter() - start:7.1f} s  rss={now:5.2f} GiB  peak={peak:5.2f} GiB", flush=True)


def make_source(folder: Path, family: str = "sd") -> None:
    """The UNet with random weights, saved as the fp16 copy the source fetch prefers (and the float32 one for
    SD, as before). model_index.json says whether a refiner's geometry is meant (it is not)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**FAMILIES[family][0])
    if family == "sdxl":
        unet = unet.half()  # 5.1 GB on disk instead of 10.3 GB; loaded as float32 by both paths
        unet.save_pretrained(folder / "unet", variant="fp16")
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    else:
        unet.save_pretrained(folder / "unet")


def run_plain(source: Path, output: Path, attention: str, family: str) -> None:
    """What a straightforward converter does: fp32 model, jit.trace, ct.convert, save."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from publisher.convert.components import Unet, example_inputs
    from publisher.convert.weight_files import weights_variant
    from publisher.family import family_named
    from publisher.mlpackage import import_coremltools
    from publisher.vocabulary import Attention, Component

    ct = import_coremltools()
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(source / "unet", low_cpu_mem_usage=False, torch_dtype=torch.float32,
                                                variant=weights_variant(source / "unet")).eval()
    module = Unet(unet, Attention(attention))
    model_family = family_named(family)
    spec = model_family.model_spec(Component.UNET, model_family.dims(source, FAMILIES[family][1]))
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


def run_project(source: Path, output: Path, attention: str, family: str) -> None:
    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.deployment import DeploymentTarget
    from publisher.vocabulary import Attention, Component

    _, resolution, label = FAMILIES[family]
    start = time.perf_counter()
    convert_component(source, Component.UNET, Attention(attention), resolution, DeploymentTarget.iOS16, output,
                      PackageMetadata(label, "mit", Attention(attention)),
                      progress=lambda name: stage(name, start), family=family)


def run_chunks(source: Path, output: Path, attention: str, family: str) -> None:
    from publisher.convert.chunk import convert_unet_chunks
    from publisher.convert.coreml import PackageMetadata
    from publisher.deployment import DeploymentTarget
    from publisher.vocabulary import Attention

    _, resolution, label = FAMILIES[family]
    output.mkdir(parents=True, exist_ok=True)
    convert_unet_chunks(source, Attention(attention), resolution, DeploymentTarget.iOS16,
                        (output / "chunk1.mlpackage", output / "chunk2.mlpackage"),
                        PackageMetadata(label, "mit", Attention(attention)), family=family)


def _size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def op_counts(package: Path) -> dict[str, int]:
    from publisher.mlpackage import load_program, main_operations

    counts: dict[str, int] = {}
    for op in main_operations(load_program(package)):
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return {kind: counts.get(kind, 0) for kind in ("conv", "linear", "matmul", "transpose", "einsum", "reshape")}


def _sample_rss(start: float, every: float) -> None:
    """Print the RSS now and then (a stage that never ends, killed for memory, still leaves its trace)."""
    import threading

    def loop() -> None:
        while True:
            time.sleep(every)
            now, peak = rss()
            print(f"  {'...':<28} t={time.perf_counter() - start:7.1f} s  rss={now:5.2f} GiB  peak={peak:5.2f} GiB",
                  flush=True)

    threading.Thread(target=loop, daemon=True).start()


def child(mode: str, source: Path, output: Path, attention: str, family: str) -> None:
    start = time.perf_counter()
    if family == "sdxl":
        _sample_rss(start, 20.0)
    {"plain": run_plain, "project": run_project, "chunks": run_chunks}[mode](source, output, attention, family)
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
        # SD 1.5: 16 transformer blocks; SDXL: 70; self- and cross-attention each
        result["attention_layers"] = 32 if family == "sd" else 140
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attention", default="ORIGINAL")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd")
    parser.add_argument("--modes", default="plain,project", help="which paths, in this order")
    parser.add_argument("--work", type=Path, help="reuse this folder (its source, if present)")
    parser.add_argument("--child", choices=["plain", "project", "chunks"])
    parser.add_argument("--chunks", action="store_true", help="also convert the two UNet chunks")
    parser.add_argument("--source", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.source, args.output, args.attention, args.family)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    if not (work / "source" / "unet").exists():
        make_source(work / "source", args.family)
    results = {}
    modes = args.modes.split(",") + (["chunks"] if args.chunks else [])
    for mode in modes:
        print(f"{mode}:", flush=True)
        proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--source", str(work / "source"),
                                 "--output", str(work / (mode if mode == "chunks" else f"{mode}.mlpackage")),
                                 "--attention", args.attention, "--family", args.family],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:  # stage lines as they come
            if line.strip():
                lines.append(line.rstrip())
                if not line.startswith("{"):
                    print(line.rstrip(), flush=True)
        stderr = proc.stderr.read()
        proc.wait()
        if proc.returncode != 0:  # reported, not fatal: the plain path may not fit in memory
            print(f"  -> {mode} FAILED (exit {proc.returncode}): {stderr[-1500:]}", flush=True)
            continue
        results[mode] = json.loads(lines[-1])
        print(f"  -> {results[mode]}", flush=True)
    for mode in ("plain", "project"):
        if mode in results:
            r = results[mode]
            print(f"{mode:<7}: {r['wall_s']:7.1f} s  peak {r['peak_gib']:.2f} GiB  {r['package_mib']:.1f} MiB")
    if "plain" in results and "project" in results:
        print(f"peak RSS ratio project/plain: {results['project']['peak_gib'] / results['plain']['peak_gib']:.2f}")
    if "project" in results:
        print(f"project ops: {results['project']['ops']} for {results['project']['attention_layers']} attention "
              "layers")
    if "chunks" in results:
        chunks = results["chunks"]
        gb = [b / 1e9 for b in chunks["chunk_weight_bytes"]]
        print(f"chunks: {chunks['chunk_mib']} MiB; weights {gb[0]:.3f} GB + {gb[1]:.3f} GB "
              f"(difference {abs(gb[0] - gb[1]) / max(gb):.1%}; goal: each < 1 GB, within 10%)")


if __name__ == "__main__":
    main()
