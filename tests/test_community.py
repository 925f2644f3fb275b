"""Community sources: a single-file checkpoint (original key layout) read with a diffusers config repo, and LoRAs
fused before conversion, through the staging Hub; and the refusals, each one line, before anything converts."""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from publisher.convert.community import check_fits, checkpoint_shapes, load_pickle, prepare_source
from publisher.engine.build import BuildOptions, build
from publisher.errors import SourceError
from publisher.manifest import load_manifests
from publisher.tiny import build_tiny_pipeline, push_tiny_source, write_single_file, write_tiny_lora
from tests.helpers import TINY_SOURCE_REPO

pytestmark = pytest.mark.slow  # builds models

SINGLE_FILE_REPO = "tiny/sd-single-file"
LORA_REPO = "tiny/sd-loras"
FUSED_REPO = "tiny/sd-fused-by-diffusers"
WIDE_REPO = "tiny/sd-wide-single-file"

MANIFEST = """\
name: {name}
source:
{source}
license: creativeml-openrail-m
resolution: 256
publish:
  - repo: "{{namespace}}/coreml-{name}"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    components: [{components}]
    layouts: [packages]
"""


def _manifest(folder: Path, name: str, source: str, components: str = "text_encoder, unet, vae_decoder") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(MANIFEST.format(name=name, source=source, components=components))
    return path


def _options(work: Path, hub, **extra) -> BuildOptions:  # type: ignore[no-untyped-def]
    return BuildOptions(out=work / "out", store=work / "store", namespace="tester", compile=False,
                        endpoint=hub.url, token=hub.token, isolate=False, progress=False, **extra)


def _sent(hub) -> int:  # type: ignore[no-untyped-def]
    request = urllib.request.Request(f"{hub.url}/api/staging/stats", headers={"Authorization": f"Bearer {hub.token}"})
    with urllib.request.urlopen(request) as response:
        return sum(json.loads(response.read())["bytes_sent"].values())


def _weights(result, submodule: str) -> str:  # type: ignore[no-untyped-def]
    """The sha256 of a built package's weight file."""
    (variant,) = result.variants
    (package,) = (variant.path / "packages").glob(f"*_{submodule}.mlpackage")
    return hashlib.sha256((package / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def community(tmp_path_factory: pytest.TempPathFactory, staging_hub, tiny_source_repo) -> dict:  # type: ignore[no-untyped-def]
    """The tiny source (as tiny_source_repo has it) as one checkpoint, two LoRAs for it, and the reference: the
    pipeline with the UNet-only LoRA fused by diffusers, as a diffusers repo."""
    from diffusers import StableDiffusionPipeline

    work = tmp_path_factory.mktemp("community")
    pipeline = build_tiny_pipeline(work / "pipeline")  # the same seed as tiny_source_repo: the same weights
    single = work / "single"
    write_single_file(pipeline, single / "model.safetensors")
    (single / "another-checkpoint.safetensors").write_bytes((single / "model.safetensors").read_bytes())
    push_tiny_source(single, SINGLE_FILE_REPO, staging_hub.url, staging_hub.token)
    loras = work / "loras"
    write_tiny_lora(pipeline, loras / "unet-only.safetensors", text_encoder=False)
    write_tiny_lora(pipeline, loras / "with-text-encoder.safetensors", seed=2)
    push_tiny_source(loras, LORA_REPO, staging_hub.url, staging_hub.token)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.load_lora_weights(str(loras), weight_name="unet-only.safetensors", adapter_name="a")
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["a"])
    pipe.unload_lora_weights()
    fused = work / "fused"
    pipe.save_pretrained(fused)
    shutil.rmtree(fused / "tokenizer")  # the source's own tokenizer files (transformers saves other names)
    shutil.copytree(pipeline / "tokenizer", fused / "tokenizer")
    push_tiny_source(fused, FUSED_REPO, staging_hub.url, staging_hub.token)
    return {"work": work, "pipeline": pipeline, "single": single, "loras": loras}


def test_single_file_builds_the_packages_of_its_diffusers_source(community, staging_hub, converted) -> None:  # type: ignore[no-untyped-def]
    """The same weight files as the diffusers-format source's packages (the session's float16 ORIGINAL conversions
    of the same pipeline, `converted`)."""
    from publisher.vocabulary import Attention, Component

    work = community["work"] / "single-build"
    before = _sent(staging_hub)
    source = f"  repo: {SINGLE_FILE_REPO}\n  file: model.safetensors\n  config: {{repo: {TINY_SOURCE_REPO}}}"
    single = build(load_manifests([_manifest(work / "m2", "from-single-file", source)]), _options(work / "b",
                                                                                                  staging_hub))
    assert single.ok, [v.error for v in single.variants]
    for submodule in ("text_encoder", "unet", "vae_decoder"):  # the same weights, converted the same way
        package = converted[Attention.ORIGINAL, Component(submodule)]
        expected = hashlib.sha256((package / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()).hexdigest()
        assert _weights(single, submodule) == expected, submodule

    # downloaded: the one checkpoint and the config repo's small files, none of the config repo's weights
    checkpoint = (community["single"] / "model.safetensors").stat().st_size
    small = sum(p.stat().st_size for p in community["pipeline"].rglob("*")
                if p.is_file() and not p.name.endswith(".safetensors"))
    config_weights = min(p.stat().st_size for p in community["pipeline"].rglob("*.safetensors"))
    sent = _sent(staging_hub) - before
    assert checkpoint + small <= sent < checkpoint + small + config_weights // 4

    (variant,) = single.variants
    info = json.loads((variant.path / "build-info.json").read_text())
    digest = hashlib.sha256((community["single"] / "model.safetensors").read_bytes()).hexdigest()
    (entry,) = info["source"]["files"].values()
    assert list(info["source"]["files"]) == ["model.safetensors"]
    assert (entry["size"], entry["sha256"], entry["verified"]) == (checkpoint, digest, True)
    config = info["extra_sources"]["config"]
    assert config["repo"] == TINY_SOURCE_REPO and "UNet (4 input channels, cross-attention width 32)" in \
        config["architecture"]
    assert not any(name.endswith(".safetensors") for name in config["files"])


def test_lora_is_fused_as_diffusers_fuses_it_and_only_what_it_changes_is_rebuilt(community, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work = community["work"] / "lora-build"
    reference = build(load_manifests([_manifest(work / "m1", "fused", f"  repo: {FUSED_REPO}", "text_encoder, unet")]),
                      _options(work / "a", staging_hub, verify=False))  # the packages to compare with
    assert reference.ok, [v.error for v in reference.variants]
    source = (f"  repo: {SINGLE_FILE_REPO}\n  file: model.safetensors\n  config: {{repo: {TINY_SOURCE_REPO}}}\n"
              f"  loras: [{{repo: {LORA_REPO}, file: unet-only.safetensors, scale: {{scale}}}}]")
    manifest = _manifest(work / "m2", "with-lora", source.replace("{scale}", "0.5"), "text_encoder, unet")
    merged = build(load_manifests([manifest]), _options(work / "b", staging_hub, verify=False))
    assert merged.ok, [v.error for v in merged.variants]
    half = {name: _weights(merged, name) for name in ("text_encoder", "unet")}  # the folder is rebuilt below
    assert half == {name: _weights(reference, name) for name in ("text_encoder", "unet")}
    (variant,) = merged.variants
    info = json.loads((variant.path / "build-info.json").read_text())
    lora = info["extra_sources"]["lora01"]
    assert lora["scale"] == 0.5 and lora["repo"] == LORA_REPO
    assert lora["files"]["unet-only.safetensors"]["sha256"] == hashlib.sha256(
        (community["loras"] / "unet-only.safetensors").read_bytes()).hexdigest()

    # another scale: the UNet is converted again, the text encoder (which this LoRA leaves alone) is not
    manifest.write_text(MANIFEST.format(name="with-lora", source=source.replace("{scale}", "1.0"),
                                        components="text_encoder, unet"))
    again = build(load_manifests([manifest]), _options(work / "b", staging_hub, verify=False))
    assert again.ok, [v.error for v in again.variants]
    rebuilt = {again.plan.steps[s].params.component for s in again.built  # type: ignore[union-attr]
               if again.plan.steps[s].kind == "convert"}
    kept = {again.plan.steps[s].params.component for s in again.cached  # type: ignore[union-attr]
            if again.plan.steps[s].kind == "convert"}
    assert rebuilt == {"unet"} and kept == {"text_encoder"}
    assert _weights(again, "unet") != half["unet"] and _weights(again, "text_encoder") == half["text_encoder"]

    # published, it is current until the LoRA's repo gets a new commit
    from huggingface_hub import HfApi

    from publisher.publish import PublishOptions, publish, status

    loaded = load_manifests([manifest])
    publish(loaded, PublishOptions(out=work / "b" / "out", namespace="tester", target="staging",
                                   endpoint=staging_hub.url, token=staging_hub.token))
    assert [r.reason for r in status(loaded, "tester", staging_hub.url, staging_hub.token)] == ["current"]
    HfApi(endpoint=staging_hub.url, token=staging_hub.token).upload_file(
        path_or_fileobj=b"a new commit\n", path_in_repo="NOTES.txt", repo_id=LORA_REPO)
    assert [r.reason for r in status(loaded, "tester", staging_hub.url, staging_hub.token)] == [
        "lora01 source has a new commit"]

    # a LoRA with text encoder layers changes the text encoder too (the prepare step alone: no conversion needed)
    out = work / "prepared-with-text-encoder"
    report = prepare_source(None, str(community["pipeline"]), [(str(community["loras"] / "with-text-encoder.safetensors"),
                                                               1.0, "with-text-encoder")], "sd", str(out))
    assert report["lora_folders"] == [["unet", "text_encoder"]]
    fused = load_file(out / "text_encoder" / "model.safetensors")
    original = load_file(community["pipeline"] / "text_encoder" / "model.safetensors")
    changed = {name for name in original if not torch.equal(original[name], fused[name])}
    assert set(fused) == set(original) and changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_a_checkpoint_of_another_architecture_is_refused_before_conversion(community, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work = community["work"] / "wide"
    wide = build_tiny_pipeline(work / "pipeline", cross_attention_dim=48)
    write_single_file(wide, work / "repo" / "wide.safetensors")
    push_tiny_source(work / "repo", WIDE_REPO, staging_hub.url, staging_hub.token)
    source = f"  repo: {WIDE_REPO}\n  file: wide.safetensors\n  config: {{repo: {TINY_SOURCE_REPO}}}"
    result = build(load_manifests([_manifest(work / "m", "wide", source)]), _options(work, staging_hub))
    (variant,) = result.variants
    assert variant.status == "failed"
    assert variant.error == (f"source {WIDE_REPO}: wide.safetensors: found a UNet (4 input channels, "
                             f"cross-attention width 48); the config {TINY_SOURCE_REPO}@main describes 4 input "
                             "channels, cross-attention width 32: use the config of the checkpoint's base model")
    assert result.built == []  # nothing was converted


def _fake(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict:
    save_file({name: torch.zeros(shape, dtype=torch.float16) for name, shape in shapes.items()}, path)
    return checkpoint_shapes(path)


@pytest.mark.parametrize(("shapes", "found"), [
    ({"input_blocks.0.0.weight": (32, 4, 3, 3), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
      "label_emb.0.0.weight": (8, 2816)}, "found an SDXL UNet (4 input channels, cross-attention width 2048), SDXL "
     "conditioner"),
    ({"input_blocks.0.0.weight": (32, 9, 3, 3), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768)},
     "found an SD 1.x inpainting UNet (9 input channels, cross-attention width 768)"),
    ({"input_blocks.0.0.weight": (32, 4, 3, 3), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)},
     "found an SD 2.x UNet (4 input channels, cross-attention width 1024)"),
])
def test_fit_refusals_name_what_was_found(tmp_path: Path, shapes: dict, found: str) -> None:
    (tmp_path / "config" / "unet").mkdir(parents=True)
    (tmp_path / "config" / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, "cross_attention_dim": 768}))
    header = _fake(tmp_path / "x.safetensors", {f"model.diffusion_model.{k}": v for k, v in shapes.items()})
    with pytest.raises(SourceError) as caught:
        check_fits(header, tmp_path / "config", "x.safetensors", "base/sd15@main")
    assert str(caught.value) == f"x.safetensors: {found}; the config base/sd15@main describes 4 input channels, " \
        "cross-attention width 768: use the config of the checkpoint's base model"
    diffusers_layout = _fake(tmp_path / "y.safetensors", {"conv_in.weight": (32, 4, 3, 3)})
    with pytest.raises(SourceError, match=r"^y.safetensors: not a Stable Diffusion checkpoint in the original \(LDM\) "
                                          r"key layout"):
        check_fits(diffusers_layout, tmp_path / "config", "y.safetensors", "base/sd15@main")


def test_a_pickle_is_read_weights_only(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 4, 3, 3)}}, good)
    assert checkpoint_shapes(good) == {"model.diffusion_model.input_blocks.0.0.weight": ((2, 4, 3, 3), "float32")}
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": Path("x")}, evil)  # an object torch's weights-only loader refuses
    with pytest.raises(SourceError) as caught:
        load_pickle(evil)
    message = str(caught.value)
    assert message.startswith("evil.ckpt: refused: not loadable with torch.load(weights_only=True)")
    assert "\n" not in message and "\x1b" not in message


def test_a_lora_that_matches_nothing_is_an_error(community, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.ones(4, 8),
               "lora_unet_no_such_layer.lora_up.weight": torch.ones(8, 4), "lora_unet_no_such_layer.alpha":
               torch.tensor(4.0)}, stray)
    with pytest.raises(SourceError, match=r"^LoRA stray: 1 of its 1 layers match nothing in the model \(e.g. "
                                          r"unet.no.such.layer\): is it a LoRA for this base model\?$"):
        prepare_source(None, str(community["pipeline"]), [(str(stray), 1.0, "stray")], "sd", str(tmp_path / "out"))


def test_an_sdxl_lora_is_fused_as_diffusers_fuses_it(tmp_path: Path) -> None:
    """SDXL: the UNet's layers through diffusers' own loading (equal to diffusers' fusion), the second text encoder's
    through peft; the first text encoder, which the LoRA does not name, is not written."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from publisher.tiny import build_tiny_sdxl_pipeline

    folder = build_tiny_sdxl_pipeline(tmp_path / "pipe")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"]),
                            pipe.text_encoder_2)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", weight_name="l.safetensors",
                                                unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2))
    lora = tmp_path / "lora" / "l.safetensors"
    report = prepare_source(None, str(folder), [(str(lora), 0.7, "l")], "sdxl", str(tmp_path / "out"))
    assert report["folders"] == ["text_encoder_2", "unet"] and report["lora_folders"] == [["unet", "text_encoder_2"]]
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    state, alphas = reference.lora_state_dict(str(lora))[:2]
    reference.load_lora_into_unet(state, alphas, unet=reference.unet, adapter_name="x", _pipeline=reference)
    reference.fuse_lora(components=["unet"], lora_scale=0.7, adapter_names=["x"])
    reference.unload_lora_weights()
    fused = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(fused[name], value) for name, value in reference.unet.state_dict().items())
    before = load_file(next((folder / "text_encoder_2").glob("*.safetensors")))
    after = load_file(next((tmp_path / "out" / "text_encoder_2").glob("*.safetensors")))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("q_proj.weight") for name in changed)
