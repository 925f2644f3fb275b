"""Text to image at full size: an SD 1.5-shaped pipeline (random weights) converted float16 (ORIGINAL), then one
512x512 image generated through its packages on the project's executor (`publisher.generate`, 20 PNDM steps)
and through diffusers' float32 pipeline with the same noise, each in its own process.

Run by hand (not in CI; ~15 min, ~8 GiB):
    python bench/generate_full.py [--work DIR] [--steps 20]

Printed as JSON: per side its wall time and peak RSS (VmHWM); then the PSNR of the final latents and of the image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import run_code  # noqa: E402

CONVERT = """
import sys
from pathlib import Path
from publisher.convert.coreml import PackageMetadata, convert_component
from publisher.deployment import DeploymentTarget
from publisher.vocabulary import Attention, Component
source, component, output = sys.argv[1:4]
convert_component(Path(source), Component(component), Attention.ORIGINAL, 512, DeploymentTarget.iOS16, Path(output),
                  PackageMetadata("bench/sd15@random", "mit", Attention.ORIGINAL))
print("{}")
"""

GENERATE = """
import json, sys
from pathlib import Path
import numpy as np
from publisher.generate import GenerateSettings, PackageSet, generate_with
from publisher.generate_reference import reference_generate
from publisher.verify.runtime import ExecutorRuntime
from bench._common import peak_gib
work, side, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
settings = GenerateSettings(prompt="a photo of an astronaut riding a horse on mars", seed=0, steps=steps)
if side == "packages":
    packages = {name: work / f"{name}.mlpackage" for name in ("text_encoder", "unet", "vae_decoder")}
    result = generate_with(PackageSet(packages, work / "source" / "tokenizer", 0.18215, ExecutorRuntime()), settings)
else:
    result = reference_generate(work / "source", settings, (1, 4, 64, 64))
np.savez(work / f"{side}.npz", latents=result.latents, image=result.image)
print(json.dumps({"peak_gib": round(peak_gib(), 2)}))
"""


def make_source(folder: Path) -> None:
    if (folder / "vae" / "config.json").exists():
        return
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.build_manifest import TEXT, VAE  # type: ignore[import-not-found]
    from bench.convert_unet import make_source as make_unet  # type: ignore[import-not-found]
    from publisher.tiny import write_tokenizer

    make_unet(folder)
    torch.manual_seed(0)
    write_tokenizer(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(**TEXT)).eval().save_pretrained(folder / "text_encoder")
    AutoencoderKL(**VAE).eval().save_pretrained(folder / "vae")


def main() -> None:
    import numpy as np

    from publisher.metrics import psnr

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    make_source(work / "source")
    for component in ("text_encoder", "unet", "vae_decoder"):
        if not (work / f"{component}.mlpackage").exists():
            run_code(CONVERT, [str(work / "source"), component, str(work / f"{component}.mlpackage")], ROOT)
    results = {}
    for side in ("packages", "diffusers"):
        results[side] = run_code(GENERATE, [str(work), side, str(args.steps)], ROOT)
        print(json.dumps({"side": side, **results[side]}), flush=True)
    ours, theirs = np.load(work / "packages.npz"), np.load(work / "diffusers.npz")
    print(json.dumps({"latents_psnr_db": round(psnr(theirs["latents"], ours["latents"]), 2),
                      "image_psnr_db": round(psnr(theirs["image"].astype(np.float32),
                                                  ours["image"].astype(np.float32)), 2)}))


if __name__ == "__main__":
    main()
