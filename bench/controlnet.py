"""ControlNet at full size: an SD 1.5-shaped ControlNet (random weights, diffusers' ControlNetModel made from an
SD 1.5-shaped UNet, as lllyasviel's are) converted per attention, and the ControlledUnet against the plain UNet
(ORIGINAL), each float16 at 512x512 through the project's converter.

Run by hand (not in CI; ~20 min, ~8 GiB):
    python bench/controlnet.py [--work DIR] [--attention ORIGINAL ...] [--skip-unets] [--family sdxl]

`--family sdxl`: an SDXL-shaped ControlNet (made from SDXL's UNet, with its added conditioning) at 1024x1024.

Each conversion runs in its own process; printed as JSON per conversion: wall time, peak RSS (VmHWM), package
size, and the package's op counts (conv, linear, matmul, transpose, einsum).
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

CHILD = """
import json, sys
from pathlib import Path
from publisher.convert.coreml import PackageMetadata, convert_component
from publisher.deployment import DeploymentTarget
from publisher.vocabulary import Attention, Component

from publisher.mlpackage import load_program, main_operations
from bench._common import peak_gib
source, component, attention, output, family, size = sys.argv[1:7]
convert_component(Path(source), Component(component), Attention(attention), int(size), DeploymentTarget.iOS16,
                  Path(output), PackageMetadata("bench/random", "mit", Attention(attention)), family=family)
peak = peak_gib()
counts = {}
for op in main_operations(load_program(Path(output))):
    counts[op.op_type] = counts.get(op.op_type, 0) + 1
size = sum(p.stat().st_size for p in Path(output).rglob("*") if p.is_file())
print(json.dumps({"peak_gib": round(peak, 2), "package_bytes": size,
                  "ops": {k: counts.get(k, 0) for k in ("conv", "linear", "matmul", "transpose", "einsum")}}))
"""


def make_sources(folder: Path, family: str) -> None:
    """The SD 1.5- (or SDXL-) shaped UNet (bench/convert_unet.py's) and a ControlNet made from it, laid out as a
    build composes them (`controlnet/` beside `unet/`); kept when already there."""
    if (folder / "controlnet" / "config.json").exists():
        return
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from bench.convert_unet import make_source  # type: ignore[import-not-found]

    make_source(folder, family)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", variant="fp16" if family == "sdxl" else None)
    controlnet = ControlNetModel.from_unet(unet)
    with torch.no_grad():  # non-zero "zero" convolutions, as a trained ControlNet has
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            for parameter in block.parameters():
                parameter.normal_(0, 0.02)
    if family == "sdxl":
        controlnet = controlnet.half()  # as the UNet: the fp16 copy a fetch prefers
    controlnet.save_pretrained(folder / "controlnet", variant="fp16" if family == "sdxl" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--attention", nargs="*", default=["ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2"])
    parser.add_argument("--skip-unets", action="store_true", help="only the ControlNet conversions")
    parser.add_argument("--family", choices=["sd", "sdxl"], default="sd")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-controlnet-"))
    source = work / "source"
    make_sources(source, args.family)
    size = "1024" if args.family == "sdxl" else "512"
    jobs = [(f"controlnet-bench_{args.family}-controlnet", attention) for attention in args.attention]
    if not args.skip_unets:
        jobs += [("unet", "ORIGINAL"), ("control-unet", "ORIGINAL")]
    for component, attention in jobs:
        output = work / f"{component}-{attention}.mlpackage"
        result = run_code(CHILD, [str(source), component, attention, str(output), args.family, size], ROOT)
        print(json.dumps({"component": component, "attention": attention, **result}), flush=True)


if __name__ == "__main__":
    main()
