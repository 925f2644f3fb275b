"""The ControlNet-ready UNet (Apple's ControlledUnet): diffusers' UNet fed a ControlNet's residuals, with Apple's
input names and shapes, built beside the Unet where a publish entry asks for it, palettized like the UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from publisher.contract import package_name
from publisher.convert.components import example_inputs, load_component
from publisher.family import family_named
from publisher.manifest import load_manifests, parse_manifest
from publisher.mlpackage import package_info
from publisher.vocabulary import Attention, Component
from tests.helpers import MANIFEST_HEAD, TINY_SOURCE_REPO, write_manifest

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


def test_controlnet_option_rules(tmp_path: Path) -> None:
    text = CONTROLNET_MANIFEST.format(source="a/b").replace("controlnet: true", "controlnet: [SPLIT_EINSUM]")
    _, errors = parse_manifest(text, tmp_path / "m.yaml")
    assert errors == [f"{tmp_path / 'm.yaml'}:13: publish[0].controlnet[0]: 'SPLIT_EINSUM' is not in this repo's "
                      "attention list"]
    xl = CONTROLNET_MANIFEST.format(source="a/b").replace("license: mit", "license: mit\nfamily: sdxl")
    _, errors = parse_manifest(xl, tmp_path / "m.yaml")
    assert errors == [f"{tmp_path / 'm.yaml'}:14: publish[0].controlnet: family 'sdxl' has no ControlNet-ready UNet "
                      "(Apple's Swift package loads ControlNets for SD 1.x/2.x only)"]
    assert family_named("sd").compiled_name("control-unet") == "ControlledUnet.mlmodelc"


@pytest.mark.slow
def test_a_controlnet_ready_palettized_repo(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    from publisher.engine.build import BuildOptions, build

    manifest = write_manifest(tmp_path / "manifests", TINY_SOURCE_REPO, CONTROLNET_MANIFEST)
    options = BuildOptions(out=tmp_path / "out", store=tmp_path / "store", namespace="cn", compile=False,
                           endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False)
    said: list[str] = []
    result = build(load_manifests([manifest]), options, report=said.append)
    assert result.ok, [v.error for v in result.variants]
    # palettized once: the ControlledUnet's package takes the UNet's palettized weights (the same float16 weights)
    compress = {s.params.component: s for s in result.plan.steps_of("compress")}  # type: ignore[union-attr]
    assert compress["control-unet"].params.rebase and compress["control-unet"].inputs[-1] == compress["unet"].id  # type: ignore[union-attr]
    assert not any("compressed anew" in line for line in said), said
    folder = tmp_path / "out" / "cn" / "coreml-tiny-sd-cn" / "original"
    packages = folder / "packages"
    control = packages / package_name("tiny_sd", "control-unet")
    assert control.exists() and (packages / package_name("tiny_sd", "unet")).exists()
    info = package_info(control)
    assert [t.name for t in info.inputs][3:] == [f"additional_residual_{i}" for i in range(5)]
    assert all(t.dtype == "float16" for t in info.inputs[1:]) and [t.name for t in info.outputs] == ["noise_pred"]
    fidelity = json.loads((folder / "build-info.json").read_text())["fidelity"]
    assert fidelity["control-unet"]["bits"] == 6 and fidelity["control-unet"]["output_psnr_db"] >= 35
    weights = {name: (packages / package_name("tiny_sd", name) / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()
               for name in ("unet", "control-unet")}
    assert weights["unet"] == weights["control-unet"]
    # the UNet's compressed weights, under the ControlledUnet's own description
    from publisher.mlpackage import read_spec

    assert "ControlNet" in read_spec(control).description.metadata.shortDescription
    assert "ControlNet" not in read_spec(packages / package_name("tiny_sd", "unet")).description.metadata.shortDescription
