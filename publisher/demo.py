"""`publisher demo`: the whole job offline, on the embedded default (staging Hub + a tiny SD-shaped model)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from publisher.errors import PublisherError

DEMO_SOURCE = "demo/tiny-sd"
DEMO_NAMESPACE = "demo"
DEMO_MANIFEST = """\
# yaml-language-server: $schema=manifest.schema.json
name: tiny-sd
description: tiny SD-shaped model with random weights (the demo's source)
source:
  repo: demo/tiny-sd
  revision: main
license: mit
resolution: 256
publish:
  - repo: "{namespace}/coreml-tiny-sd"
    precision: {type: float16}
    attention: [ORIGINAL, SPLIT_EINSUM_V2]
    layouts: [packages]
    evaluate: {steps: 2}
  - repo: "{namespace}/coreml-tiny-sd-palettized"
    precision: {type: palettize, nbits: 6}
    attention: [ORIGINAL, SPLIT_EINSUM_V2]
    layouts: [packages]
    evaluate: {steps: 2}
"""


def run_demo(work: Path | None = None, say: Callable[[str], None] = print) -> dict[str, object]:
    """Start a staging Hub, publish a tiny source model to it, build and publish the two-repo manifest, download
    one variant back and check it against the contract. Returns a summary; raises PublisherError on a failure."""
    started = time.perf_counter()
    keep = work is not None
    work = Path(work or tempfile.mkdtemp(prefix="publisher-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_DISABLE_XET"] = "1"  # before huggingface_hub is imported: the staging Hub speaks LFS
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' pass-by-pass bars: the demo prints its own steps
    os.environ["HF_HOME"] = str(work / "hf-home")
    token = secrets.token_hex(16)
    from publisher.staging.process import start_staging_hub

    try:
        with start_staging_hub(work / "hub", port=0, token=token) as hub:
            say(f"1. staging Hub running at {hub.url} (data in {hub.root})")
            summary = _run(work, hub.url, token, say)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    say(f"demo finished in {summary['seconds']} s")
    return summary


def _run(work: Path, endpoint: str, token: str, say: Callable[[str], None]) -> dict[str, object]:
    from huggingface_hub import snapshot_download

    from publisher.contract import ModelDims
    from publisher.engine.build import BuildOptions, build
    from publisher.families.sd import FAMILY as SD
    from publisher.manifest import load_manifests
    from publisher.publish import PublishOptions, publish
    from publisher.tiny import build_tiny_pipeline, push_tiny_source
    from publisher.verify.contract import contract_problems

    source = build_tiny_pipeline(work / "tiny-sd")
    commit = push_tiny_source(source, DEMO_SOURCE, endpoint, token)
    say(f"2. tiny SD-shaped source model published as {DEMO_SOURCE} (commit {commit[:12]})")
    manifest_path = work / "manifests" / "tiny-sd.yaml"
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(DEMO_MANIFEST)
    manifests = load_manifests([manifest_path])
    out = work / "build"
    result = build(manifests, BuildOptions(out=out, store=work / "store", namespace=DEMO_NAMESPACE, compile=False,
                                           endpoint=endpoint, token=token, isolate=False, progress=False,
                                           evaluate="on"))
    if not result.ok:
        raise PublisherError("demo build failed: " + "; ".join(v.error or "" for v in result.variants if v.error))
    say(f"3. built {len(result.variants)} variants ({len(result.built)} steps) into {out} "
        "(packages only: compiling needs macOS)")
    outcomes = publish(manifests, PublishOptions(out=out, namespace=DEMO_NAMESPACE, target="staging",
                                                 endpoint=endpoint, token=token))
    for outcome in outcomes:
        sent = sum(d.upload_bytes for d in outcome.diffs)
        say(f"4. published {outcome.repo_id}: {len(outcome.commits)} commits, {sent / 2**20:.1f} MiB sent")
    repo = f"{DEMO_NAMESPACE}/coreml-tiny-sd-palettized"
    local = Path(snapshot_download(repo, allow_patterns="split_einsum_v2/packages/*", local_dir=work / "download",
                                   endpoint=endpoint, token=token))
    packages = sorted((local / "split_einsum_v2" / "packages").glob("*.mlpackage"))
    dims = ModelDims(resolution=256, text_hidden=32)
    problems = []
    for package in packages:
        submodule = SD.submodule_of_package(package.name, "demo_tiny-sd") or package.name
        problems += [f"{package.name}: {p}" for p in contract_problems(package, submodule, dims)]
    manifest = manifests[0].manifest
    expected = len(next(manifest.components_for(t) for t in manifest.publish if t.repo_id(DEMO_NAMESPACE) == repo))
    if len(packages) != expected or problems:
        raise PublisherError(f"downloaded variant does not meet the contract: {len(packages)} packages; "
                             + "; ".join(problems))
    say(f"5. downloaded {repo} split_einsum_v2/packages with snapshot_download: {len(packages)} packages, "
        "names, inputs and outputs as the apps expect")
    end_to_end = _end_to_end(out)
    say("6. end to end (the build's check: seeded prompts through the packages on the executor, against diffusers' "
        "float32 pipeline): " + "; ".join(f"{name} image {f['image_psnr_db']:.1f} dB" + (
            f" ({f['image_psnr_vs_float16_db']:.1f} dB against float16)" if "image_psnr_vs_float16_db" in f else "")
            for name, f in end_to_end.items()) + "; a sample image per variant is in its folder and the card")
    again = publish(manifests, PublishOptions(out=out, namespace=DEMO_NAMESPACE, target="staging", endpoint=endpoint,
                                              token=token))
    resent = sum(len(o.commits) for o in again)
    say(f"7. republished: {resent} new commits (nothing had changed)")
    return {"variants": len(result.variants), "packages_checked": len(packages), "republish_commits": resent,
            "end_to_end": end_to_end}


def _end_to_end(out: Path) -> dict[str, dict[str, float]]:
    """The figures the build's end-to-end check recorded for every variant."""
    from publisher.build_info import find_build_infos, read_build_info

    figures = {}
    for path in find_build_infos(out):
        info = read_build_info(path)
        if not info.evaluation:
            raise PublisherError(f"{path}: the build did not evaluate {info.variant['id']}")
        figures[info.variant["id"].removeprefix(f"{DEMO_NAMESPACE}/")] = info.evaluation["figures"]
    return figures
