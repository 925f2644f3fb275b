"""The model-family plug-in point: a family defined only here (a VAE decoder alone, under another resource name) is
validated, planned, fetched, converted and checked against its own contract without any other module knowing it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher.contract import ModelDims
from publisher.errors import ManifestError
from publisher.families.sd import sd_model_spec
from publisher.family import (
    ComponentSpec,
    ModelFamily,
    family_named,
    read_config,
    register_family,
    unregister_family,
)
from publisher.manifest import load_manifest, load_manifests
from publisher.plan import build_plan
from publisher.vocabulary import Component
from tests.helpers import write_manifest

DECODER_ONLY = ModelFamily(
    name="decoder-only",
    description="a latent decoder alone (test family)",
    components=(ComponentSpec(Component.VAE_DECODER, "vae", "LatentDecoder", "diffusers:AutoencoderKL",
                              "vae_decoder", uses_attention=True),),
    model_spec=sd_model_spec,
    # its own dimensions: no text encoder or UNet to read an embedding size from, the latent channels from the VAE
    read_dims=lambda source, resolution: ModelDims(resolution=resolution, text_hidden=0, latent_channels=int(
        (read_config(source, "vae") or {}).get("latent_channels", 4))),  # type: ignore[call-overload]
)

MANIFEST = """\
name: tiny-decoder
family: decoder-only
source:
  repo: {source}
license: mit
resolution: 256
publish:
  - repo: "{{namespace}}/coreml-tiny-decoder"
    precision: {{type: float16}}
    attention: [ORIGINAL, SPLIT_EINSUM]
    layouts: [packages]
"""
ONE_ATTENTION = MANIFEST.replace("[ORIGINAL, SPLIT_EINSUM]", "[SPLIT_EINSUM]")  # one conversion: the test's cost


@pytest.fixture
def decoder_only() -> Iterator[ModelFamily]:
    register_family(DECODER_ONLY)
    yield DECODER_ONLY
    unregister_family(DECODER_ONLY.name)


def test_a_registered_family_owns_its_components(decoder_only: ModelFamily, tmp_path: Path) -> None:
    loaded = load_manifest(write_manifest(tmp_path, text=MANIFEST))
    assert loaded.manifest.source_components == [Component.VAE_DECODER]
    plan = build_plan([loaded], "me")
    assert {s.params.component for s in plan.steps_of("convert")} == {"vae_decoder"}
    assert len(plan.steps_of("convert")) == 2  # the family says the attention changes it: one per attention
    assert all(v.family == "decoder-only" for v in plan.variants)
    assert decoder_only.compiled_name("vae_decoder") == "LatentDecoder.mlmodelc"
    assert family_named("sd").compiled_name("vae_decoder") == "VAEDecoder.mlmodelc"


def test_components_outside_the_family_are_refused(decoder_only: ModelFamily, tmp_path: Path) -> None:
    text = MANIFEST.replace("  repo: {source}\n", "  repo: {source}\n  components: [vae_decoder, unet]\n")
    path = write_manifest(tmp_path, text=text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.args[0] == (f"{path}:5: source.components[1]: 'unet' is not a component of family "
                                    "'decoder-only' (vae_decoder)")


def test_unknown_family(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, text=MANIFEST)  # not registered here
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.args[0] == f"{path}:2: family: must be one of sd, sdxl"


@pytest.mark.slow
def test_the_engine_builds_a_registered_family(decoder_only: ModelFamily, tmp_path: Path, staging_hub,
                                               tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    from publisher.engine.build import BuildOptions, build

    manifest = write_manifest(tmp_path / "manifests", text=ONE_ATTENTION)
    result = build(load_manifests([manifest]), BuildOptions(
        out=tmp_path / "out", store=tmp_path / "store", namespace="tester", compile=False, endpoint=staging_hub.url,
        token=staging_hub.token, isolate=False, progress=False))
    assert result.ok, [v.error for v in result.variants]
    for folder in ("split_einsum",):
        variant = tmp_path / "out/tester/coreml-tiny-decoder" / folder
        packages = sorted(p.name for p in (variant / "packages").iterdir())
        assert packages == ["Stable_Diffusion_version_tiny_sd_vae_decoder.mlpackage"]
        info = json.loads((variant / "build-info.json").read_text())
        assert info["variant"]["family"] == "decoder-only"
        assert set(info["fidelity"]) == {"vae_decoder"} and info["fidelity"]["vae_decoder"]["output_psnr_db"] >= 35
        # only what the family loads was fetched: the VAE and the tokenizer, no UNet or text encoder
        assert {name.split("/")[0] for name in info["source"]["files"]} == {"model_index.json", "tokenizer", "vae"}


def test_a_family_declares_component_names_of_its_own(tmp_path: Path) -> None:
    """A new family (or ControlNet) adds components without editing a shared list: the name is the family's."""
    from dataclasses import replace

    from publisher.manifest import json_schema

    own = Component("latent_decoder")
    family = replace(DECODER_ONLY, name="own-names", components=(replace(DECODER_ONLY.components[0],
                                                                        component=own),))
    register_family(family)
    try:
        text = MANIFEST.replace("family: decoder-only", "family: own-names").replace(
            "    layouts: [packages]", "    layouts: [packages]\n    components: [latent_decoder]")
        loaded = load_manifest(write_manifest(tmp_path, text=text))
        assert loaded.manifest.source_components == [own]
        plan = build_plan([loaded], "me")
        assert {s.params.component for s in plan.steps_of("convert")} == {"latent_decoder"}
        assert "latent_decoder" in json_schema()["$defs"]["Source"]["properties"]["components"]["anyOf"][0][
            "items"]["enum"]
        # the built-in SD family does not have it
        with pytest.raises(ManifestError, match="'latent_decoder' is not a component of family 'sd'"):
            load_manifest(write_manifest(tmp_path / "sd", text=text.replace("family: own-names\n", "")))
    finally:
        unregister_family(family.name)
    with pytest.raises(ValueError, match="a component name is lowercase"):
        Component("Latent Decoder")
