"""Source fetch: only the weight copy a build loads is downloaded (fp16 safetensors first), and it builds the
same packages as the float32 file cast to float16."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from publisher.convert.coreml import PackageMetadata, convert_component
from publisher.convert.weight_files import choose_weights
from publisher.deployment import DeploymentTarget
from publisher.engine.source import SourceFile, fetch_source, select_source_files
from publisher.errors import SourceError
from publisher.tiny import add_hub_copies, build_tiny_pipeline, push_tiny_source
from publisher.vocabulary import Attention, Component
from tests.helpers import SD_COMPONENTS

pytestmark = pytest.mark.slow  # converts, builds or publishes models

# the layout of stable-diffusion-v1-5/stable-diffusion-v1-5 (30 files)
SD15 = [
    "model_index.json", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors", "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
COMMON = ["model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
          "tokenizer/special_tokens_map.json"]


def _tree(names: list[str]) -> dict[str, SourceFile]:
    return {name: SourceFile(name, 1, None) for name in names}


def test_sd15_layout_gets_the_fp16_safetensors_only() -> None:
    files, warnings = select_source_files(_tree(SD15), SD_COMPONENTS, "auto", "sd15@main")
    assert [f.path for f in files] == COMMON + [
        "scheduler/scheduler_config.json",  # what a Core AI bundle's metadata says of the scheduler
        "safety_checker/config.json", "safety_checker/model.fp16.safetensors",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert warnings == []
    float32, _ = select_source_files(_tree(SD15), [Component.UNET], "fp32", "sd15@main")
    assert [f.path for f in float32][-1] == "unet/diffusion_pytorch_model.safetensors"


def test_preferences_and_refusals() -> None:
    assert choose_weights("unet", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"], "auto") == (
        ["diffusion_pytorch_model.safetensors"], None)
    files, warning = choose_weights("unet", ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.non_ema.bin"],
                                    "auto")
    assert files == ["diffusion_pytorch_model.bin"]
    assert warning == "unet/: loading pickled weights (diffusion_pytorch_model.bin); no safetensors copy found"
    sharded = ["diffusion_pytorch_model.safetensors.index.fp16.json",
               "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
               "diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "diffusion_pytorch_model.safetensors"]
    assert choose_weights("unet", sharded, "auto")[0] == sharded[:3]
    with pytest.raises(SourceError, match=r"^unet/ has no fp16 weights in diffusers' names \(weight files: "
                                          r"diffusion_pytorch_model.safetensors\)$"):
        choose_weights("unet", ["diffusion_pytorch_model.safetensors"], "fp16")
    with pytest.raises(SourceError, match="has no fp16 or float32 weights"):
        choose_weights("unet", ["diffusion_pytorch_model.non_ema.safetensors", "v1-5-pruned.ckpt"], "auto")


def _snapshot_files(cache: Path, repo: str) -> set[str]:
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snapshots.iterdir() for p in s.rglob("*") if p.is_file()}


def test_fetch_downloads_no_decoy_and_no_float32_copy(staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = build_tiny_pipeline(tmp_path / "src")
    decoys = add_hub_copies(source)
    push_tiny_source(source, "tiny/sd-hub-layout", staging_hub.url, staging_hub.token)
    cache = tmp_path / "cache"
    fetched = fetch_source("tiny/sd-hub-layout", "main", SD_COMPONENTS, cache, endpoint=staging_hub.url,
                           token=staging_hub.token)
    downloaded = _snapshot_files(cache, "tiny/sd-hub-layout")
    assert not downloaded & set(decoys)
    weights = {name for name in downloaded if name.endswith((".safetensors", ".bin"))}
    assert weights == {"text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.fp16.safetensors", "safety_checker/model.fp16.safetensors"}
    assert downloaded == {f.path for f in fetched.files}
    for item in fetched.files:  # recorded with the Hub's sizes and LFS oids, and the loaders see only these
        data = (fetched.path / item.path).read_bytes()
        assert len(data) == item.size
        if item.sha256:
            assert hashlib.sha256(data).hexdigest() == item.sha256
    assert {p.relative_to(fetched.path).as_posix() for p in fetched.path.rglob("*") if p.is_file()} == downloaded

    plain = build_tiny_pipeline(tmp_path / "src32", components=(Component.TEXT_ENCODER, Component.UNET))
    add_hub_copies(plain, fp16=False)
    push_tiny_source(plain, "tiny/sd-no-fp16", staging_hub.url, staging_hub.token)
    fetched = fetch_source("tiny/sd-no-fp16", "main", [Component.UNET], tmp_path / "cache2",
                           endpoint=staging_hub.url, token=staging_hub.token)
    assert [f.path for f in fetched.files if f.path.startswith("unet/")] == [
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def test_packages_from_the_fp16_copy_equal_float32_cast_to_float16(tmp_path: Path) -> None:
    """Every weight of the package built from the fp16 copy equals the one built from the float32 file, bit for
    bit, except where coremltools folds a float32 constant into a weight: the attention scale 1/sqrt(head_dim) is
    multiplied into the query projections in float32 before the cast, so those differ by at most one float16 ulp
    (the float32 product of an fp16-rounded weight rounds differently now and then)."""
    import numpy as np

    from publisher.milfile import const_values

    float32 = build_tiny_pipeline(tmp_path / "fp32", components=(Component.UNET,))
    float16 = tmp_path / "fp16"
    shutil.copytree(float32, float16)
    add_hub_copies(float16, decoys=False)
    (float16 / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # only the fp16 copy is left
    packages = []
    for source in (float32, float16):
        out = tmp_path / source.name / "unet.mlpackage"
        convert_component(source, Component.UNET, Attention.SPLIT_EINSUM_V2, 256, DeploymentTarget.iOS16, out,
                          PackageMetadata("tiny/sd@main", "mit", Attention.SPLIT_EINSUM_V2))
        packages.append(const_values(out))
    assert packages[0].keys() == packages[1].keys()
    folded = []
    for name, value in packages[0].items():
        a, b = np.asarray(value), np.asarray(packages[1][name])
        if np.array_equal(a, b):
            continue
        folded.append(name)
        assert name.startswith("q_") and a.dtype == np.float16, name
        assert np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= np.spacing(np.abs(a))), name
    assert len(folded) <= 8 and len(packages[0]) > 1000  # 8 attention layers; everything else bit-identical


def test_source_cache_key_follows_commit_and_file_list(staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`publisher source-key` (the workflow's cache key): stable for the same commit, new for a new commit; nothing
    is downloaded to compute it."""
    import os
    import subprocess
    import sys

    from publisher.engine.source import plan_source

    source = build_tiny_pipeline(tmp_path / "src", components=(Component.TEXT_ENCODER, Component.UNET))
    add_hub_copies(source, decoys=False)
    push_tiny_source(source, "tiny/sd-keyed", staging_hub.url, staging_hub.token)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: keyed\nsource:\n  repo: tiny/sd-keyed\n  components: [text_encoder, unet]\n"
                        "license: mit\nresolution: 256\npublish:\n  - repo: me/keyed\n"
                        "    precision: {type: float16}\n    attention: [ORIGINAL]\n")
    env = {**os.environ, "PUBLISHER_SOURCE_ENDPOINT": staging_hub.url, "HF_HUB_CACHE": str(tmp_path / "no-cache")}

    def key() -> str:
        result = subprocess.run([sys.executable, "-m", "publisher", "source-key", str(manifest)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    first = key()
    assert first == key() and first.startswith("tiny--sd-keyed-")
    assert not (tmp_path / "no-cache").exists()  # nothing was downloaded
    chosen = plan_source("tiny/sd-keyed", "main", [Component.UNET], endpoint=staging_hub.url)
    assert [f.path for f in chosen.files][-1] == "unet/diffusion_pytorch_model.fp16.safetensors"
    (source / "unet" / "config.json").write_text((source / "unet" / "config.json").read_text() + "\n")
    push_tiny_source(source, "tiny/sd-keyed", staging_hub.url, staging_hub.token)
    assert key() != first


def test_streamed_models_equal_the_library_loader(tmp_path: Path) -> None:
    """A diffusers model read tensor by tensor into a meta-built model holds what diffusers' own loader gives
    (float32, from the fp16 copy or the float32 one); where it does not apply it declines (None)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from publisher.convert.weight_files import load_streaming, weights_variant
    from publisher.tiny import add_hub_copies, build_tiny_pipeline

    source = build_tiny_pipeline(tmp_path / "sd", components=(Component.TEXT_ENCODER, Component.UNET,
                                                               Component.VAE_DECODER))
    add_hub_copies(source, fp16=True, decoys=False)
    for name in ("unet", "vae"):  # only the fp16 copy left, as a fetch leaves it
        (source / name / "diffusion_pytorch_model.safetensors").unlink()
    for cls, folder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        streamed = load_streaming(cls, source / folder)
        reference = cls.from_pretrained(source / folder, torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                        variant=weights_variant(source / folder))
        assert type(streamed) is cls and not streamed.training
        ours, theirs = streamed.state_dict(), reference.state_dict()
        assert set(ours) == set(theirs)
        assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_streaming(CLIPTextModel, source / "text_encoder") is None  # transformers: its own loader
    pickled = tmp_path / "pickled"
    shutil.copytree(source / "unet", pickled)
    weights = pickled / "diffusion_pytorch_model.fp16.safetensors"
    weights.rename(pickled / "diffusion_pytorch_model.fp16.bin")
    assert load_streaming(UNet2DConditionModel, pickled) is None  # no safetensors copy
