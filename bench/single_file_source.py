"""A community source at full size: an SD 1.5-shaped single-file checkpoint (random weights, the original key layout,
float16 as community files mostly are: 2.1 GB) read with a diffusers config repo, against the same pipeline as a
diffusers-format source; through a staging Hub.

Run by hand (not in CI; ~30 min and ~25 GB of disk):
    python bench/single_file_source.py [--work DIR] [--dtype float16|float32]

Three measured child processes, each building only the UNet (ORIGINAL, float16, no verification):
1. the single-file source's fetch and prepare (the checkpoint and the config repo's small files downloaded, the
   checkpoint loaded by diffusers' `from_single_file` and saved as diffusers folders): bytes the staging Hub sent,
   peak RSS;
2. the UNet's conversion from the prepared source (the prepare step comes from the store): peak RSS;
3. the UNet's conversion from the diffusers-format source (its fp16 safetensors): bytes sent, peak RSS.
Printed as one JSON object; the goal: 2 no higher than 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import run_code, staging_bytes, staging_client_env  # noqa: E402

TOKEN = "bench-token"
CONFIG_REPO = "bench/sd15-diffusers"
SINGLE_REPO = "bench/sd15-single-file"
MANIFEST = """\
name: {name}
source:
{source}
license: creativeml-openrail-m
resolution: 512
publish:
  - repo: "{{namespace}}/coreml-{name}"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    components: [unet]
    layouts: [packages]
"""

CHILD = """
import json, sys
from pathlib import Path
from publisher.engine.build import BuildOptions, _Runner, build
from publisher.manifest import load_manifests
from publisher.plan import build_plan
from bench._common import peak_gib
manifest, work, endpoint, token, fetch_only = sys.argv[1:6]
options = BuildOptions(out=Path(work) / "out", store=Path(work) / "store", namespace="bench", compile=False,
                       verify=False, endpoint=endpoint, token=token, isolate=False, progress=False)
loaded = load_manifests([Path(manifest)])
if fetch_only == "1":
    plan = build_plan(loaded, "bench")
    runner = _Runner(plan, options, print)
    (fetch,) = plan.steps_of("fetch")
    runner.run_step(fetch)
    assert fetch.id not in runner.state.failed, runner.state.failed
    print(json.dumps({"peak_gib": round(peak_gib(), 2)}))
else:
    result = build(loaded, options)
    assert result.ok, [v.error for v in result.variants]
    print(json.dumps({"peak_gib": round(peak_gib(), 2), "built": len(result.built)}))
"""


def _child(manifest: Path, work: Path, endpoint: str, fetch_only: bool) -> dict[str, Any]:
    before = staging_bytes(endpoint, TOKEN, "bytes_sent")
    result = run_code(CHILD, [str(manifest), str(work), endpoint, TOKEN, "1" if fetch_only else "0"], ROOT)
    result["bytes_sent"] = staging_bytes(endpoint, TOKEN, "bytes_sent") - before
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="single-file-bench-"))
    port = staging_client_env(work)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.build_manifest import TEXT, VAE  # type: ignore[import-not-found]
    from bench.convert_unet import SD15_UNET  # type: ignore[import-not-found]
    from publisher.staging.process import start_staging_hub
    from publisher.tiny import add_hub_copies, push_tiny_source, write_single_file, write_tokenizer

    pipeline = work / "pipeline"
    if not (pipeline / "model_index.json").exists():
        torch.manual_seed(0)
        write_tokenizer(pipeline / "tokenizer")
        CLIPTextModel(CLIPTextConfig(**TEXT)).eval().save_pretrained(pipeline / "text_encoder")
        UNet2DConditionModel(**SD15_UNET).eval().save_pretrained(pipeline / "unet")
        AutoencoderKL(**VAE).eval().save_pretrained(pipeline / "vae")
        (pipeline / "scheduler").mkdir(exist_ok=True)
        (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True}))
        (pipeline / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
        add_hub_copies(pipeline, fp16=True, decoys=False)
    single = work / "single"
    checkpoint = single / f"model-{args.dtype}.safetensors"
    if not checkpoint.exists():
        write_single_file(pipeline, checkpoint, dtype=args.dtype)
    with start_staging_hub(work / "hub", port=port, token=TOKEN) as hub:
        endpoint = hub.url
        push_tiny_source(pipeline, CONFIG_REPO, endpoint, TOKEN)
        push_tiny_source(single, SINGLE_REPO, endpoint, TOKEN)
        manifests = work / "manifests"
        manifests.mkdir(exist_ok=True)
        single_manifest = manifests / "single.yaml"
        single_manifest.write_text(MANIFEST.format(name="single", source=f"  repo: {SINGLE_REPO}\n  file: "
                                                   f"{checkpoint.name}\n  config: {{repo: {CONFIG_REPO}}}"))
        diffusers_manifest = manifests / "diffusers.yaml"
        diffusers_manifest.write_text(MANIFEST.format(name="diffusers", source=f"  repo: {CONFIG_REPO}"))
        figures = {
            "checkpoint_bytes": checkpoint.stat().st_size,
            "single_file_fetch_and_prepare": _child(single_manifest, work / "a", endpoint, fetch_only=True),
            "single_file_unet": _child(single_manifest, work / "a", endpoint, fetch_only=False),
            "diffusers_unet": _child(diffusers_manifest, work / "b", endpoint, fetch_only=False),
        }
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
