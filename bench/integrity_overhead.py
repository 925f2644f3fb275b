"""What the publish and fetch checks cost at full size: an SD 1.5-sized variant folder (~2.4 GB of packages with
random bytes) published and fetched through the staging Hub on loopback, with the project's checks and by the
unmodified client's plain path.

Run by hand (not in CI):  python bench/integrity_overhead.py [--repeat 2] [--scale 1.0]
- publish, checked: `publish_repo` (exactly build-info's files, each one's sha256 compared as the client hashes it)
- publish, plain:   `HfApi.upload_folder` of the same folder (the client's own hashing and upload, nothing else)
- fetch, checked:   `fetch_variant` (listed-size bounds, hashed as it streams, staged, moved into place)
- fetch, plain:     `snapshot_download(allow_patterns="original/packages/*")` (no checksum of the bytes)
Each figure is the median of `--repeat` rounds; a fresh repo per round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import staging_client_env  # noqa: E402

# float16 package weights of SD 1.5 (MB): the UNet, the text encoder, the VAE decoder and encoder, the safety checker
SIZES_MB = {"unet": 1720, "text_encoder": 246, "vae_decoder": 99, "vae_encoder": 68, "safety_checker": 304}
MANIFEST = """\
name: bench-sd
source: {repo: bench/sd, revision: main}
license: mit
publish:
  - repo: "{namespace}/coreml-bench"
    precision: {type: float16}
    attention: [ORIGINAL]
    layouts: [packages]
"""


def _write_random(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = os.urandom(16 << 20)
    with open(path, "wb") as handle:
        left = size
        while left:
            data = block[: min(left, len(block))]
            handle.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def make_variant(work: Path, namespace: str, scale: float) -> tuple[object, Path, int]:
    """A built-looking variant folder (packages + build-info) for `namespace`; returns (variant, repo folder, bytes)."""
    from publisher.build_info import BUILD_INFO, BuildInfo, write_build_info
    from publisher.manifest import load_manifests
    from publisher.plan import build_plan

    manifest = work / f"{namespace}.yaml"
    manifest.write_text(MANIFEST)
    variant = build_plan(load_manifests([manifest]), namespace).variants[0]
    repo_dir = work / "out" / variant.repo_id
    folder = repo_dir / "original"
    files = {}
    for component, mb in SIZES_MB.items():
        package = f"packages/Stable_Diffusion_version_bench_sd_{component}.mlpackage"
        weight = f"{package}/Data/com.apple.CoreML/weights/weight.bin"
        size = int(mb * scale * 1_000_000)
        files[weight] = (_write_random(folder / weight, size), size)
        for name, data in ((f"{package}/Manifest.json", b"{}"), (f"{package}/Data/com.apple.CoreML/model.mlmodel",
                                                                   os.urandom(200_000))):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            files[name] = (hashlib.sha256(data).hexdigest(), len(data))
    info = BuildInfo.model_validate({
        "variant": variant.to_json(), "source": {"repo": "bench/sd", "revision": "main", "commit": "0" * 40},
        "manifest": {"name": "bench-sd", "variant_sha256": "0" * 64}, "tools": {}, "compiled": False,
        "files": {name: {"sha256": sha, "size": size} for name, (sha, size) in files.items()}})
    write_build_info(folder / BUILD_INFO, info)
    return variant, repo_dir, sum(size for _, size in files.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes (0.05 for a quick run)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="integrity-bench-"))
    port = staging_client_env(work)
    from huggingface_hub import HfApi, snapshot_download

    from publisher.fetch import fetch_variant
    from publisher.publish.hub import publish_repo
    from publisher.staging.process import start_staging_hub

    times: dict[str, list[float]] = {"publish_checked": [], "publish_plain": [], "fetch_checked": [],
                                     "fetch_plain": []}
    total = 0
    try:
        with start_staging_hub(work / "hub", port=port, token="t") as hub:
            api = HfApi(endpoint=hub.url, token="t")
            for round_ in range(args.repeat):
                # fresh random bytes for each side: the Hub stores an object once, and a second upload of the same
                # bytes would send nothing
                made = {kind: make_variant(work, f"{kind}{round_}", args.scale) for kind in ("checked", "plain")}
                total = made["checked"][2]
                order = ["checked", "plain"] if round_ % 2 == 0 else ["plain", "checked"]
                for kind in order:
                    variant, repo_dir, _ = made[kind]
                    repo_id = variant.repo_id  # type: ignore[attr-defined]
                    start = time.perf_counter()
                    if kind == "checked":
                        publish_repo(api, repo_id, repo_dir, [variant], hub.url)  # type: ignore[list-item]
                    else:
                        api.create_repo(repo_id, exist_ok=True)
                        api.upload_folder(folder_path=repo_dir / "original", path_in_repo="original", repo_id=repo_id)
                    times[f"publish_{kind}"].append(time.perf_counter() - start)
                for kind in order:
                    repo_id = made[kind][0].repo_id  # type: ignore[attr-defined]
                    target = work / f"fetched-{kind}-{round_}"
                    start = time.perf_counter()
                    if kind == "checked":
                        fetch_variant(repo_id, "original/packages", target, endpoint=hub.url, token="t")
                    else:
                        snapshot_download(repo_id, allow_patterns="original/packages/*", local_dir=target, token="t")
                    times[f"fetch_{kind}"].append(time.perf_counter() - start)
                    shutil.rmtree(target, ignore_errors=True)
                for _, repo_dir, _ in made.values():
                    shutil.rmtree(repo_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {name: round(statistics.median(values), 2) for name, values in times.items()}
    result["bytes"] = total
    result["publish_overhead"] = round(result["publish_checked"] / result["publish_plain"] - 1, 3)
    result["fetch_overhead"] = round(result["fetch_checked"] / result["fetch_plain"] - 1, 3)
    print(f"variant: {total / 1e9:.2f} GB; rounds: {args.repeat}")
    for name, values in times.items():
        print(f"{name:16s} median {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)}) "
              f"{total / statistics.median(values) / 2**20:7.0f} MiB/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
