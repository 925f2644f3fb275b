"""Helpers shared by the benchmarks: peak RSS of this process, and running one side in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def staging_client_env(work: Path) -> int:
    """A free loopback port for a staging Hub, and the client's settings pointed at it (before huggingface_hub is
    imported: it reads them then). Returns the port."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    os.environ.update({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_XET": "1",
                       "HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    return port


def staging_bench_work(prefix: str) -> tuple[Path, int]:
    """A staging-Hub bench's command line (`--work DIR`, default a new temp folder) and the client's settings
    pointed at a free port (staging_client_env): (work, port)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    return work, staging_client_env(work)


def write_random(path: Path, size: int) -> None:
    """A file of `size` incompressible bytes (a 16 MiB random block repeated: fast to make, and the staging Hub
    stores each upload whole whatever its content)."""
    import os

    with open(path, "wb") as handle:
        block = os.urandom(16 * 1024 * 1024)
        for _ in range(size // len(block)):
            handle.write(block)
        handle.write(os.urandom(size % len(block)))


def peak_gib() -> float:
    """VmHWM of this process in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_child(script: str, args: list[str], label: str) -> dict:
    """Run `script args` in a fresh process; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_size_unet_package(work: Path, source: Path | None, package: Path | None) -> tuple[Path, Path]:
    """(source folder, package): the given ones, or a random-weight SD 1.5-shaped UNet made and converted
    (ORIGINAL attention) under `work`."""
    if source is not None and package is not None:
        return source, package
    from bench.convert_unet import make_source  # type: ignore[import-not-found]
    from publisher.convert.coreml import PackageMetadata, convert_isolated
    from publisher.deployment import DeploymentTarget
    from publisher.vocabulary import Attention, Component

    source = work / "source"
    make_source(source)
    package = work / "unet.mlpackage"
    convert_isolated(source, Component.UNET, Attention.ORIGINAL, 512, DeploymentTarget.iOS16, package,
                     PackageMetadata("bench/sd15@random", "mit", Attention.ORIGINAL))
    return source, package


def staging_bytes(endpoint: str, token: str, field: str) -> int:
    """The staging Hub's byte counter `field` (bytes_sent, bytes_received), summed over its routes."""
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/api/staging/stats", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request) as response:
        return int(sum(json.loads(response.read())[field].values()))


def run_code(code: str, args: list[str], root: Path) -> dict:
    """Run `python -c code args` with the project on the path; its last stdout line is a JSON result, to which the
    wall time is added."""
    import os
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-4000:]}")
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def sd15_unet_source(folder: Path) -> None:
    """An SD 1.5-shaped UNet (random weights, seed 0) as a pipeline repo the build fetches: its float32 and fp16
    safetensors, the tokenizer, the text encoder's config (the UNet's dimensions read it). Kept when already there."""
    if (folder / "model_index.json").exists():
        return
    from transformers import CLIPTextConfig

    from bench.build_manifest import TEXT  # type: ignore[import-not-found]
    from bench.convert_unet import make_source  # type: ignore[import-not-found]
    from publisher.tiny import add_hub_copies, write_tokenizer

    make_source(folder)
    write_tokenizer(folder / "tokenizer")
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    (folder / "text_encoder" / "config.json").write_text(CLIPTextConfig(**TEXT).to_json_string())
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}))
    add_hub_copies(folder, fp16=True, decoys=False)
