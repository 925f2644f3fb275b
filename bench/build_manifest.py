"""The main job at full size: `manifests/sd-v1-5.yaml` built from a staging Hub holding an SD 1.5-shaped source in the
real repo's layout (every weight copy), by the project and by the plain per-variant path; then published, rebuilt
and republished unchanged.

Run by hand (not in CI; about an hour and ~45 GB of disk at full size):
    python bench/build_manifest.py [--work DIR] [--variants PATTERN ...] [--jobs N] [--skip-plain] [--tiny]

1. Source: a full-size SD 1.5-shaped pipeline with random weights (UNet, text encoder, VAE, safety checker), saved
   as the float32 safetensors the real repo has, its `fp16` safetensors variant (the same weights cast), and decoys
   of random bytes at the real copies' sizes (`.bin`, `.fp16.bin`, `.non_ema.*`; a single-file checkpoint at the
   root, smaller than the real one), pushed to a staging Hub as `stable-diffusion-v1-5/stable-diffusion-v1-5`.
2. Project: `build` of the manifest's variants (default: the float16 and 6-bit repos, 4 variants; the mixed-bit
   repo's analysis alone takes ~24 min, see bench/mixed_bit.py), packages only (compiling needs macOS), `--jobs`
   steps at once (default one per core; the build's memory-aware scheduler).
3. Plain path: per variant a fresh process, as Apple's converter runs once per variant: diffusers downloads the
   pipeline's fp16 safetensors variant (Apple's `variant="fp16"`), each component is loaded with the library's
   loader, widened to float32, traced and converted (the same ANE-shaped modules), the chunked UNet through the
   project's chunk converter, and the compressed components palettized with coremltools' stock k-means. No output
   check (Apple's converter checks on macOS only).
4. Publish to the staging Hub, then a no-op rebuild and a no-op republish.

Printed: bytes downloaded (counted by the staging Hub), wall time, peak RSS (largest process of the run), steps
run; the ratio project / plain; the no-op figures per repo.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import peak_gib  # noqa: E402

MANIFEST = ROOT / "manifests" / "sd-v1-5.yaml"
SOURCE_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
NAMESPACE = "bench"
TOKEN = "bench-token"
DEFAULT_VARIANTS = [f"{NAMESPACE}/coreml-stable-diffusion-v1-5/*", f"{NAMESPACE}/coreml-stable-diffusion-v1-5-palettized/*"]
ROOT_CHECKPOINT_BYTES = 512 * 2**20  # the real v1-5-pruned-emaonly.safetensors has 4.27 GB

# stable-diffusion-v1-5's configs (text encoder: CLIP ViT-L/14's text tower; safety checker: its vision tower)
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=14, hidden_act="quick_gelu", projection_dim=768)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4)


def tree_rss_gib(pid: int) -> float:
    """RSS of a process and all its descendants, summed (GiB)."""
    total = 0
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    todo = [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 2**20


def run_measured(command: list[str], env: dict[str, str], label: str) -> dict[str, Any]:
    """Run a child, sampling its process tree's RSS; its last stdout line is a JSON result."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    tree_peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            tree_peak[0] = max(tree_peak[0], tree_rss_gib(proc.pid))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    lines = []
    for line in proc.stdout or []:
        if line.strip():
            lines.append(line.rstrip())
            if not line.startswith("{"):
                print(f"  {line.rstrip()}", flush=True)
    proc.wait()
    sampler.join()
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{''.join(stderr_lines)[-4000:]}")
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["tree_peak_gib"] = round(tree_peak[0], 2)
    return result


# -- 1. the source --------------------------------------------------------------------------------------------------

def write_random(path: Path, size: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        left = size
        while left:
            block = min(left, 64 * 2**20)
            handle.write(rng.bytes(block))
            left -= block


def make_source(folder: Path, tiny: bool) -> None:
    """The pipeline with random weights in the real repo's layout; returns when every copy is on disk."""
    import torch
    from safetensors.torch import load_file, save_file

    if tiny:
        from publisher.tiny import build_tiny_pipeline

        build_tiny_pipeline(folder)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

        from bench.convert_unet import SD15_UNET  # type: ignore[import-not-found]
        from publisher.tiny import write_tokenizer

        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        write_tokenizer(folder / "tokenizer")
        CLIPTextModel(CLIPTextConfig(**TEXT)).eval().save_pretrained(folder / "text_encoder")
        UNet2DConditionModel(**SD15_UNET).eval().save_pretrained(folder / "unet")
        AutoencoderKL(**VAE).eval().save_pretrained(folder / "vae")
        checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=CLIPTextConfig(**TEXT).to_dict(),
                                                          vision_config=CLIPVisionConfig(**VISION).to_dict(),
                                                          projection_dim=768))
        checker.eval().save_pretrained(folder / "safety_checker")
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True}))
        (folder / "feature_extractor").mkdir(exist_ok=True)
        (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
        del checker
    # the real repo's copies: fp16 safetensors (the same weights cast), then decoys at the real copies' sizes
    seed = 1
    for weights in sorted(folder.glob("*/*.safetensors")):
        size = weights.stat().st_size
        tensors = {k: v.half().contiguous() for k, v in load_file(weights).items()}
        save_file(tensors, weights.with_name(weights.stem + ".fp16.safetensors"), metadata={"format": "pt"})
        del tensors
        stem = weights.name.split(".")[0]
        pickled = "pytorch_model" if stem == "model" else stem
        decoys = {f"{pickled}.bin": size, f"{pickled}.fp16.bin": size // 2}
        if weights.parent.name == "unet":  # the UNet also carries its non-EMA weights
            decoys |= {f"{stem}.non_ema.bin": size, f"{stem}.non_ema.safetensors": size}
        for name, decoy_size in decoys.items():
            seed += 1
            write_random(weights.parent / name, decoy_size if not tiny else 4096, seed)
    write_random(folder / "v1-5-pruned-emaonly.safetensors", ROOT_CHECKPOINT_BYTES if not tiny else 8192, 999)


def push_source(folder: Path, endpoint: str) -> dict[str, Any]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo(SOURCE_REPO, exist_ok=True)
    start = time.perf_counter()
    api.upload_folder(folder_path=str(folder), repo_id=SOURCE_REPO, commit_message="SD 1.5-shaped source, random")
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "upload_s": round(time.perf_counter() - start, 1)}


# -- 2. the project's build ---------------------------------------------------------------------------------------

def child_project(args: argparse.Namespace) -> dict[str, Any]:
    from publisher.engine.build import BuildOptions, build
    from publisher.manifest import load_manifests

    manifests = load_manifests([MANIFEST])
    result = build(manifests, BuildOptions(out=args.work / "out", store=args.work / "store", namespace=NAMESPACE,
                                           compile=False, variants=args.variants, endpoint=os.environ["HF_ENDPOINT"],
                                           token=TOKEN, progress=False, jobs=args.jobs))
    if not result.ok:
        raise SystemExit("; ".join(v.error or "" for v in result.variants if v.error))
    kinds: dict[str, int] = {}
    for step_id in result.built:
        kind = result.plan.steps[step_id].kind
        kinds[kind] = kinds.get(kind, 0) + 1
    seconds: dict[str, float] = {}  # time per step kind, from the store's records of the steps this run built
    steps: dict[str, float] = {}
    built = set(result.built)
    for record_file in (args.work / "store" / "objects").glob("*/*/record.json"):
        record = json.loads(record_file.read_text())
        if record.get("step") in built:
            seconds[record["kind"]] = round(seconds.get(record["kind"], 0.0) + float(record["seconds"]), 1)
            steps[record["step"]] = float(record["seconds"])
    return {"built": kinds, "seconds_by_kind": seconds, "seconds_by_step": dict(sorted(steps.items())),
            "jobs": args.jobs, "cached": len(result.cached),
            "variants": len(result.variants), "package_bytes": sum(v.size for v in result.variants)}


# -- 3. the plain per-variant path --------------------------------------------------------------------------------

def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    """One variant, as a converter that knows nothing of the others: download, load, trace, convert, palettize."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from publisher.convert.chunk import convert_unet_chunks
    from publisher.convert.components import WRAPPERS, _loader, example_inputs
    from publisher.convert.coreml import PackageMetadata
    from publisher.deployment import DeploymentTarget
    from publisher.engine.build import BuildOptions  # noqa: F401  (same import cost as the project's child)
    from publisher.manifest import load_manifests
    from publisher.mlpackage import import_coremltools
    from publisher.plan import build_plan
    from publisher.vocabulary import Attention, Component

    ct = import_coremltools()
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    plan = build_plan(load_manifests([MANIFEST]), NAMESPACE)
    variant = next(v for v in plan.variants if v.id == args.variant)
    family = variant.model_family
    compressed = {Component(step.params.component) for step in plan.steps_of("compress")
                  if variant.id in step.variants}
    nbits = getattr(variant.precision, "nbits", None)
    folder = Path(DiffusionPipeline.download(SOURCE_REPO, variant="fp16", use_safetensors=True,
                                             torch_dtype=torch.float16, cache_dir=args.work / "plain-cache",
                                             token=TOKEN))
    out = args.work / "plain-out" / variant.id.replace("/", "_")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dims = family.dims(folder, variant.resolution)
    target = ct.target.iOS17 if variant.deployment_target == DeploymentTarget.iOS17 else ct.target.iOS16
    counts = {"convert": 0, "chunk": 0, "palettize": 0}
    for component in variant.components:
        spec = family.component(component)
        start = time.perf_counter()
        loaded = _loader(spec.loader).from_pretrained(folder / spec.folder, variant="fp16",
                                                      torch_dtype=torch.float32)
        module = WRAPPERS[spec.wrapper](loaded, variant.attention).eval().float()
        contract = family.model_spec(component, dims)
        traced = torch.jit.trace(module, example_inputs(contract), check_trace=False)
        del module, loaded
        model = ct.convert(traced, inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(t.dtype).type)
                                           for t in contract.inputs],
                           outputs=[ct.TensorType(name=t.name) for t in contract.outputs], convert_to="mlprogram",
                           compute_precision=ct.precision.FLOAT16, minimum_deployment_target=target,
                           skip_model_load=True)
        del traced
        package = out / f"{component.value}.mlpackage"
        model.save(str(package))
        counts["convert"] += 1
        print(f"{component.value}: converted in {time.perf_counter() - start:.1f} s", flush=True)
        if component in compressed and nbits:
            start = time.perf_counter()
            config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=nbits,
                                                                         weight_threshold=2048))
            palettize_weights(model, config).save(str(out / f"{component.value}_palettized.mlpackage"))
            counts["palettize"] += 1
            print(f"{component.value}: palettized in {time.perf_counter() - start:.1f} s", flush=True)
        del model
        if component == Component.UNET and variant.chunk_unet:
            start = time.perf_counter()
            convert_unet_chunks(folder, Attention(variant.attention), variant.resolution, variant.deployment_target,
                                (out / "chunk1.mlpackage", out / "chunk2.mlpackage"),
                                PackageMetadata(SOURCE_REPO, "mit", variant.attention), family=variant.family)
            counts["chunk"] += 2
            print(f"unet chunks: converted in {time.perf_counter() - start:.1f} s", flush=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out)  # disk: only the figures are kept
    return {"variant": variant.id, **counts, "output_bytes": size}


# -- the driver ---------------------------------------------------------------------------------------------------

def stats(endpoint: str) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/api/staging/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def sent_bytes(endpoint: str) -> int:
    return int(stats(endpoint).get("bytes_sent", {}).get("resolve", 0))


def received_bytes(endpoint: str) -> int:
    return sum(int(v) for v in stats(endpoint).get("bytes_received", {}).values())


def gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path)
    parser.add_argument("--variants", nargs="*", default=None, help="variant patterns (default: the float16 and "
                        "6-bit repos)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead (a quick run of the bench)")
    parser.add_argument("--skip-plain", action="store_true", help="the project's side only (e.g. after a change, "
                        "compared with the plain figures of an earlier run on the same machine)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="the project build's steps at once (default: one per core)")
    parser.add_argument("--child", choices=["project", "plain"])
    parser.add_argument("--variant")
    args = parser.parse_args()
    if args.child:
        result = child_project(args) if args.child == "project" else child_plain(args)
        # the build's steps are children of the fork server, which reaps them: stop it and reap it, so that
        # their peaks count among this process's waited-for descendants
        import multiprocessing.forkserver

        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
        # this process's peak and the largest of the processes it waited for (the build's isolated steps)
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        result["largest_process_gib"] = round(max(peak_gib(), children), 2)
        print(json.dumps(result), flush=True)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="build-manifest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    variants = args.variants or DEFAULT_VARIANTS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(work / "hf-home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PUBLISHER_NAMESPACE": NAMESPACE, "HF_TOKEN": TOKEN}
    os.environ.update({k: env[k] for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_HOME",
                                            "HF_HUB_DISABLE_PROGRESS_BARS")})
    from publisher.staging.process import start_staging_hub

    started = time.perf_counter()
    source = work / "source"
    print(f"work folder {work}, {free_gb(work):.1f} GB free", flush=True)
    with start_staging_hub(work / "hub", port=port, token=TOKEN) as hub:
        # 1. source
        start = time.perf_counter()
        make_source(source, args.tiny)
        pushed = push_source(source, hub.url)
        shutil.rmtree(source)  # the Hub holds it now (disk)
        print(f"source: {pushed['files']} files, {pushed['bytes'] / 1e9:.2f} GB on the staging Hub "
              f"(made and pushed in {time.perf_counter() - start:.0f} s); {free_gb(work):.1f} GB free", flush=True)
        base = [sys.executable, __file__, "--work", str(work)] + (["--tiny"] if args.tiny else [])
        from publisher.engine.build import BuildOptions  # noqa: F401
        from publisher.manifest import load_manifests
        from publisher.plan import build_plan, select_variants

        chosen = [v.id for v in select_variants(build_plan(load_manifests([MANIFEST]), NAMESPACE), variants)]
        print(f"variants: {', '.join(chosen)}", flush=True)

        # 2. the project's build
        print("project build:", flush=True)
        down = sent_bytes(hub.url)
        project = run_measured(base + ["--child", "project", "--variants", *variants], env, "project build")
        project["downloaded"] = sent_bytes(hub.url) - down
        print(f"  -> {project}; {free_gb(work):.1f} GB free", flush=True)

        # 3. the plain path, one process per variant
        plain: list[dict[str, Any]] = []
        down = sent_bytes(hub.url)
        for variant_id in [] if args.skip_plain else chosen:
            print(f"plain {variant_id}:", flush=True)
            plain.append(run_measured(base + ["--child", "plain", "--variant", variant_id], env, f"plain {variant_id}"))
            print(f"  -> {plain[-1]}", flush=True)
        plain_downloaded = sent_bytes(hub.url) - down

        # 4. publish, then the no-op rebuild and republish
        from publisher.publish import PublishOptions, publish

        manifests = load_manifests([MANIFEST])
        options = PublishOptions(out=work / "out", namespace=NAMESPACE, target="staging", endpoint=hub.url,
                                 token=TOKEN, variants=variants)
        up = received_bytes(hub.url)
        start = time.perf_counter()
        first = publish(manifests, options)
        first_s = time.perf_counter() - start
        first_sent = received_bytes(hub.url) - up
        print(f"first publish: {len(first)} repos, {sum(len(o.commits) for o in first)} commits, "
              f"{gb(first_sent)} sent, {first_s:.1f} s", flush=True)
        down = sent_bytes(hub.url)
        rebuild = run_measured(base + ["--child", "project", "--variants", *variants], env, "no-op rebuild")
        rebuild["downloaded"] = sent_bytes(hub.url) - down
        up = received_bytes(hub.url)
        start = time.perf_counter()
        again = publish(manifests, options)
        again_s = time.perf_counter() - start
        again_sent = received_bytes(hub.url) - up

    repos = len(again)
    results = {"source": pushed, "project": project, "plain": plain, "plain_downloaded": plain_downloaded,
               "first_publish": {"seconds": round(first_s, 1), "bytes": first_sent},
               "rebuild": rebuild, "republish": {"seconds": round(again_s, 1), "bytes": again_sent,
                                                 "commits": sum(len(o.commits) for o in again)}}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n== results (also in {work / 'results.json'}) ==")
    print(f"source on the Hub: {pushed['files']} files, {pushed['bytes'] / 1e9:.2f} GB")
    print(f"project : {project['wall_s']:8.1f} s  downloaded {gb(project['downloaded'])}  largest process "
          f"{project['largest_process_gib']} GiB (tree peak {project['tree_peak_gib']} GiB)  steps {project['built']}")
    print(f"          time by step kind: {project['seconds_by_kind']}")
    if plain:
        report_plain(project, plain, plain_downloaded)
    print(f"no-op rebuild: {rebuild['wall_s']:.1f} s, steps run {rebuild['built'] or 0}, downloaded "
          f"{rebuild['downloaded']} bytes")
    print(f"no-op republish: {again_s:.1f} s, {sum(len(o.commits) for o in again)} commits, {again_sent} bytes sent")
    print(f"no-op rebuild + republish per repo: {(rebuild['wall_s'] + again_s) / repos:.1f} s (goal < 5 s)")
    print(f"total bench wall time {time.perf_counter() - started:.0f} s")


def report_plain(project: dict[str, Any], plain: list[dict[str, Any]], plain_downloaded: int) -> None:
    plain_wall = sum(r["wall_s"] for r in plain)
    plain_peak = max(r["largest_process_gib"] for r in plain)
    plain_steps = {k: sum(r[k] for r in plain) for k in ("convert", "chunk", "palettize")}
    print(f"plain   : {plain_wall:8.1f} s  downloaded {gb(plain_downloaded)}  largest process "
          f"{plain_peak} GiB  steps {plain_steps} (per variant: "
          + ", ".join(f"{r['variant']} {r['wall_s']:.0f} s" for r in plain) + ")")
    print(f"project / plain wall time: {project['wall_s'] / plain_wall:.2f}x (goal <= 0.4x)")


if __name__ == "__main__":
    main()
