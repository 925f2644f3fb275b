"""Resolution packs at full size: an SD 1.5-shaped UNet (random weights), ORIGINAL and SPLIT_EINSUM, float16, built at
512x512 alone, then with the 512x768 and 768x512 packs added (the same store: only the new sizes are converted);
each build published to a staging Hub.

Run by hand (not in CI; ~30 min):
    python bench/resolution_packs.py [--work DIR]

Printed as JSON: per build its wall time, peak RSS and the bytes the staging Hub received for its publish. The
goals of the issue: the two extra sizes cost <= 0.5x the first size's wall time, and the three-size repo's upload
<= 1.05x the one-size repo's (the weight files are the same bytes in every pack: the Hub already has them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import run_code, sd15_unet_source, staging_bench_work, staging_bytes  # noqa: E402

TOKEN = "bench-token"
SOURCE = "bench/sd15-unet"
MANIFEST = """\
name: packs
source:
  repo: {source}
license: creativeml-openrail-m
resolution: {sizes}
publish:
  - repo: "bench/coreml-packs"
    precision: {{type: float16}}
    attention: [ORIGINAL, SPLIT_EINSUM]
    components: [unet]
    layouts: [packages]
"""

CHILD = """
import json, sys
from pathlib import Path
from publisher.engine.build import BuildOptions, build
from publisher.manifest import load_manifests
from publisher.publish import PublishOptions, publish
from bench._common import peak_gib
manifest, work, endpoint, token = sys.argv[1:5]
loaded = load_manifests([Path(manifest)])
options = BuildOptions(out=Path(work) / "out", store=Path(work) / "store", namespace="bench", compile=False,
                       verify=False, endpoint=endpoint, token=token, isolate=False, progress=False)
result = build(loaded, options)
assert result.ok, [v.error for v in result.variants]
built = len([s for s in result.built if result.plan.steps[s].kind == "convert"])
peak = peak_gib()
publish(loaded, PublishOptions(out=Path(work) / "out", namespace="bench", target="staging", endpoint=endpoint,
                               token=token))
print(json.dumps({"peak_gib": round(peak, 2), "conversions": built}))
"""


def _run(manifest: Path, work: Path, endpoint: str) -> dict[str, Any]:
    before = staging_bytes(endpoint, TOKEN, "bytes_received")
    result = run_code(CHILD, [str(manifest), str(work), endpoint, TOKEN], ROOT)
    result["bytes_received"] = staging_bytes(endpoint, TOKEN, "bytes_received") - before
    return result


def main() -> None:
    work, port = staging_bench_work("packs-bench-")
    from publisher.staging.process import start_staging_hub
    from publisher.tiny import push_tiny_source

    source = work / "source"
    sd15_unet_source(source)
    with start_staging_hub(work / "hub", port=port, token=TOKEN) as hub:
        push_tiny_source(source, SOURCE, hub.url, TOKEN)
        (work / "m").mkdir(exist_ok=True)
        manifest = work / "m" / "packs.yaml"
        manifest.write_text(MANIFEST.format(source=SOURCE, sizes="512"))
        one = _run(manifest, work, hub.url)
        manifest.write_text(MANIFEST.format(source=SOURCE, sizes='[512, "512x768", "768x512"]'))
        three = _run(manifest, work, hub.url)
        print(json.dumps({"one_size": one, "two_more_sizes": three,
                          "extra_sizes_wall_ratio": round(three["wall_s"] / one["wall_s"], 2),
                          "three_size_upload_ratio": round((one["bytes_received"] + three["bytes_received"])
                                                           / one["bytes_received"], 3)}, indent=2))


if __name__ == "__main__":
    main()
