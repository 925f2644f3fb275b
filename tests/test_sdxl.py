"""SDXL as a model family: the tiny SDXL-shaped fixture (two text encoders, the add-embedding UNet with transformer
depth 2, a VAE that must be upcast) converted, checked, palettized, chunked, published and downloaded in the layout
Apple's SDXL pipelines open (python_coreml_stable_diffusion/pipeline.py, StableDiffusionXL+Resources.swift)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from publisher.contract import FLOAT16, FLOAT32, package_name, zip_file_name
from publisher.convert.components import example_inputs, load_component
from publisher.errors import ManifestError
from publisher.family import family_named
from publisher.manifest import load_manifest, load_manifests
from publisher.plan import build_plan
from publisher.tiny import TINY_XL_POOLED, TINY_XL_TEXT_HIDDEN, build_tiny_sdxl_pipeline
from publisher.vocabulary import Attention, Component
from tests.helpers import write_manifest

SDXL = family_named("sdxl")
# what a build takes by default (the ControlledUnet, asked for: test_controlnet_and_controlled_unet)
XL_COMPONENTS = tuple(c for c in SDXL.component_names if not SDXL.component(c).optional)
SOURCE_REPO = "tiny/sdxl"
RESOLUTION = 256
MODEL_VERSION = SOURCE_REPO.replace("/", "_")
# what Apple's Python pipeline opens for an 'xl' model version, and the Swift pipeline's resource names
APPLE_XL_PACKAGES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
SWIFT_XL_RESOURCES = {"TextEncoder.mlmodelc", "TextEncoder2.mlmodelc", "Unet.mlmodelc", "UnetRefiner.mlmodelc",
                      "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc", "vocab.json", "merges.txt"}

REFINER_REPO = "tiny/sdxl-refiner"
VAE_REPO = "tiny/sdxl-vae-fp16-fix"
MANIFEST = """\
name: tiny-sdxl
family: sdxl
source:
  repo: {source}
license: openrail++
resolution: 256
publish:
  - repo: "{{namespace}}/coreml-tiny-sdxl"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    layouts: [packages]
  - repo: "{{namespace}}/coreml-tiny-sdxl-ios"
    precision: {{type: palettize, nbits: 6}}
    attention: [SPLIT_EINSUM]
    components: [text_encoder_2, unet]
    chunk_unet: true
    layouts: [packages]
"""


@pytest.fixture(scope="module")
def sdxl_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "sdxl")


def _psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = torch.mean((reference.double() - test.double()) ** 2)
    return float(10 * torch.log10(torch.mean(reference.double() ** 2) / noise)) if noise > 0 else float("inf")


# the base with the refiner (UnetRefiner) and a custom float16-safe VAE, each from a repo of its own
WITH_REFINER = MANIFEST.replace("  repo: {source}\n", f"  repo: {{source}}\n  refiner: {{{{repo: {REFINER_REPO}}}}}\n"
                                f"  vae: {{{{repo: {VAE_REPO}}}}}\n").replace(
    "    attention: [ORIGINAL]\n", "    attention: [ORIGINAL]\n    evaluate: {{steps: 2}}\n")


def test_dimensions_and_contract_come_from_the_configs(sdxl_source: Path, tmp_path: Path) -> None:
    dims = SDXL.dims(sdxl_source, RESOLUTION)
    assert dims.text_hidden == sum(TINY_XL_TEXT_HIDDEN)  # both encoders' hidden states, concatenated
    assert dims.size("pooled") == TINY_XL_POOLED and dims.size("time_ids") == 6
    unet = SDXL.model_spec(Component.UNET, dims)
    assert [(t.name, t.shape, t.dtype) for t in unet.inputs] == [
        ("sample", (2, 4, 32, 32), FLOAT16), ("timestep", (2,), FLOAT16),
        ("encoder_hidden_states", (2, 80, 1, 77), FLOAT16), ("time_ids", (2, 6), FLOAT16),
        ("text_embeds", (2, TINY_XL_POOLED), FLOAT16)]
    for component, hidden, pooled in ((Component.TEXT_ENCODER, 32, 32), (Component.TEXT_ENCODER_2, 48, 24)):
        spec = SDXL.model_spec(component, dims)
        assert [(t.name, t.shape, t.dtype) for t in spec.inputs] == [("input_ids", (1, 77), FLOAT32)]
        assert [(t.name, t.shape) for t in spec.outputs] == [("hidden_embeds", (1, 77, hidden)),
                                                             ("pooled_outputs", (1, pooled))]
    # the VAE config asks to be upcast (as SDXL's does): float32 in and float32 compute, as Apple converts it
    decoder = SDXL.model_spec(Component.VAE_DECODER, dims)
    assert decoder.precision == FLOAT32 and decoder.inputs[0].dtype == FLOAT32
    # a refiner-shaped source: 5 geometry values (the aesthetic score replaces the target size)
    refiner = SDXL.dims(build_tiny_sdxl_pipeline(tmp_path / "refiner", refiner=True), RESOLUTION)
    assert refiner.size("time_ids") == 5 and refiner.size("pooled") == TINY_XL_POOLED
    assert refiner.text_hidden == TINY_XL_TEXT_HIDDEN[1]


@pytest.mark.parametrize("attention", list(Attention))
def test_the_ane_unet_matches_diffusers(sdxl_source: Path, attention: Attention) -> None:
    from diffusers import UNet2DConditionModel

    loaded = load_component(sdxl_source, Component.UNET, attention, RESOLUTION, family="sdxl")
    sample, timestep, context, time_ids, text_embeds = example_inputs(loaded.spec)
    reference = UNet2DConditionModel.from_pretrained(sdxl_source / "unet").eval()
    with torch.no_grad():
        ours = loaded.module(sample, timestep, context, time_ids, text_embeds)
        theirs = reference(sample, timestep, context.squeeze(2).transpose(1, 2),
                           added_cond_kwargs={"time_ids": time_ids, "text_embeds": text_embeds}).sample
        # the micro-conditioning is live: other geometry changes the prediction
        moved = loaded.module(sample, timestep, context, time_ids + 64, text_embeds)
    assert _psnr(theirs, ours) >= 60
    assert _psnr(ours, moved) < 60


def test_text_encoders_return_the_penultimate_hidden_states(sdxl_source: Path) -> None:
    from transformers import CLIPTextModelWithProjection

    loaded = load_component(sdxl_source, Component.TEXT_ENCODER_2, Attention.ORIGINAL, RESOLUTION, family="sdxl")
    (ids,) = example_inputs(loaded.spec)
    reference = CLIPTextModelWithProjection.from_pretrained(sdxl_source / "text_encoder_2").eval()
    with torch.no_grad():
        hidden, pooled = loaded.module(ids)
        out = reference(ids.to(torch.int64), output_hidden_states=True)
    assert torch.equal(hidden, out.hidden_states[-2]) and not torch.equal(hidden, out.last_hidden_state)
    assert torch.equal(pooled, out.text_embeds)


def test_extra_sources_are_planned_as_their_own_fetches(tmp_path: Path) -> None:
    loaded = load_manifest(write_manifest(tmp_path, source=SOURCE_REPO, text=WITH_REFINER))
    assert loaded.manifest.source_components == [Component.TEXT_ENCODER, Component.TEXT_ENCODER_2, Component.UNET,
                                                 Component.REFINER, Component.VAE_DECODER, Component.VAE_ENCODER]
    plan = build_plan([loaded], "me")
    fetches = {s.params.role: s.params for s in plan.steps_of("fetch")}
    assert set(fetches) == {"", "vae", "refiner"}
    assert (fetches["vae"].repo, fetches["vae"].folders, fetches["vae"].into) == (VAE_REPO, ("vae", ""), "vae")
    assert (fetches["refiner"].repo, fetches["refiner"].folders, fetches["refiner"].into) == (
        REFINER_REPO, ("unet",), "refiner")
    by_component = {s.params.component: s for s in plan.steps_of("convert")}
    fetch_of = {s.params.role: s.id for s in plan.steps_of("fetch")}
    assert by_component["refiner"].inputs == (fetch_of[""], fetch_of["refiner"])
    assert by_component["vae_decoder"].inputs == (fetch_of[""], fetch_of["vae"])
    assert by_component["unet"].inputs == (fetch_of[""],)
    assert [SDXL.compiled_name(n) for n in SDXL.submodules(Component.REFINER, chunked=True)] == [
        "UnetRefinerChunk1.mlmodelc", "UnetRefinerChunk2.mlmodelc"]
    # the refiner needs its source; SD has none
    missing = MANIFEST.replace("  repo: {source}\n", "  repo: {source}\n  components: [unet, refiner]\n")
    with pytest.raises(ManifestError, match=r"'refiner' is read from source\.refiner, which is not given"):
        load_manifest(write_manifest(tmp_path / "m", source=SOURCE_REPO, text=missing))
    sd = WITH_REFINER.replace("family: sdxl", "family: sd").replace("openrail++", "mit")
    with pytest.raises(ManifestError, match=r"source\.refiner: family 'sd' has no refiner"):
        load_manifest(write_manifest(tmp_path / "s", source=SOURCE_REPO, text=sd))


@pytest.mark.parametrize("attention", [Attention.ORIGINAL, Attention.SPLIT_EINSUM])
def test_the_float32_vae_converts_and_meets_the_bar(sdxl_source: Path, tmp_path: Path, attention: Attention) -> None:
    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.deployment import DeploymentTarget
    from publisher.mlpackage import package_info
    from publisher.verify.fidelity import verify_package

    package = tmp_path / "vae_decoder.mlpackage"
    convert_component(sdxl_source, Component.VAE_DECODER, attention, RESOLUTION, DeploymentTarget.iOS16,
                      package, PackageMetadata("tiny/sdxl@main", "openrail++", attention), family="sdxl")
    assert [(t.name, t.dtype) for t in package_info(package).inputs] == [("z", FLOAT32)]
    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    parameters = sum(p.numel() for p in load_component(sdxl_source, Component.VAE_DECODER, Attention.ORIGINAL,
                                                       RESOLUTION, family="sdxl").module.parameters())
    assert weights.stat().st_size >= 4 * parameters * 0.9  # float32 weights, not float16
    assert verify_package(package, sdxl_source, "vae_decoder", attention, RESOLUTION, family="sdxl").passed


def _with_controlnet(source: Path, controlnet: Path, into: Path) -> Path:
    """The source with a ControlNet where the build lays it out (`controlnet/`)."""
    import os
    import shutil

    shutil.copytree(source, into, copy_function=os.link)
    shutil.copytree(controlnet, into / "controlnet", copy_function=os.link)
    return into


@pytest.mark.slow
def test_controlnet_and_controlled_unet(sdxl_source: Path, tmp_path: Path) -> None:
    """SDXL ControlNets (Apple's converter makes none): diffusers' ControlNetModel with SDXL's added conditioning,
    under the UNet's inputs then `controlnet_cond`; the ControlledUnet takes the UNet's inputs then the residuals.
    One step through the executor, ControlNet package -> ControlledUnet package, against diffusers' UNet with
    diffusers' ControlNet. A "small" ControlNet (less transformer depth) fits; one for another base is refused."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.deployment import DeploymentTarget
    from publisher.errors import SourceError
    from publisher.metrics import psnr
    from publisher.mlpackage import package_info
    from publisher.tiny import write_tiny_controlnet
    from publisher.verify.runtime import ExecutorRuntime
    from publisher.vocabulary import controlnet_component

    component = controlnet_component("cn/tiny-xl")
    source = _with_controlnet(sdxl_source, write_tiny_controlnet(sdxl_source, tmp_path / "cn"), tmp_path / "src")
    net = load_component(source, component, Attention.SPLIT_EINSUM, RESOLUTION, family="sdxl")
    unet = load_component(source, Component.CONTROL_UNET, Attention.SPLIT_EINSUM, RESOLUTION, family="sdxl")
    assert [t.name for t in net.spec.inputs] == ["sample", "timestep", "encoder_hidden_states", "time_ids",
                                                 "text_embeds", "controlnet_cond"]
    residuals = [t for t in unet.spec.inputs if t.name.startswith("additional_residual_")]
    assert [t.name for t in unet.spec.inputs[:5]] == [t.name for t in net.spec.inputs[:5]]
    assert [(t.name, t.shape) for t in net.spec.outputs] == [(t.name, t.shape) for t in residuals]
    # conv_in; block 1 a resnet and its down-sampler; block 2 a resnet; the middle block
    assert len(residuals) == 5 and {t.dtype for t in net.spec.outputs} == {FLOAT32}
    sample, timestep, context, time_ids, text_embeds, condition = example_inputs(net.spec, seed=5)
    states = context.squeeze(2).transpose(1, 2)
    added = {"time_ids": time_ids, "text_embeds": text_embeds}
    diffusers_net = ControlNetModel.from_pretrained(source / "controlnet").eval()
    diffusers_unet = UNet2DConditionModel.from_pretrained(source / "unet").eval()
    with torch.no_grad():
        ours = net.module(sample, timestep, context, time_ids, text_embeds, condition)
        down, mid = diffusers_net(sample, timestep, states, condition, added_cond_kwargs=added, return_dict=False)
        assert min(_psnr(a, b) for a, b in zip((*down, mid), ours, strict=True)) >= 60
        expected = diffusers_unet(sample, timestep, states, added_cond_kwargs=added,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert _psnr(expected, unet.module(sample, timestep, context, time_ids, text_embeds, *ours)) >= 60
        # the geometry reaches the ControlNet too
        assert _psnr(ours[-1], net.module(sample, timestep, context, time_ids + 64, text_embeds, condition)[-1]) < 60

    packages = {}
    for name in (component, Component.CONTROL_UNET):
        packages[name] = tmp_path / f"{name}.mlpackage"
        convert_component(source, name, Attention.ORIGINAL, RESOLUTION, DeploymentTarget.iOS16, packages[name],
                          PackageMetadata("tiny/sdxl@main", "openrail++", Attention.ORIGINAL), family="sdxl")
        info, spec = package_info(packages[name]), (net if name == component else unet).spec
        assert [(t.name, t.shape, t.dtype) for t in info.inputs] == [(t.name, t.shape, t.dtype) for t in spec.inputs]
        assert [(t.name, t.shape) for t in info.outputs] == [(t.name, t.shape) for t in spec.outputs]
    runtime = ExecutorRuntime()
    arrays = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy(),
              "time_ids": time_ids.numpy(), "text_embeds": text_embeds.numpy()}
    got = runtime.run(packages[component], {**arrays, "controlnet_cond": condition.numpy()})
    noise = runtime.run(packages[Component.CONTROL_UNET], {**arrays, **got})["noise_pred"]
    assert psnr(expected.numpy(), noise) >= 35

    small = _with_controlnet(sdxl_source, write_tiny_controlnet(sdxl_source, tmp_path / "small",
                                                                transformer_layers_per_block=1), tmp_path / "s")
    assert len(load_component(small, component, Attention.ORIGINAL, RESOLUTION, family="sdxl").spec.outputs) == 5
    other = _with_controlnet(sdxl_source, write_tiny_controlnet(sdxl_source, tmp_path / "other",
                                                                projection_class_embeddings_input_dim=64),
                             tmp_path / "o")
    with pytest.raises(SourceError, match="its projection_class_embeddings_input_dim 64 is not the base UNet's"):
        load_component(other, component, Attention.ORIGINAL, RESOLUTION, family="sdxl", label="cn/other@1")


def test_plan_layout_and_chunk_rule(tmp_path: Path) -> None:
    loaded = load_manifest(write_manifest(tmp_path, source=SOURCE_REPO, text=MANIFEST))
    plan = build_plan([loaded], "me")
    assert {s.params.component for s in plan.steps_of("convert")} == {
        "text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert {s.params.chunk for s in plan.steps_of("chunk")} == {"unet_chunk1", "unet_chunk2"}
    resources = {SDXL.compiled_name(c.value) for c in XL_COMPONENTS} | {"vocab.json", "merges.txt"}
    assert resources == SWIFT_XL_RESOURCES
    assert [SDXL.compiled_name(n) for n in SDXL.submodules(Component.UNET, chunked=True)] == [
        "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc"]
    assert zip_file_name("coreml-tiny-sdxl", Attention.ORIGINAL) == "coreml-tiny-sdxl_original_compiled.zip"
    # SDXL's UNet is 2.57 B parameters: at 4 bits it is still over 1 GB, so chunking is allowed where SD's is not
    four_bit = MANIFEST.replace("nbits: 6", "nbits: 4")
    assert load_manifest(write_manifest(tmp_path / "4", source=SOURCE_REPO, text=four_bit))
    two_bit = write_manifest(tmp_path / "2", source=SOURCE_REPO, text=MANIFEST.replace("nbits: 6", "nbits: 2"))
    with pytest.raises(ManifestError, match="small enough"):
        load_manifest(two_bit)
    # ControlNets as for SD: the ControlledUnet beside the UNet (chunked alike, palettized from its weights) and
    # each ControlNet its own conversion
    with_cn = MANIFEST.replace("publish:\n", "controlnets:\n  - repo: diffusers/controlnet-canny-sdxl-1.0\n"
                               "publish:\n").replace("    chunk_unet: true\n", "    chunk_unet: true\n    controlnet: true\n")
    plan = build_plan([load_manifest(write_manifest(tmp_path / "cn", source=SOURCE_REPO, text=with_cn))], "me")
    canny = "controlnet-diffusers_controlnet-canny-sdxl-1.0"
    assert {(s.params.component, s.params.attention) for s in plan.steps_of("convert")} >= {
        ("control-unet", "SPLIT_EINSUM"), (canny, "SPLIT_EINSUM")}
    assert {s.params.chunk for s in plan.steps_of("chunk")} == {"unet_chunk1", "unet_chunk2", "control-unet_chunk1",
                                                                "control-unet_chunk2"}
    variant = next(v for v in plan.variants if canny in v.components)
    assert variant.package_file(canny) == "ControlNet_diffusers_controlnet-canny-sdxl-1.0.mlpackage"
    assert SDXL.compiled_name(canny) == "controlnet/DiffusersControlnetCannySdxl1.0.mlmodelc"
    no_checker = write_manifest(tmp_path / "c", source=SOURCE_REPO,
                                text=MANIFEST.replace("  repo: {source}\n", "  repo: {source}\n"
                                                      "  components: [unet, safety_checker]\n"))
    with pytest.raises(ManifestError, match="'safety_checker' is not a component of family 'sdxl'"):
        load_manifest(no_checker)


@pytest.mark.slow
def test_build_publish_and_download_in_apple_s_xl_layout(sdxl_source: Path, tmp_path: Path, staging_hub,
                                                         hf_api) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import hf_hub_download, snapshot_download

    from publisher.engine.build import BuildOptions, build
    from publisher.mlpackage import package_info
    from publisher.publish import PublishOptions, publish
    from publisher.tiny import build_tiny_sdxl_vae, push_tiny_source

    push_tiny_source(sdxl_source, SOURCE_REPO, staging_hub.url, staging_hub.token)
    refiner = build_tiny_sdxl_pipeline(tmp_path / "refiner", seed=3, refiner=True)
    push_tiny_source(refiner, REFINER_REPO, staging_hub.url, staging_hub.token)
    push_tiny_source(build_tiny_sdxl_vae(tmp_path / "vae-fix"), VAE_REPO, staging_hub.url, staging_hub.token)
    loaded = load_manifests([write_manifest(tmp_path / "manifests", source=SOURCE_REPO, text=WITH_REFINER)])
    out = tmp_path / "out"
    result = build(loaded, BuildOptions(out=out, store=tmp_path / "store", namespace="xl", compile=False,
                                        endpoint=staging_hub.url, token=staging_hub.token, isolate=False,
                                        progress=False, evaluate="on"))
    assert result.ok, [v.error for v in result.variants]
    # end to end as StableDiffusionXLPipeline (both encoders, pooled text, geometry; the custom VAE on both sides)
    from publisher.build_info import read_build_info

    base = out / "xl" / "coreml-tiny-sdxl" / "original"
    assert read_build_info(base / "build-info.json").evaluation["figures"]["image_psnr_db"] >= 30
    assert [s.params.submodules for s in result.plan.steps_of("evaluate")] == [  # type: ignore[union-attr]
        ("text_encoder", "text_encoder_2", "unet", "vae_decoder")]  # the iOS repo has no text encoder 1 or VAE
    publish(loaded, PublishOptions(out=out, namespace="xl", target="staging", endpoint=staging_hub.url,
                                   token=staging_hub.token))
    # what the packages are checked against: the base's configs with the refiner's UNet and the custom VAE
    composed = tmp_path / "composed"
    for folder in (sdxl_source, refiner):
        for item in (p for p in folder.rglob("*") if p.is_file()):
            target = composed / item.relative_to(folder)
            if folder == refiner:
                if item.parent.name != "unet":
                    continue
                target = composed / "refiner" / item.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    for item in (tmp_path / "vae-fix").iterdir():
        (composed / "vae" / item.name).write_bytes(item.read_bytes())
    dims = SDXL.dims(composed, RESOLUTION)
    assert dims.size("refiner.time_ids") == 5 and dict(dims.extra)["vae.float32"] == 0

    local = tmp_path / "download"
    snapshot_download("xl/coreml-tiny-sdxl", allow_patterns="original/packages/*", local_dir=local,
                      endpoint=staging_hub.url, token=staging_hub.token)
    packages = local / "original" / "packages"
    # every package Apple's XL pipeline opens is there under its name, with the contract's interface
    names = {p.name for p in packages.iterdir()}
    assert {package_name(MODEL_VERSION, n) for n in APPLE_XL_PACKAGES} <= names
    assert names == {package_name(MODEL_VERSION, c.value) for c in XL_COMPONENTS}
    for component in XL_COMPONENTS:
        info = package_info(packages / package_name(MODEL_VERSION, component.value))
        spec = SDXL.model_spec(component, dims)
        assert [(t.name, t.shape, t.dtype) for t in info.inputs] == [(t.name, t.shape, t.dtype) for t in spec.inputs]
        assert [t.name for t in info.outputs] == [t.name for t in spec.outputs]
    refiner_info = package_info(packages / package_name(MODEL_VERSION, "refiner"))
    assert [(t.name, t.shape) for t in refiner_info.inputs][2:] == [
        ("encoder_hidden_states", (2, TINY_XL_TEXT_HIDDEN[1], 1, 77)), ("time_ids", (2, 5)),
        ("text_embeds", (2, TINY_XL_POOLED))]
    # the custom VAE says it need not be upcast: float16 in, as SD's
    assert package_info(packages / package_name(MODEL_VERSION, "vae_decoder")).inputs[0].dtype == FLOAT16
    build_info = json.loads((out / "xl/coreml-tiny-sdxl/original/build-info.json").read_text())
    assert build_info["variant"]["family"] == "sdxl"
    extra = build_info["extra_sources"]
    assert (extra["refiner"]["repo"], extra["vae"]["repo"]) == (REFINER_REPO, VAE_REPO)
    assert set(extra["refiner"]["files"]) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert set(extra["vae"]["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}  # its root
    # the base's own VAE and the refiner's text encoder were not downloaded
    assert not any(name.startswith("vae/") for name in build_info["source"]["files"])
    card = Path(hf_hub_download("xl/coreml-tiny-sdxl", "README.md", endpoint=staging_hub.url,
                                token=staging_hub.token)).read_text()
    assert "`StableDiffusionXLPipeline(resourcesAt:)`" in card and "TextEncoder2.mlmodelc" in card
    assert f"- refiner from `{REFINER_REPO}` at revision `main`" in card
    assert f"- vae from `{VAE_REPO}`" in card
    # what an app must set, from the VAE config the VAE packages came from (Apple's Swift default is SD's 0.18215)
    assert build_info["app"] == {"vae_scale_factor": 0.13025, "vae_float32": False}
    assert "`encoderScaleFactor` and `decoderScaleFactor` to 0.13025" in card and "`originalSize`" in card
    assert "float32 packages" not in card
    assert {k: v["output_psnr_db"] >= 35 for k, v in build_info["fidelity"].items()} == {
        c.value: True for c in XL_COMPONENTS}

    ios = out / "xl/coreml-tiny-sdxl-ios/split_einsum"
    ios_info = json.loads((ios / "build-info.json").read_text())
    assert set(ios_info["fidelity"]) == {"text_encoder_2", "unet", "unet_chunk1", "unet_chunk2"}
    assert all(v["output_psnr_db"] >= 35 for v in ios_info["fidelity"].values()), ios_info["fidelity"]
    chunk1 = package_info(ios / "packages" / package_name(MODEL_VERSION, "unet_chunk1"))
    assert [t.name for t in chunk1.inputs] == ["sample", "timestep", "encoder_hidden_states", "time_ids",
                                               "text_embeds"]
    chunk2 = package_info(ios / "packages" / package_name(MODEL_VERSION, "unet_chunk2"))
    assert chunk2.inputs[0].name == "encoder_hidden_states" and [t.name for t in chunk2.outputs] == ["noise_pred"]
    # the refiner takes over at 80% of the steps, as in the Swift pipeline: the second of 2 steps is its own
    from publisher.generate import GenerateSettings, generate
    from publisher.verify.runtime import ExecutorRuntime

    settings = GenerateSettings(prompt="a tiny house", steps=2, refiner=False)
    plain = generate(base, settings, ExecutorRuntime(), sdxl_source / "tokenizer")
    refined = generate(base, replace(settings, refiner=True), ExecutorRuntime(), sdxl_source / "tokenizer")
    assert refined.timesteps == plain.timesteps and not np.array_equal(refined.latents, plain.latents)


def test_the_sdxl_manifest_shares_its_conversions() -> None:
    manifest = Path(__file__).parent.parent / "manifests" / "sd-xl-base-1-0.yaml"
    plan = build_plan(load_manifests([manifest]), "me")
    counts = plan.counts()
    # both text encoders and the two VAE parts once; the UNet once per attention, for both base repos (and the
    # with-refiner repo's ORIGINAL); the refiner once; the 6-bit iOS UNet's chunks converted by the chunk steps;
    # palettized: both text encoders (once), each UNet, both chunks; the 6-bit ORIGINAL folder's ControlledUnet and
    # canny ControlNet: converted and compressed (the ControlledUnet rebased on the 6-bit UNet's weights)
    assert (counts["convert"], counts["chunk"], counts["compress"]) == (2 + 2 + 2 + 1 + 2, 2, 2 + 2 + 2 + 2)
    base = {"me/coreml-stable-diffusion-xl-base-1-0", "me/coreml-stable-diffusion-xl-base-1-0-palettized"}
    with_refiner = "me/coreml-stable-diffusion-xl-base-with-refiner-1-0"
    for step in plan.steps_of("convert"):
        repos = {v.rsplit("/", 1)[0] for v in step.variants}
        if step.params.component.startswith("control"):
            assert repos == {"me/coreml-stable-diffusion-xl-base-1-0-palettized"}, step.id
        elif step.params.component == "refiner":
            assert repos == {with_refiner} and len(step.inputs) == 2, step.id  # the base's and the refiner's fetch
        elif step.params.attention == "SPLIT_EINSUM":
            assert repos == base, step.id
        else:
            assert repos == base | {with_refiner}, step.id
    assert {v.attention for v in plan.variants} == {Attention.ORIGINAL, Attention.SPLIT_EINSUM}
    assert {s.params.role for s in plan.steps_of("fetch")} == {"", "refiner",
                                                                "controlnet-diffusers_controlnet-canny-sdxl-1.0"}
