"""A build from a recipe in Apple's pre-analysis layout on a full-size SD 1.5-shaped UNet (random weights).

Run by hand (not in CI; ~10 min):  python bench/apple_recipe.py [--work DIR]

Apple publishes its recipes (apple/coreml-stable-diffusion-mixed-bit-palettization, `recipes/`) as pre-analysis JSON:
`recipes.<key>` maps the UNet's diffusers module names to bits (16 keeps a layer float16), for the layers of
1e5 elements or more. The values are not reachable here, so the file is written in that layout with a fixed mix of
bit-widths (4.5 bits per named layer on average, not weighted by size); the manifest names it as a user would
(`mixed_bit: {recipe: {file, key}}`), and the build reads it instead of running the analysis. Printed: layers in the
recipe, layers matched to the package's weights, average bits as applied, package sizes (float16 and mixed), wall
time, peak RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import run_code, sd15_unet_source, staging_bench_work  # noqa: E402

TOKEN = "bench-token"
SOURCE = "bench/sd15-unet"
KEY = "recipe_4.50_bit_mixedpalette"
MANIFEST = f"""\
name: apple-recipe
source:
  repo: {SOURCE}
license: creativeml-openrail-m
publish:
  - repo: "bench/coreml-apple-recipe"
    precision: {{type: palettize, mixed_bit: {{recipe: {{file: pre-analysis.json, key: {KEY}}}}}}}
    attention: [ORIGINAL]
    components: [unet]
    layouts: [packages]
"""
CHILD = """
import json, sys
from pathlib import Path
from publisher.engine.build import BuildOptions, build
from publisher.manifest import load_manifests
from bench._common import peak_gib
manifest, work, endpoint, token = sys.argv[1:5]
options = BuildOptions(out=Path(work) / "out", store=Path(work) / "store", namespace="bench", compile=False,
                       endpoint=endpoint, token=token, isolate=False, progress=False)
result = build(load_manifests([Path(manifest)]), options)
assert result.ok, [v.error for v in result.variants]
folder = Path(work) / "out" / "bench" / "coreml-apple-recipe" / "original"
info = json.loads((folder / "build-info.json").read_text())
unet = info["fidelity"]["unet"]
print(json.dumps({"peak_gib": round(peak_gib(), 2), "recipe_layers": unet["mixed_bit"]["layers"],
                  "matched_ops": unet["mixed_bit"]["matched_ops"],
                  "applied_average_bits": unet["mixed_bit"].get("applied_average_bits"),
                  "package_bytes": unet.get("package_bytes"), "output_psnr_db": unet.get("output_psnr_db")}))
"""
# the mix of bit-widths the recipe assigns in turn (4.5 bits per layer on average; by weight it comes out otherwise)
MIX = (4, 6, 4, 4, 6, 2, 4, 8, 16, 4, 4, 2)


def main() -> None:
    work, port = staging_bench_work("apple-recipe-bench-")
    from diffusers import UNet2DConditionModel

    from publisher.staging.process import start_staging_hub
    from publisher.tiny import push_tiny_source

    source = work / "source"
    sd15_unet_source(source)
    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    layers = [name.removesuffix(".weight") for name, p in unet.named_parameters()
              if name.endswith(".weight") and p.numel() >= 1e5]
    recipe = {name: MIX[i % len(MIX)] for i, name in enumerate(layers)}
    manifests = work / "m"
    manifests.mkdir(exist_ok=True)
    (manifests / "pre-analysis.json").write_text(json.dumps({"model_version": SOURCE, "baselines": {},
                                                             "recipes": {KEY: recipe}}))
    (manifests / "apple-recipe.yaml").write_text(MANIFEST)
    with start_staging_hub(work / "hub", port=port, token=TOKEN) as hub:
        push_tiny_source(source, SOURCE, hub.url, TOKEN)
        result = run_code(CHILD, [str(manifests / "apple-recipe.yaml"), str(work), hub.url, TOKEN], ROOT)
    result["layers_named"] = len(recipe)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
