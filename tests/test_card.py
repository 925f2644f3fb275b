"""The model card's text from build-infos: no empty cells, and the folder meant for iOS is named."""

from __future__ import annotations

from typing import Any

from publisher.publish.card import card_text


def _info(folder: str, attention: str, chunked: bool, fidelity: dict[str, Any]) -> dict[str, Any]:
    return {
        "variant": {"folder": folder, "attention": attention, "compute_unit": "ALL", "precision_label": "float16",
                    "minimum_deployment_target": "iOS16", "chunk_unet": chunked, "license": "mit"},
        "source": {"repo": "org/sd", "revision": "main", "commit": "0" * 40},
        "files": {f"{folder}/packages/x.mlpackage/Manifest.json": {"size": 10, "sha256": "0" * 64}},
        "fidelity": fidelity,
        "tools": {"coremltools": "9.0"},
    }


def test_float16_card_names_the_ios_folder_and_has_no_none_cells() -> None:
    infos = [
        _info("original", "ORIGINAL", False, {"unet": {"output_psnr_db": 70.1}}),
        _info("split_einsum", "SPLIT_EINSUM", True, {"unet_chunk1": {"output_psnr_db": 71.0},
                                                    "unet_chunk2": {"output_psnr_db": 69.5}}),
    ]
    text = card_text("me/coreml-sd", infos, "http://hub")
    assert "None" not in text
    assert "| `split_einsum` | unet_chunk1 | 16 (float) | 0 | n/a | n/a | 71.0 |" in text
    assert "For iOS and iPadOS use `split_einsum/`" in text
    assert "| `split_einsum/` | 512x512 | SPLIT_EINSUM | ALL | float16 | iOS16 | iOS, iPadOS (UNet in 2 chunks) |" in text
    without_chunks = card_text("me/coreml-sd", infos[:1], "http://hub")
    assert "For iOS and iPadOS" not in without_chunks


def test_the_card_says_what_an_app_must_configure() -> None:
    """SDXL's VAE scale factor (Apple's Swift default is SD's 0.18215), its geometry inputs, and float32 VAE packages
    where the VAE asks to be upcast; nothing for an SD 1.x model whose VAE has the default."""
    sd = card_text("me/coreml-sd", [{**_info("original", "ORIGINAL", False, {}),
                                     "app": {"vae_scale_factor": 0.18215, "vae_float32": False}}], "http://hub")
    assert "ScaleFactor" not in sd and "originalSize" not in sd and "float32 packages" not in sd
    xl = _info("original", "ORIGINAL", False, {})
    xl["variant"]["family"] = "sdxl"
    text = card_text("me/coreml-sdxl", [{**xl, "app": {"vae_scale_factor": 0.13025, "vae_float32": True}}],
                     "http://hub")
    assert "Set the pipeline configuration's `encoderScaleFactor` and `decoderScaleFactor` to 0.13025" in text
    assert "`originalSize` and `targetSize`" in text
    assert "The VAE decoder and encoder are float32 packages" in text


def test_the_card_says_how_to_use_controlnets() -> None:
    info = _info("original", "ORIGINAL", False, {})
    info["variant"]["components"] = ["text_encoder", "unet", "control-unet"]
    text = card_text("me/coreml-sd", [info, _info("split_einsum", "SPLIT_EINSUM", True, {})], "http://hub")
    assert "`original/` also hold the ControlNet-ready UNet (`ControlledUnet.mlmodelc`" in text
    assert "`StableDiffusionPipeline(resourcesAt:controlNet:)`" in text
    canny = "controlnet-lllyasviel_sd-controlnet-canny"
    info["variant"]["components"].append(canny)
    info["extra_sources"] = {canny: {"repo": "lllyasviel/sd-controlnet-canny", "revision": "main", "commit": "c" * 40,
                                     "files": {}}}
    text = card_text("me/coreml-sd", [info], "http://hub")
    assert "converted from [lllyasviel/sd-controlnet-canny](https://huggingface.co/lllyasviel/sd-controlnet-canny)" in text
    assert "`compiled/controlnet/` (`LllyasvielSdControlnetCanny.mlmodelc`)" in text
    assert ('StableDiffusionPipeline(resourcesAt: url, controlNet: ["LllyasvielSdControlnetCanny"], '
            "configuration: config)") in text
    assert "configuration.controlNetInputs = [conditionImage]" in text
    assert "ControlNet" not in card_text("me/coreml-sd", [_info("original", "ORIGINAL", False, {})], "http://hub")


def test_the_sdxl_card_says_the_swift_package_does_not_load_its_controlnets() -> None:
    """Apple's Swift XL pipeline takes no ControlNet: no Swift snippet that cannot work, but how the packages wire."""
    info = _info("original", "ORIGINAL", False, {})
    canny = "controlnet-diffusers_controlnet-canny-sdxl-1.0"
    info["variant"] |= {"family": "sdxl", "components": ["text_encoder", "text_encoder_2", "unet", "control-unet", canny]}
    info["extra_sources"] = {canny: {"repo": "diffusers/controlnet-canny-sdxl-1.0", "revision": "main",
                                     "commit": "c" * 40, "files": {}}}
    text = card_text("me/coreml-sdxl", [info], "http://hub")
    assert "`compiled/controlnet/` (`DiffusersControlnetCannySdxl1.0.mlmodelc`)" in text
    assert "does not load ControlNets into `StableDiffusionXLPipeline` today" in text
    assert "`time_ids`, `text_embeds`) and `controlnet_cond`" in text
    assert "StableDiffusionPipeline(" not in text and "controlNetInputs" not in text
