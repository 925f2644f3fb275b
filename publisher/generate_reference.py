"""The reference for publisher.generate: the same prompt, seed (the same NumPy noise), scheduler and, for SDXL, the
Swift pipeline's geometry through diffusers' own pipeline in float32 on the source folder (the components a build
fetches, whichever weight copy it took); its image decoded from the last denoised prediction, as the Swift
pipeline makes its image. `compare` gives the PSNR of the final latents and of the image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from publisher.errors import PublisherError
from publisher.generate import (
    XL_CROP,
    XL_SIZE,
    Denoised,
    Generated,
    GenerateSettings,
    latent_noise,
    swift_scheduler,
    to_image,
)
from publisher.metrics import psnr


def reference_generate(source: Path, settings: GenerateSettings, shape: tuple[int, ...],
                       family: str = "sd") -> Generated:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from publisher.convert.weight_files import weights_variant

    def load(cls: Any, folder: str) -> Any:  # float32, whichever weight copy the build fetched
        path = Path(source) / folder
        return cls.from_pretrained(path, torch_dtype=torch.float32, variant=weights_variant(path)).eval()

    # typed Any: diffusers' pipelines declare their components at run time
    common: dict[str, Any] = {"vae": load(AutoencoderKL, "vae"), "unet": load(UNet2DConditionModel, "unet"),
                              "tokenizer": CLIPTokenizer.from_pretrained(Path(source) / "tokenizer"),
                              "scheduler": swift_scheduler(settings.scheduler, settings.steps)}
    geometry: dict[str, Any] = {}
    pipe: Any
    if family == "sdxl":
        if settings.refiner:
            raise PublisherError("the reference runs SDXL's base model only: generate without the refiner")
        pipe = StableDiffusionXLPipeline(**common, text_encoder=load(CLIPTextModel, "text_encoder"),
                                         text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2"),
                                         # the build fetches one tokenizer (the Swift pipeline reads one: the
                                         # second pads with "!"); SDXL's two share their vocabulary
                                         tokenizer_2=CLIPTokenizer.from_pretrained(Path(source) / "tokenizer",
                                                                                   pad_token="!"))
        size, crop = (int(XL_SIZE), int(XL_SIZE)), (int(XL_CROP), int(XL_CROP))
        geometry = {"original_size": size, "target_size": size, "crops_coords_top_left": crop}
    elif family == "sd":
        pipe = StableDiffusionPipeline(**common, text_encoder=load(CLIPTextModel, "text_encoder"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        raise PublisherError(f"no reference for the '{family}' family")
    pipe.set_progress_bar_config(disable=True)
    denoised = Denoised(pipe.scheduler)
    noise = latent_noise(settings.seed, shape, float(pipe.scheduler.init_noise_sigma))
    height, width = shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor
    with torch.no_grad():
        latents = pipe(settings.prompt, negative_prompt=settings.negative_prompt, height=height, width=width,
                       num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       latents=torch.from_numpy(noise), output_type="latent", **geometry).images
        decoded = pipe.vae.decode(denoised.last() / pipe.vae.config.scaling_factor).sample
    return Generated(latents=latents.numpy(), image=to_image(decoded.numpy()),
                     timesteps=[int(t) for t in pipe.scheduler.timesteps])


def compare(ours: Generated, reference: Generated) -> dict[str, float]:
    """PSNR (dB) of the final latents and of the 8-bit image against the reference."""
    return {"latents_psnr_db": round(psnr(reference.latents, ours.latents), 2),
            "image_psnr_db": round(psnr(reference.image.astype(np.float32), ours.image.astype(np.float32)), 2)}
