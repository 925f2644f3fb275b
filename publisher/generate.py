"""Text to image through a built variant's packages, the way Apple's Swift `StableDiffusionPipeline` runs them.

No PyTorch model: the tokenizer files (vocab.json, merges.txt; padded with the end token to 77, as the Swift
BPETokenizer does), the text encoder's `last_hidden_state` for the negative prompt and the prompt (classifier-free
guidance as a batch of 2, (2, C, 1, 77)), latent noise from NumPy's seeded legacy generator (the Swift
`NumPyRandomSource` reproduces it), the Swift scheduler's defaults (PNDM: scaled-linear betas 0.00085-0.012, 1000
training steps, "leading" spacing with offset 1; DPM-Solver++: order 2, lower-order final step, "linspace"
spacing), the UNet whole or as its two chunks in order (chunk 2 takes chunk 1's outputs and the UNet's inputs by
name), guidance `uncond + g * (text - uncond)`, then the VAE decoder (its input divided by the scale factor), its
output mapped from [-1, 1] to 8-bit RGB. The schedulers are diffusers' classes set up as the Swift ones are
(numbers, not a model).

The image is decoded from the last step's denoised prediction, as the Swift pipeline does (its schedulers'
`modelOutputs.last`), not from the last previous sample. SDXL generates as `StableDiffusionXLPipeline` does: both
text encoders (the second's tokenizer pads with "!"), its pooled output and the geometry (`time_ids`, the Swift
configuration's 1024 sizes), the refiner from 80% of the steps with the second encoder and the aesthetic scores.
Where the variant has a safety checker it judges the image as the Swift SafetyChecker does (the whole image resized
to its input, ImageNet statistics); the Swift pipeline returns no image where it flags one.
The reference (diffusers' own pipeline) is publisher.generate_reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from publisher.build_info import BUILD_INFO, read_build_info
from publisher.errors import PublisherError
from publisher.family import family_named
from publisher.verify.runtime import Model, Runtime

SCHEDULERS = ("pndm", "dpm-solver++")
SD_DECODER_SCALE = 0.18215  # the Swift configuration's default encoder/decoder scale factor
TOKENS = 77


@dataclass(frozen=True)
class GenerateSettings:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    scheduler: str = "pndm"
    guidance: float = 7.5
    refiner: bool = True  # SDXL: switch to the variant's refiner UNet (where it has one) at 80% of the steps
    safety: bool = True  # run the variant's safety checker on the image, where it has one


# the Swift pipeline configuration's SDXL defaults: geometry (original and target size, crop), aesthetic scores of
# the refiner's prompt and negative prompt, the step fraction where the refiner takes over
XL_SIZE, XL_CROP, XL_AESTHETIC, XL_NEGATIVE_AESTHETIC, XL_REFINER_START = 1024.0, 0.0, 6.0, 2.5, 0.8


@dataclass
class Generated:
    latents: np.ndarray  # the final latents (1, 4, h, w): the last step's previous sample
    image: np.ndarray  # (H, W, 3) uint8, decoded from the last step's denoised prediction (as the Swift pipeline)
    timesteps: list[int] = field(default_factory=list)
    # the variant's safety checker's verdict (None: it has none, or it was not asked); the Swift pipeline returns
    # no image where it is False
    safe: bool | None = None


# the Swift SafetyChecker's preprocessing: the image resized whole to the model's input size, ImageNet's statistics
SAFETY_MEAN, SAFETY_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def safety_input(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the checker's `clip_input` (1, 3, size, size), as the Swift SafetyChecker makes it."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    planes = (resized / 255.0 - np.asarray(SAFETY_MEAN, np.float32)) / np.asarray(SAFETY_STD, np.float32)
    return planes.transpose(2, 0, 1)[None].astype(np.float32)


def is_safe(checker: Model, package: Path, image: np.ndarray) -> bool:
    """The safety checker's verdict on an image: no adjustment, placeholder `images` (the Swift pipeline's)."""
    inputs = {t.name: t for t in _inputs(package)}
    verdict = checker({"clip_input": safety_input(image, inputs["clip_input"].shape[-1]),
                       "images": np.zeros(inputs["images"].shape, np.float32), "adjustment": np.zeros((1,), np.float32)})
    return not bool(verdict["has_nsfw_concepts"].reshape(-1)[0] > 0.5)


class Denoised:
    """The scheduler's last denoised prediction, x0 = (x_t - sigma_t * eps) / alpha_t of the last step: what the
    Swift pipeline decodes (its schedulers' `modelOutputs.last`), not the last previous sample diffusers decodes.
    For PNDM, eps is the step's combined (linear multistep) output, as the Swift PNDMScheduler converts it."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler, self.value = scheduler, None
        if hasattr(scheduler, "_get_prev_sample"):  # PNDM: every step ends there with the combined output
            original = scheduler._get_prev_sample

            def record(sample: Any, timestep: Any, prev_timestep: Any, model_output: Any) -> Any:
                alpha = scheduler.alphas_cumprod[int(timestep)]
                self.value = (sample - (1 - alpha) ** 0.5 * model_output) / alpha ** 0.5
                return original(sample, timestep, prev_timestep, model_output)

            scheduler._get_prev_sample = record

    def last(self) -> Any:
        outputs = getattr(self.scheduler, "model_outputs", None)  # DPM-Solver++: its converted outputs are x0
        if self.value is None and outputs and outputs[-1] is not None:
            return outputs[-1]
        if self.value is None:
            raise PublisherError(f"cannot read the denoised prediction of {type(self.scheduler).__name__}")
        return self.value


def swift_scheduler(name: str, steps: int) -> Any:
    """A diffusers scheduler with the Swift package's settings (it reads no scheduler config)."""
    common = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if name == "pndm":
        from diffusers import PNDMScheduler

        scheduler: Any = PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                       timestep_spacing="leading")
    elif name == "dpm-solver++":
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                lower_order_final=True, timestep_spacing="linspace")
    else:
        raise PublisherError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not '{name}'")
    scheduler.set_timesteps(steps)
    return scheduler


def latent_noise(seed: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """The Swift `NumPyRandomSource`'s normal samples: NumPy's legacy seeded generator (MT19937, polar method)."""
    return (np.random.RandomState(seed).standard_normal(shape) * sigma).astype(np.float32)


def tokenize(folder: Path, text: str, pad: str = "<|endoftext|>") -> np.ndarray:
    """(1, 77) float32 token ids, as the Swift BPETokenizer makes them from vocab.json and merges.txt (SDXL's second
    text encoder's tokenizer pads with "!")."""
    ids = _tokenizer(str(folder), pad)(text.strip(), padding="max_length", max_length=TOKENS,
                                       truncation=True)["input_ids"]
    return np.asarray([ids], dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _tokenizer(folder: str, pad: str) -> Any:
    """The tokenizer files read once per folder (a generation tokenizes 2 to 4 texts, an evaluation many)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), pad_token=pad)


def to_image(decoded: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return (np.clip(decoded[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


class PackageSet:
    """A variant's packages by submodule (each opened once in the runtime), its family, its tokenizer files and the
    VAE scale factor the app configures."""

    def __init__(self, packages: dict[str, Path], tokenizer: Path, scale: float, runtime: Runtime,
                 family: str = "sd") -> None:
        if family not in ("sd", "sdxl"):
            raise PublisherError(f"generating with the '{family}' family is not supported")
        encoders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
        for needed in (*encoders, "vae_decoder"):
            if needed not in packages:
                raise PublisherError(f"no {needed} package (generating needs {', '.join(encoders)}, the UNet and "
                                     "the VAE decoder)")
        if "unet" not in packages and "unet_chunk1" not in packages:
            raise PublisherError("no unet package")
        if not (tokenizer / "vocab.json").is_file() or not (tokenizer / "merges.txt").is_file():
            raise PublisherError(f"no vocab.json and merges.txt in {tokenizer}")
        self.packages, self.tokenizer, self.scale, self.runtime = packages, tokenizer, scale, runtime
        self.family = family
        self._open: dict[str, Model] = {}

    def model(self, submodule: str) -> Model:
        if submodule not in self._open:
            self._open[submodule] = self.runtime.open(self.packages[submodule])
        return self._open[submodule]

    @property
    def has_refiner(self) -> bool:
        return "refiner" in self.packages or "refiner_chunk1" in self.packages

    def unet(self, inputs: dict[str, np.ndarray], refiner: bool = False) -> np.ndarray:
        """The noise prediction: the two chunks in order where the variant has them (as the Swift pipeline prefers
        them), else the whole UNet (or the refiner's)."""
        name = "refiner" if refiner else "unet"
        if f"{name}_chunk1" in self.packages and f"{name}_chunk2" in self.packages:
            first = self.model(f"{name}_chunk1")(inputs)
            return self.model(f"{name}_chunk2")({**inputs, **first})["noise_pred"]
        return self.model(name)(inputs)["noise_pred"]

    def conditioning(self, settings: GenerateSettings, refiner: bool = False) -> dict[str, np.ndarray]:
        """The UNet's text (and, SDXL, geometry) inputs for the negative prompt and the prompt, as a batch of 2."""
        texts = (settings.negative_prompt, settings.prompt)
        if self.family == "sd":
            states = [self.model("text_encoder")({"input_ids": tokenize(self.tokenizer, text)})["last_hidden_state"]
                      for text in texts]
            return {"encoder_hidden_states": _hidden_states(states)}
        second = [self.model("text_encoder_2")({"input_ids": tokenize(self.tokenizer, text, pad="!")})
                  for text in texts]
        if refiner:  # the refiner reads the second encoder only, and the aesthetic score instead of the target size
            states = [out["hidden_embeds"] for out in second]
            geometry = [[XL_SIZE, XL_SIZE, XL_CROP, XL_CROP, score] for score in (XL_NEGATIVE_AESTHETIC, XL_AESTHETIC)]
        else:
            first = [self.model("text_encoder")({"input_ids": tokenize(self.tokenizer, text)})["hidden_embeds"]
                     for text in texts]
            states = [np.concatenate([a, b["hidden_embeds"]], axis=2) for a, b in zip(first, second, strict=True)]
            geometry = [[XL_SIZE, XL_SIZE, XL_CROP, XL_CROP, XL_SIZE, XL_SIZE]] * 2
        return {"encoder_hidden_states": _hidden_states(states),
                "text_embeds": np.concatenate([out["pooled_outputs"] for out in second], axis=0),
                "time_ids": np.asarray(geometry, dtype=np.float32)}


def _hidden_states(states: list[np.ndarray]) -> np.ndarray:
    """[(1, 77, C), (1, 77, C)] -> (2, C, 1, 77), the UNet's layout."""
    return np.concatenate(states, axis=0).transpose(0, 2, 1)[:, :, None, :]


def variant_packages(folder: Path, runtime: Runtime, tokenizer: Path | None = None) -> PackageSet:
    """A built (or downloaded) variant folder's packages, named as its build-info's source names them."""
    info_path = folder / BUILD_INFO
    if not info_path.is_file():
        raise PublisherError(f"{folder}: no {BUILD_INFO} (give a variant folder a build made)")
    info = read_build_info(info_path)
    family = family_named(info.variant.get("family", "sd"))
    model_version = info.source.repo.replace("/", "_")
    packages: dict[str, Path] = {}
    for package in sorted((folder / "packages").glob("*.mlpackage")):
        submodule = family.submodule_of_package(package.name, model_version)
        if submodule is not None:
            packages[submodule] = package
    candidates = [tokenizer] if tokenizer is not None else [folder / "compiled", folder]
    found = next((c for c in candidates if (c / "vocab.json").is_file() and (c / "merges.txt").is_file()), None)
    if found is None:
        raise PublisherError(f"no vocab.json and merges.txt in {' or '.join(str(c) for c in candidates)} "
                             "(a packages-only variant: give --tokenizer)")
    scale = float(info.app.get("vae_scale_factor", SD_DECODER_SCALE)) if info.app else SD_DECODER_SCALE
    try:
        return PackageSet(packages, found, scale, runtime, family.name)
    except PublisherError as exc:
        raise PublisherError(f"{folder}: {exc}") from exc


def generate(folder: Path, settings: GenerateSettings, runtime: Runtime, tokenizer: Path | None = None,
             progress: Callable[[int, int], None] = lambda step, total: None) -> Generated:
    return generate_with(variant_packages(Path(folder), runtime, tokenizer), settings, progress)


def generate_with(models: PackageSet, settings: GenerateSettings,
                  progress: Callable[[int, int], None] = lambda step, total: None) -> Generated:
    import torch

    base = models.conditioning(settings)
    refining = settings.refiner and models.has_refiner
    decoder_input = next(t for t in _inputs(models.packages["vae_decoder"]) if t.name == "z")
    scheduler = swift_scheduler(settings.scheduler, settings.steps)
    denoised = Denoised(scheduler)
    latents = latent_noise(settings.seed, decoder_input.shape, float(scheduler.init_noise_sigma))
    timesteps = [int(t) for t in scheduler.timesteps]
    switch = int(len(timesteps) * XL_REFINER_START) if refining else len(timesteps)
    refined = models.conditioning(settings, refiner=True) if refining else base
    for index, t in enumerate(timesteps):
        sample = np.concatenate([latents, latents], axis=0)
        noise = models.unet({"sample": sample, "timestep": np.full((2,), t, dtype=np.float32),
                             **(base if index < switch else refined)}, refiner=index >= switch)
        guided = noise[:1] + settings.guidance * (noise[1:] - noise[:1])
        latents = scheduler.step(torch.from_numpy(guided), t, torch.from_numpy(latents)).prev_sample.numpy()
        progress(index + 1, len(timesteps))
    decoded = models.model("vae_decoder")({"z": denoised.last().numpy() / models.scale})["image"]
    image = to_image(decoded)
    checker = models.packages.get("safety_checker")
    safe = is_safe(models.model("safety_checker"), checker, image) if checker and settings.safety else None
    return Generated(latents=latents, image=image, timesteps=timesteps, safe=safe)


def _inputs(package: Path) -> list[Any]:
    from publisher.mlpackage import package_info

    return list(package_info(package).inputs)


def save_png(image: np.ndarray, path: Path) -> None:
    """Atomically (temp file + rename)."""
    import os
    import tempfile

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(image).save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
