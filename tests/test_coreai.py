"""Core AI bundles (`formats: [coreai]`): the layout and metadata Apple's Swift Core AI diffusion pipeline reads
(apple/coreai-models `PipelineDescriptor`, `loadComponents`), Apple's names, shapes and dtypes, Core AI's own
compression checked on the stored value types, the bundle run through Core AI's runtime against PyTorch, and a
republish that sends nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from publisher.metrics import psnr
from tests.helpers import MANIFEST_HEAD, manifest_errors, write_manifest

COREAI_MANIFEST = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-coreai"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    formats: [coreai]
  - repo: "{{namespace}}/coreml-tiny-sd-int4"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    layouts: [packages]
    formats: [coreai]
    coreai_compression: int4
"""


def test_core_ai_rules_and_plan(tmp_path: Path) -> None:
    from publisher.manifest import load_manifest
    from publisher.plan import build_plan

    text = COREAI_MANIFEST.format(source="a/b")
    assert manifest_errors(text, tmp_path) == []
    assert manifest_errors(text.replace("license: mit", "license: mit\nfamily: sdxl"), tmp_path)[0] == (
        "13: publish[0].formats: family 'sdxl' has no Core AI bundle (Apple's Core AI diffusion pipeline loads "
        "SD 1.x/2.x)")
    assert manifest_errors(text.replace("resolution: 256", "resolution: 256x320"), tmp_path)[0] == (
        "12: publish[0].formats: a Core AI bundle is square (the Swift pipeline's image size is one number), not the "
        "default size 256x320")
    no_decoder = text.replace("    formats: [coreai]\n", "    formats: [coreai]\n    components: [text_encoder, unet]\n", 1)
    assert manifest_errors(no_decoder, tmp_path) == ["12: publish[0].formats: a Core AI bundle needs vae_decoder among the "
                                             "components (text_encoder, unet, vae_decoder, vae_encoder)"]
    mixed = text.replace("precision: {type: float16}\n    attention: [ORIGINAL]\n    formats: [coreai]",
                         "precision: {type: palettize, mixed_bit: {target_bits: 4.5}}\n    attention: [ORIGINAL]\n"
                         "    formats: [coreai]", 1)
    assert manifest_errors(mixed, tmp_path)[0].startswith("10: publish[0].precision: a Core AI bundle follows float16 or a "
                                                  "uniform per-tensor palettization, not mixed")
    assert manifest_errors(text.replace("    formats: [coreai]\n    coreai_compression", "    coreai_compression"), tmp_path) == [
        "17: publish[1].coreai_compression: only with `formats: [..., coreai]`"]
    both = COREAI_MANIFEST.replace("formats: [coreai]\n    coreai_compression", "formats: [coreml, coreai]\n"
                                   "    coreai_compression")
    plan = build_plan([load_manifest(write_manifest(tmp_path, "a/b", both))], "me")
    assert [v.id for v in plan.variants] == ["me/coreml-tiny-sd-int4/original", "me/coreml-tiny-sd-coreai/coreai",
                                             "me/coreml-tiny-sd-int4/coreai"]
    steps = plan.steps_of("coreai")
    # the VAE is never compressed: its two assets serve both bundles; the text encoder and UNet differ
    assert sorted((s.params.component, s.params.compression) for s in steps) == [  # type: ignore[union-attr]
        ("text_encoder", "float16"), ("text_encoder", "int4"), ("unet", "float16"), ("unet", "int4"),
        ("vae_decoder", "float16"), ("vae_encoder", "float16")]
    assert not plan.steps_of("convert") or all("coreai" not in v for s in plan.steps_of("convert")
                                                for v in s.variants)


def test_a_core_ai_library_change_rebuilds_the_bundles_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Core AI's packages are in the keys of the steps that export with them, and in no Core ML step's key."""
    import publisher.util.versions as versions
    from publisher.manifest import load_manifest
    from publisher.plan import build_plan

    both = COREAI_MANIFEST.replace("formats: [coreai]\n    coreai_compression", "formats: [coreml, coreai]\n"
                                   "    coreai_compression")
    plan = build_plan([load_manifest(write_manifest(tmp_path, "a/b", both))], "me")
    before = plan.keys()
    monkeypatch.setattr(versions, "coreai_versions", lambda: {"coreai-torch": "99.0"})
    after = plan.keys()
    changed = {step_id for step_id in before if before[step_id] != after[step_id]}
    assert {plan.steps[i].kind for i in changed} == {"coreai", "assemble"}
    assert all(plan.steps[i].kind == "coreai" or plan.steps[i].variants[0].endswith("/coreai") for i in changed)
    assert len([i for i in changed if plan.steps[i].kind == "coreai"]) == len(plan.steps_of("coreai"))


def test_an_asset_is_reproducible_and_a_skipped_compression_is_an_error(tiny_source: Path, tmp_path: Path) -> None:
    """The same inputs give the same bytes (Core AI draws its generated names at random: seeded here); the
    compression check fails an asset whose weights were not stored compressed."""
    import torch

    from publisher.convert.coreai import check_compressed, export_asset
    from publisher.coreai_bundle import CoreAICompression
    from publisher.errors import ToolchainError
    from publisher.vocabulary import Component

    files = []
    for name in ("a", "b"):
        asset = tmp_path / name / "VAEDecoder.aimodel"
        record = export_asset(tiny_source, Component.VAE_DECODER, 128, CoreAICompression(), asset, "tiny", "mit", "d",
                              0.0)
        files.append({p.relative_to(asset).as_posix(): p.read_bytes() for p in asset.rglob("*") if p.is_file()})
    assert files[0] == files[1] and set(files[0]) == {"main.mlirb", "main.hash", "metadata.json"}
    # a float16 asset's weights are the source's, byte for byte (the check that runs at full size on Linux); the
    # decoder's program holds the decoder's weights, not the encoder's, and another source's are refused
    from publisher.convert.coreai import check_weights
    from publisher.tiny import build_tiny_pipeline

    decoder_weights = sum(1 for p in _vae_parameters(tiny_source) if p.startswith(("decoder.", "post_quant_conv.")))
    assert 0 < record["weights_checked"] <= decoder_weights
    with pytest.raises(ToolchainError, match="source weights are not in the asset as float16"):
        check_weights(tmp_path / "a" / "VAEDecoder.aimodel", tiny_source, Component.VAE_ENCODER)
    other = build_tiny_pipeline(tmp_path / "other", seed=7, components=(Component.VAE_DECODER,))
    with pytest.raises(ToolchainError, match=f"of {record['weights_checked']} source weights are not in the asset"):
        check_weights(tmp_path / "a" / "VAEDecoder.aimodel", other, Component.VAE_DECODER)
    with pytest.raises(ToolchainError, match="INT4 per-block \\(32\\) compression did not happen"):
        check_compressed(tmp_path / "a" / "VAEDecoder.aimodel", CoreAICompression("int4"), expected=10_000)
    # Apple's INT4 preset on the UNet: its conv and linear weights of 32768 values or more stored as 4-bit integers
    from publisher.convert.coreai import compressible_elements, load_wrapper

    int4 = CoreAICompression("int4")
    record = export_asset(tiny_source, Component.UNET, 128, int4, tmp_path / "Unet.aimodel", "tiny", "mit", "d", 0.0)
    assert record["compression"] == "INT4 per-block (32)"
    expected = compressible_elements(load_wrapper(tiny_source, Component.UNET, torch.float32), int4)
    assert 0 < 0.9 * expected <= record["storage_types"]["Int4"]  # a time-embedding linear or two stay float16


@pytest.mark.slow
def test_a_bundle_is_built_published_and_runs_as_pytorch(tmp_path: Path, staging_hub, tiny_source_repo,  # type: ignore[no-untyped-def]
                                                         tiny_source: Path, hf_api) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from publisher.convert.coreai import asset_interface, run_asset
    from publisher.engine.build import BuildOptions, build
    from publisher.manifest import load_manifests
    from publisher.publish import PublishOptions, publish

    loaded = load_manifests([write_manifest(tmp_path / "manifests", text=COREAI_MANIFEST.split("  - repo:")[0]
                                            + "  - repo:" + COREAI_MANIFEST.split("  - repo:")[1])])
    out = tmp_path / "out"
    result = build(loaded, BuildOptions(out=out, store=tmp_path / "store", namespace="cai", compile=False,
                                        endpoint=staging_hub.url, token=staging_hub.token, isolate=False,
                                        progress=False))
    assert result.ok, [v.error for v in result.variants]
    bundle = out / "cai" / "coreml-tiny-sd-coreai" / "coreai"
    names = {"TextEncoder.aimodel", "Unet.aimodel", "VAEDecoder.aimodel", "VAEEncoder.aimodel"}
    assert {p.name for p in bundle.iterdir()} == names | {"metadata.json", "tokenizer", "build-info.json"}
    assert {p.name for p in (bundle / "tokenizer").iterdir()} == {"vocab.json", "merges.txt"}
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert (metadata["metadata_version"], metadata["kind"]) == ("0.2", "diffusion")
    assert metadata["assets"] == {"text_encoder": "TextEncoder.aimodel", "unet": "Unet.aimodel",
                                  "vae_decoder": "VAEDecoder.aimodel", "vae_encoder": "VAEEncoder.aimodel"}
    vae_config = json.loads((tiny_source / "vae" / "config.json").read_text())
    scheduler_config = json.loads((tiny_source / "scheduler" / "scheduler_config.json").read_text())
    diffusion = metadata["diffusion"]
    assert diffusion["decoder_scale_factor"] == diffusion["encoder_scale_factor"] == vae_config["scaling_factor"]
    assert diffusion["scheduler"]["beta_end"] == scheduler_config["beta_end"]
    assert (diffusion["type"], diffusion["prediction_type"]) == ("stable-diffusion", "epsilon")
    # Apple's names, shapes and dtypes; the Swift loader checks image_size against the UNet's sample height x 8
    interfaces = {name: asset_interface(bundle / name) for name in names}
    assert interfaces["TextEncoder.aimodel"] == ([("input_ids", "NDArray (Int32, 1 × 77)")],
                                                 [("last_hidden_state", "NDArray (Float16, 1 × 77 × 32)")])
    unet_inputs, unet_outputs = interfaces["Unet.aimodel"]
    assert unet_inputs == [("sample", "NDArray (Float16, 2 × 4 × 32 × 32)"), ("timestep", "NDArray (Float16, 2)"),
                           ("encoder_hidden_states", "NDArray (Float16, 2 × 77 × 32)")]
    assert unet_outputs == [("noise_pred", "NDArray (Float16, 2 × 4 × 32 × 32)")]
    assert diffusion["image_size"] == 32 * 8 == 256
    assert interfaces["VAEDecoder.aimodel"] == ([("z", "NDArray (Float16, 1 × 4 × 32 × 32)")],
                                                [("image", "NDArray (Float16, 1 × 3 × 256 × 256)")])
    assert interfaces["VAEEncoder.aimodel"] == ([("image", "NDArray (Float16, 1 × 3 × 256 × 256)")],
                                                [("latent_params", "NDArray (Float16, 1 × 8 × 32 × 32)")])
    # `publisher verify --runtime coreai`: each asset on the seeded inputs its build stored, against PyTorch float32
    # (the UNet's is the loop below: a UNet call takes ~20 s on this runtime)
    from publisher.verify.coreai import check_asset, verify_bundles
    from publisher.verify.fidelity import REFERENCE, Reference

    checks = verify_bundles(out, tmp_path / "store", ["text_encoder", "vae_decoder", "vae_encoder"])
    assert [c.component for _, c in checks] == ["text_encoder", "vae_decoder", "vae_encoder"]
    assert all(c.passed and c.held_to_bar and min(c.psnr_db.values()) >= 35 for _, c in checks), checks
    info = json.loads((bundle / "build-info.json").read_text())
    assert info["fidelity"]["coreai_text_encoder"]["coreai_psnr_db"]["last_hidden_state"] >= 35
    key = info["coreai"]["text_encoder"]["reference"]
    stored = Reference.load(tmp_path / "store" / "objects" / key[:2] / key / REFERENCE)
    stored.outputs = {name: value + 0.5 * np.abs(value).max() for name, value in stored.outputs.items()}
    wrong = check_asset(bundle / "TextEncoder.aimodel", stored, compressed=False, runtime="test")
    assert not wrong.passed and min(wrong.psnr_db.values()) < 35  # the check can fail
    assert check_asset(bundle / "TextEncoder.aimodel", stored, compressed=True, runtime="test").passed  # no bar
    assert {c: r["compression"] for c, r in info["coreai"].items()} == dict.fromkeys(info["coreai"], "float16")
    assert set(info["coreai"]["unet"]["storage_types"]) == {"Float16", "Float32", "Int32", "UInt32", "UInt64"}

    # a denoising step as the Swift pipeline runs it (prompt and empty prompt, classifier-free guidance),
    # through the bundle and through PyTorch (float32) on the same inputs: each component's output, then the image
    tokenizer = CLIPTokenizer.from_pretrained(tiny_source / "tokenizer")
    text_model = CLIPTextModel.from_pretrained(tiny_source / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(tiny_source / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_source / "vae").eval()
    ids = [tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
           for text in ("", "a tiny house")]
    with torch.no_grad():
        reference_text = [text_model(torch.from_numpy(i)).last_hidden_state.numpy() for i in ids]
    bundle_text = [run_asset(bundle / "TextEncoder.aimodel", {"input_ids": i.astype(np.int32)})["last_hidden_state"]
                   for i in ids]
    assert min(psnr(r, b.astype(np.float32)) for r, b in zip(reference_text, bundle_text, strict=True)) >= 35
    scheduler = DDIMScheduler.from_pretrained(tiny_source / "scheduler")  # stateless: one for both loops
    scheduler.set_timesteps(1)  # one step: a UNet call takes ~20 s on Linux's reference runtime at float16
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    ours, theirs = latents.copy(), latents.copy()
    for t in scheduler.timesteps:
        timestep = np.full((2,), float(t), np.float32)
        feed = {"sample": np.concatenate([ours, ours]).astype(np.float16), "timestep": timestep.astype(np.float16),
                "encoder_hidden_states": np.concatenate(bundle_text).astype(np.float16)}
        noise = run_asset(bundle / "Unet.aimodel", feed)["noise_pred"].astype(np.float32)
        with torch.no_grad():
            expected = unet(torch.from_numpy(feed["sample"].astype(np.float32)), torch.from_numpy(timestep),
                            torch.from_numpy(feed["encoder_hidden_states"].astype(np.float32))).sample.numpy()
            reference_noise = unet(torch.from_numpy(np.concatenate([theirs, theirs])), torch.from_numpy(timestep),
                                   torch.from_numpy(np.concatenate(reference_text))).sample.numpy()
        assert psnr(expected, noise) >= 35
        ours = _step(scheduler, noise, t, ours)
        theirs = _step(scheduler, reference_noise, t, theirs)
    scale = vae_config["scaling_factor"]
    image = run_asset(bundle / "VAEDecoder.aimodel", {"z": (ours / scale).astype(np.float16)})["image"]
    with torch.no_grad():
        reference_image = vae.decode(torch.from_numpy(theirs / scale)).sample.numpy()
    assert psnr(reference_image, image.astype(np.float32)) >= 30

    options = PublishOptions(out=out, namespace="cai", target="staging", endpoint=staging_hub.url,
                             token=staging_hub.token)
    first = publish(loaded, options)
    assert all(o.commits for o in first)
    files = hf_api.list_repo_files("cai/coreml-tiny-sd-coreai")
    assert "coreai/Unet.aimodel/main.mlirb" in files and "coreai/metadata.json" in files
    card = (hf_api.hf_hub_download("cai/coreml-tiny-sd-coreai", "README.md"))
    text = Path(card).read_text()
    assert "StableDiffusionPipeline.load(from:" in text and "| `coreai/` | 256x256 |" in text
    assert [o.commits for o in publish(loaded, options)] == [[]]  # nothing changed: nothing sent
    # an app developer's download: the bundle alone, every file checked against the Hub's listing
    from publisher.fetch import fetch_variant

    fetch_variant("cai/coreml-tiny-sd-coreai", "coreai", tmp_path / "app", staging_hub.url, staging_hub.token)
    got = {p.relative_to(tmp_path / "app").as_posix(): p.read_bytes() for p in (tmp_path / "app").rglob("*")
           if p.is_file()}
    built = {p.relative_to(bundle.parent).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert got == built


def _step(scheduler, noise: np.ndarray, t, latents: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Classifier-free guidance at 7.5 (the Swift pipeline's default), then the scheduler's step."""
    import torch

    uncond, cond = noise[:1], noise[1:]
    guided = uncond + 7.5 * (cond - uncond)
    return scheduler.step(torch.from_numpy(guided), t, torch.from_numpy(latents)).prev_sample.numpy()


def test_bundle_metadata_decodes_as_the_swift_descriptor_reads_it() -> None:
    """PipelineDescriptor decodes the `diffusion` block with snake_case keys (its CodingKeys), the scheduler defaults
    with all four fields, and a PredictionType the Swift schedulers know (epsilon, v_prediction)."""
    from publisher.coreai_bundle import CoreAICompression, bundle_metadata
    from publisher.errors import SourceError

    scheduler = {"prediction_type": "v_prediction", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    metadata = bundle_metadata("repo", {"unet": "Unet.aimodel"}, 768, {"scaling_factor": 0.18215}, scheduler,
                               {"hf_model_id": "a/b"}, CoreAICompression("int4"))
    swift_keys = {"type", "version", "prediction_type", "image_size", "components", "scheduler",
                  "encoder_scale_factor", "decoder_scale_factor", "decoder_shift_factor", "batch_norm_eps",
                  "guidance_embeds", "rope_axes_dims", "rope_theta", "default_guidance_scale", "default_steps"}
    assert set(metadata["diffusion"]) <= swift_keys
    assert set(metadata["diffusion"]["scheduler"]) == {"training_steps", "beta_start", "beta_end", "beta_schedule"}
    assert (metadata["diffusion"]["prediction_type"], metadata["diffusion"]["image_size"]) == ("v_prediction", 768)
    assert metadata["compression"] == "INT4 per-block (32)" and metadata["assets"] == {"unet": "Unet.aimodel"}
    with pytest.raises(SourceError, match="prediction_type 'sample' is not one Apple's Core AI pipeline takes"):
        bundle_metadata("repo", {}, 512, {}, {**scheduler, "prediction_type": "sample"}, {}, CoreAICompression())


def _vae_parameters(source: Path) -> list[str]:
    from diffusers import AutoencoderKL

    return list(AutoencoderKL.from_pretrained(source / "vae").state_dict())
