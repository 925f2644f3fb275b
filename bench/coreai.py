"""Core AI bundles at full size: an SD 1.5-shaped pipeline (random weights) exported per component as float16 and
INT4 (Apple's preset) assets through the project's exporter, against the float16 Core ML packages of the same
components (ORIGINAL) through the project's converter.

Run by hand (not in CI; ~15-25 min, ~10 GiB):
    python bench/coreai.py [--work DIR] [--compression float16 int4 palettize6] [--skip-coreml]

Each export runs in its own process; printed as JSON per component and format: wall time, peak RSS (VmHWM), size
on disk and, for Core AI, the stored value types.
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

COREAI = """
import json, sys
from pathlib import Path
from publisher.convert.coreai import export_asset
from publisher.coreai_bundle import CoreAICompression
from publisher.vocabulary import Component
from bench._common import peak_gib
source, component, kind, nbits, output = sys.argv[1:6]
record = export_asset(Path(source), Component(component), 512, CoreAICompression(kind, int(nbits)), Path(output),
                      "bench", "mit", "bench", 0.0)
size = sum(p.stat().st_size for p in Path(output).rglob("*") if p.is_file())
extra = {}
if kind == "float16":  # the export ran the weight check; once more alone, for its own time
    import time
    from publisher.convert.coreai import check_weights
    start = time.perf_counter()
    extra = {**check_weights(Path(output), Path(source), Component(component)),
             "weight_check_s": round(time.perf_counter() - start, 1)}
print(json.dumps({"peak_gib": round(peak_gib(), 2), "bytes": size, "storage_types": record["storage_types"], **extra}))
"""

COREML = """
import json, sys
from pathlib import Path
from publisher.convert.coreml import PackageMetadata, convert_component
from publisher.deployment import DeploymentTarget
from publisher.vocabulary import Attention, Component
from bench._common import peak_gib
source, component, output = sys.argv[1:4]
convert_component(Path(source), Component(component), Attention.ORIGINAL, 512, DeploymentTarget.iOS16, Path(output),
                  PackageMetadata("bench/sd15@random", "mit", Attention.ORIGINAL))
size = sum(p.stat().st_size for p in Path(output).rglob("*") if p.is_file())
print(json.dumps({"peak_gib": round(peak_gib(), 2), "bytes": size}))
"""

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
KINDS = {"float16": ("float16", 0), "int4": ("int4", 0), "palettize6": ("palettize", 6)}


def main() -> None:
    from bench.generate_full import make_source  # type: ignore[import-not-found]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--compression", nargs="*", default=["float16", "int4"], choices=sorted(KINDS))
    parser.add_argument("--components", nargs="*", default=list(COMPONENTS), choices=COMPONENTS)
    parser.add_argument("--skip-coreml", action="store_true", help="only the Core AI exports")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-coreai-"))
    source = work / "source"
    make_source(source)
    for component in args.components:
        for name in args.compression:
            if name != "float16" and component.startswith("vae"):
                continue  # the VAE is never compressed: its float16 asset serves every bundle
            kind, nbits = KINDS[name]
            output = work / name / f"{component}.aimodel"
            result = run_code(COREAI, [str(source), component, kind, str(nbits), str(output)], ROOT)
            print(json.dumps({"format": "coreai", "component": component, "compression": name, **result}), flush=True)
        if not args.skip_coreml:
            output = work / "coreml" / f"{component}.mlpackage"
            result = run_code(COREML, [str(source), component, str(output)], ROOT)
            print(json.dumps({"format": "coreml", "component": component, "compression": "float16", **result}),
                  flush=True)


if __name__ == "__main__":
    main()
