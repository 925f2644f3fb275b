"""The domain's words, below every other module: attention implementations, component names, compute units, layouts.

The manifest schema, the plan, the families and the stages all speak them; nothing here imports the project.
"""

from __future__ import annotations

from enum import Enum


class Attention(str, Enum):
    ORIGINAL = "ORIGINAL"
    SPLIT_EINSUM = "SPLIT_EINSUM"
    SPLIT_EINSUM_V2 = "SPLIT_EINSUM_V2"

    @property
    def folder(self) -> str:
        """Folder name in a published repo (`original`, `split_einsum`, `split_einsum_v2`)."""
        return self.value.lower()

    @property
    def default_compute_unit(self) -> ComputeUnit:
        return ComputeUnit.CPU_AND_GPU if self is Attention.ORIGINAL else ComputeUnit.ALL


class Component(str, Enum):
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second (OpenCLIP bigG) text encoder
    UNET = "unet"
    REFINER = "refiner"  # SDXL's refiner UNet, from the refiner pipeline (source.refiner)
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    SAFETY_CHECKER = "safety_checker"


class ComputeUnit(str, Enum):
    ALL = "ALL"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"
    CPU_ONLY = "CPU_ONLY"


class Layout(str, Enum):
    PACKAGES = "packages"
    COMPILED = "compiled"
    ZIP = "zip"
