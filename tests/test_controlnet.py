"""The ControlNet-ready UNet (Apple's ControlledUnet): diffusers' UNet fed a ControlNet's residuals, with Apple's
input names and shapes, built beside the Unet where a publish entry asks for it, palettized like the UNet."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from publisher.contract import package_name
from publisher.convert.components import example_inputs, load_component
from publisher.family import family_named
from publisher.manifest import load_manifests
from publisher.mlpackage import package_info
from publisher.vocabulary import Attention, Component, controlnet_component
from tests.helpers import MANIFEST_HEAD, TINY_SOURCE_REPO, manifest_errors, write_manifest

CONTROLNET_MANIFEST = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-cn"
    precision: {{type: palettize, nbits: 6}}
    attention: [ORIGINAL]
    components: [unet]
    controlnet: true
    layouts: [packages]
"""


def test_controlled_unet_is_diffusers_unet_with_the_residuals(tiny_source: Path) -> None:
    """At a non-square size, under the ANE attention: the same output as diffusers' UNet given the residuals as
    `down_block_additional_residuals` and `mid_block_additional_residual` (and not as it is without them)."""
    from diffusers import UNet2DConditionModel

    loaded = load_component(tiny_source, Component.CONTROL_UNET, Attention.SPLIT_EINSUM, "256x320")
    names = [t.name for t in loaded.spec.inputs]
    # the tiny UNet's skip connections: conv_in, two down-block resnets, one down-sampler; then the middle block
    assert names == ["sample", "timestep", "encoder_hidden_states"] + [f"additional_residual_{i}" for i in range(5)]
    assert [t.shape for t in loaded.spec.inputs[3:]] == [(2, 32, 40, 32), (2, 32, 40, 32), (2, 32, 20, 16),
                                                         (2, 64, 20, 16), (2, 64, 20, 16)]
    inputs = example_inputs(loaded.spec)
    sample, timestep, context, *residuals = inputs
    reference = UNet2DConditionModel.from_pretrained(tiny_source / "unet").eval()
    with torch.no_grad():
        ours = loaded.module(*inputs)
        theirs = reference(sample, timestep, context.squeeze(2).transpose(1, 2),
                           down_block_additional_residuals=tuple(residuals[:-1]),
                           mid_block_additional_residual=residuals[-1]).sample
        plain = reference(sample, timestep, context.squeeze(2).transpose(1, 2)).sample
    assert float((ours - theirs).abs().max()) < 1e-4 < float((ours - plain).abs().max())


def test_controlled_unet_chunks_compose_to_the_whole(tiny_source: Path) -> None:
    """The residuals go to the chunk that runs the first up stage (where diffusers adds them)."""
    from publisher.convert.chunk import chunk_specs

    loaded = load_component(tiny_source, Component.CONTROL_UNET, Attention.ORIGINAL, 256)
    example = example_inputs(loaded.spec)
    specs, intermediates = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
    first, second = specs.modules(loaded.module)
    with torch.no_grad():
        whole = loaded.module(*example)
        composed = second(*specs.chunk2_example(example, intermediates))
        assert len(first(*specs.chunk1_example(example))) == len(specs.chunk1_outputs)
        without = loaded.module(*example[:3], *(torch.zeros_like(r) for r in example[3:]))
    assert specs.residuals == 5 and specs.residuals_in in (1, 2)
    holder = specs.chunk1_inputs if specs.residuals_in == 1 else specs.chunk2_inputs
    assert [t.name for t in holder if t.name.startswith("additional_")] == [f"additional_residual_{i}" for i in range(5)]
    assert float((whole - composed).abs().max()) < 1e-4 < float((whole - without).abs().max())


def test_controlnet_option_rules(tmp_path: Path) -> None:
    text = CONTROLNET_MANIFEST.format(source="a/b").replace("controlnet: true", "controlnet: [SPLIT_EINSUM]")
    assert manifest_errors(text, tmp_path) == ["13: publish[0].controlnet[0]: 'SPLIT_EINSUM' is not in this repo's "
                                       "attention list"]
    xl = CONTROLNET_MANIFEST.format(source="a/b").replace("license: mit", "license: mit\nfamily: sdxl")
    assert manifest_errors(xl, tmp_path) == []  # SDXL's too (tests/test_sdxl.py), beyond what Apple's converter makes
    from publisher.family import register_family, unregister_family

    register_family(replace(family_named("sd"), name="no-cn", controlnet=None, components=tuple(
        c for c in family_named("sd").components if c.component != Component.CONTROL_UNET)))
    try:
        other = CONTROLNETS_MANIFEST.format(source="a/b").replace("license: mit", "license: mit\nfamily: no-cn")
        assert manifest_errors(other, tmp_path) == ["9: controlnets: family 'no-cn' has no ControlNets (Apple's Swift "
                                            "package loads ControlNets for SD 1.x/2.x only)"]
        other = CONTROLNET_MANIFEST.format(source="a/b").replace("license: mit", "license: mit\nfamily: no-cn")
        assert manifest_errors(other, tmp_path) == ["14: publish[0].controlnet: family 'no-cn' has no ControlNet-ready UNet "
                                            "(Apple's Swift package loads ControlNets for SD 1.x/2.x only)"]
    finally:
        unregister_family("no-cn")
    sd = family_named("sd")
    assert sd.compiled_name("control-unet") == "ControlledUnet.mlmodelc"
    # Apple's converter: `..._control-unet_chunk1.mlpackage` -> ControlledUnetChunk1.mlmodelc
    assert [sd.compiled_name(n) for n in sd.submodules(Component.CONTROL_UNET, chunked=True)] == [
        "ControlledUnetChunk1.mlmodelc", "ControlledUnetChunk2.mlmodelc"]


CONTROLNET_REPO = "cn-models/Tiny-ControlNet.v1"  # mixed case and a dot: Apple's names keep the one, split not at the other
CONTROLNETS_MANIFEST = CONTROLNET_MANIFEST.replace("publish:\n", f"controlnets:\n  - repo: {CONTROLNET_REPO}\npublish:\n") \
    + """\
  - repo: "{{namespace}}/coreml-tiny-sd-cn-f16"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    components: [unet]
    controlnet: true
    chunk_unet: true
    layouts: [packages]
"""


def _composed(source: Path, controlnet: Path, into: Path) -> Path:
    """The source with a ControlNet where the build lays it out (`controlnet/`)."""
    import shutil

    shutil.copytree(source, into, copy_function=os.link)
    shutil.copytree(controlnet, into / "controlnet", copy_function=os.link)
    return into


def test_a_controlnet_is_diffusers_controlnet_and_refused_for_another_base(tiny_source: Path, tmp_path: Path) -> None:
    """Apple's interface (inputs float16, the condition image at the image size; outputs the ControlledUnet's
    residual inputs), diffusers' residuals under the ANE attention at a non-square size; one trained for another
    base (another cross-attention width) is refused in one line before its weights load."""
    from diffusers import ControlNetModel

    from publisher.errors import SourceError
    from publisher.tiny import write_tiny_controlnet

    component = controlnet_component(CONTROLNET_REPO)
    source = _composed(tiny_source, write_tiny_controlnet(tiny_source, tmp_path / "cn"), tmp_path / "composed")
    loaded = load_component(source, component, Attention.SPLIT_EINSUM_V2, "256x320")
    assert [(t.name, t.shape, t.dtype) for t in loaded.spec.inputs] == [
        ("sample", (2, 4, 40, 32), "float16"), ("timestep", (2,), "float16"),
        ("encoder_hidden_states", (2, 32, 1, 77), "float16"), ("controlnet_cond", (2, 3, 320, 256), "float16")]
    unet = load_component(source, Component.CONTROL_UNET, Attention.ORIGINAL, "256x320").spec
    assert [(t.name, t.shape, "float32") for t in unet.inputs[3:]] == [(t.name, t.shape, t.dtype)
                                                                        for t in loaded.spec.outputs]
    inputs = example_inputs(loaded.spec)
    sample, timestep, context, condition = inputs
    reference = ControlNetModel.from_pretrained(source / "controlnet").eval()
    with torch.no_grad():
        ours = loaded.module(*inputs)
        down, mid = reference(sample, timestep, context.squeeze(2).transpose(1, 2), condition, return_dict=False)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, (*down, mid), strict=True)) < 1e-4
    assert min(float(b.abs().max()) for b in (*down, mid)) > 0.1  # residuals that are not all 0

    other = _composed(tiny_source, write_tiny_controlnet(tiny_source, tmp_path / "cn-xl", cross_attention_dim=48),
                      tmp_path / "other")
    with pytest.raises(SourceError) as refused:
        load_component(other, component, Attention.ORIGINAL, 256, label="a/cn@1234")
    assert str(refused.value) == ("ControlNet a/cn@1234 was trained for another base model: its cross_attention_dim "
                                  "48 is not the base UNet's 32")


def test_controlnet_names_as_apple_writes_them(tmp_path: Path) -> None:
    sd = family_named("sd")
    component = controlnet_component("lllyasviel/control_v11p_sd15_canny")
    assert component == "controlnet-lllyasviel_control_v11p_sd15_canny"
    # torch2coreml: "".join(word.title() for word in re.split('_|-', "lllyasviel_control_v11p_sd15_canny"))
    assert sd.compiled_name(component) == "controlnet/LllyasvielControlV11PSd15Canny.mlmodelc"
    assert sd.submodule_of_package("ControlNet_lllyasviel_control_v11p_sd15_canny.mlpackage", "x") == component
    assert family_named("sdxl").compiled_name(component) == "controlnet/LllyasvielControlV11PSd15Canny.mlmodelc"
    text = CONTROLNETS_MANIFEST.format(source="a/b").replace(
        "controlnets:\n", "controlnets:\n  - repo: Cn-Models/tiny_controlnet.v1\n")
    assert manifest_errors(text, tmp_path) == ["10: controlnets[1].repo: 'cn-models/Tiny-ControlNet.v1' is compiled to "
                                       "controlnet/CnModelsTinyControlnet.V1.mlmodelc, as an earlier ControlNet is"]
    text = CONTROLNETS_MANIFEST.format(source="a/b").replace("controlnet: true", "controlnet: false")
    assert manifest_errors(text, tmp_path) == ["8: controlnets: no publish entry asks for them (set `controlnet: true` "
                                       "or a list of attentions on one)"]


@pytest.mark.slow
def test_a_controlnet_ready_palettized_repo_with_a_controlnet(tmp_path: Path, staging_hub, tiny_source_repo,  # type: ignore[no-untyped-def]
                                                              tiny_source: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from publisher.engine.build import BuildOptions, build
    from publisher.metrics import psnr
    from publisher.tiny import push_tiny_source, write_tiny_controlnet
    from publisher.verify.runtime import ExecutorRuntime

    controlnet = write_tiny_controlnet(tiny_source, tmp_path / "cn")
    push_tiny_source(controlnet, CONTROLNET_REPO, staging_hub.url, staging_hub.token)
    manifest = write_manifest(tmp_path / "manifests", TINY_SOURCE_REPO, CONTROLNETS_MANIFEST)
    options = BuildOptions(out=tmp_path / "out", store=tmp_path / "store", namespace="cn", compile=False,
                           endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False)
    said: list[str] = []
    result = build(load_manifests([manifest]), options, report=said.append)
    assert result.ok, [v.error for v in result.variants]
    component = controlnet_component(CONTROLNET_REPO)
    # palettized once: the ControlledUnet's package takes the UNet's palettized weights (the same float16 weights)
    compress = {s.params.component: s for s in result.plan.steps_of("compress")}  # type: ignore[union-attr]
    assert compress["control-unet"].params.rebase and compress["control-unet"].inputs[-1] == compress["unet"].id  # type: ignore[union-attr]
    assert not compress[component].params.rebase  # type: ignore[union-attr]
    assert not any("compressed anew" in line for line in said), said
    # one ControlNet conversion (ORIGINAL, float16) feeds both repos
    assert [s.params.component for s in result.plan.steps_of("convert")].count(component) == 1  # type: ignore[union-attr]
    folder = tmp_path / "out" / "cn" / "coreml-tiny-sd-cn" / "original"
    packages = folder / "packages"
    control = packages / package_name("tiny_sd", "control-unet")
    assert sorted(p.name for p in packages.iterdir()) == sorted([
        "ControlNet_cn-models_Tiny-ControlNet.v1.mlpackage", control.name, package_name("tiny_sd", "unet")])
    info = package_info(control)
    assert [t.name for t in info.inputs][3:] == [f"additional_residual_{i}" for i in range(5)]
    assert all(t.dtype == "float16" for t in info.inputs[1:]) and [t.name for t in info.outputs] == ["noise_pred"]
    net_info = package_info(packages / "ControlNet_cn-models_Tiny-ControlNet.v1.mlpackage")
    assert [t.name for t in net_info.inputs] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert [(t.name, t.shape) for t in net_info.outputs] == [(t.name, t.shape) for t in info.inputs[3:]]
    build_info = json.loads((folder / "build-info.json").read_text())
    fidelity = build_info["fidelity"]
    assert fidelity["control-unet"]["bits"] == 6 and fidelity["control-unet"]["output_psnr_db"] >= 35
    assert fidelity[component]["bits"] == 6 and fidelity[component]["output_psnr_db"] >= 35
    assert build_info["extra_sources"][component]["repo"] == CONTROLNET_REPO
    weights = {name: (packages / package_name("tiny_sd", name) / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()
               for name in ("unet", "control-unet")}
    assert weights["unet"] == weights["control-unet"]
    # the UNet's compressed weights, under the ControlledUnet's own description
    from publisher.mlpackage import read_spec

    assert "ControlNet" in read_spec(control).description.metadata.shortDescription
    assert "ControlNet" not in read_spec(packages / package_name("tiny_sd", "unet")).description.metadata.shortDescription

    # one denoising step, float16 packages through the executor: the ControlNet's outputs into the ControlledUnet
    # against diffusers' UNet with diffusers' ControlNet
    f16 = tmp_path / "out" / "cn" / "coreml-tiny-sd-cn-f16" / "original" / "packages"
    from tests.test_convert import _assert_ane_structure

    counts = _assert_ane_structure(f16 / "ControlNet_cn-models_Tiny-ControlNet.v1.mlpackage", Attention.ORIGINAL, 0)
    assert counts.get("matmul", 0) > 0 and counts.get("einsum", 0) == 0, counts  # ORIGINAL's scores and output
    spec = load_component(tiny_source, Component.CONTROL_UNET, Attention.ORIGINAL, 256).spec
    sample, timestep, context, *_ = example_inputs(spec, seed=3)
    condition = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(4)).half().float()
    runtime = ExecutorRuntime()
    arrays = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    residuals = runtime.run(f16 / "ControlNet_cn-models_Tiny-ControlNet.v1.mlpackage",
                            {**arrays, "controlnet_cond": condition.numpy()})
    # through the ControlledUnet's chunks, as the Swift pipeline feeds them (chunk 1's outputs merged with the inputs)
    inputs = {**arrays, **residuals}
    first = runtime.open(f16 / package_name("tiny_sd", "control-unet_chunk1"))(inputs)
    noise = runtime.open(f16 / package_name("tiny_sd", "control-unet_chunk2"))({**inputs, **first})["noise_pred"]
    with torch.no_grad():
        states = context.squeeze(2).transpose(1, 2)
        down, mid = ControlNetModel.from_pretrained(controlnet).eval()(sample, timestep, states, condition,
                                                                         return_dict=False)
        expected = UNet2DConditionModel.from_pretrained(tiny_source / "unet").eval()(
            sample, timestep, states, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert psnr(expected.numpy(), noise) >= 35


@pytest.mark.slow
def test_controlnet_has_the_neural_engine_structure(tiny_source: Path, tmp_path: Path) -> None:
    """The UNet's graph rules hold for the ControlNet (its attention layers are the UNet encoder's): no `linear`,
    SPLIT_EINSUM_V2's one key transpose per attention layer and no matmul. ORIGINAL: the build test's package."""
    from diffusers import ControlNetModel
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.deployment import DeploymentTarget
    from publisher.tiny import write_tiny_controlnet
    from tests.test_convert import _assert_ane_structure

    cn = write_tiny_controlnet(tiny_source, tmp_path / "cn")
    source = _composed(tiny_source, cn, tmp_path / "composed")
    layers = sum(1 for m in ControlNetModel.from_pretrained(cn).modules() if isinstance(m, DiffusersAttention))
    package = tmp_path / "cn.mlpackage"
    convert_component(source, controlnet_component(CONTROLNET_REPO), Attention.SPLIT_EINSUM_V2, 256,
                      DeploymentTarget.iOS16, package, PackageMetadata("a/cn@1", "mit", Attention.SPLIT_EINSUM_V2))
    counts = _assert_ane_structure(package, Attention.SPLIT_EINSUM_V2, layers)
    assert counts.get("transpose", 0) == layers > 0, counts
