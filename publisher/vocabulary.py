"""The domain's words, below every other module: attention implementations, component names, compute units, layouts.

The manifest schema, the plan, the families and the stages all speak them; nothing here imports the project.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, ClassVar


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


# lowercase words joined by _, - or . (Apple names the ControlNet-ready UNet's package `control-unet`; a ControlNet is
# `controlnet-<org>_<name>` after its Hub repo, whose names may hold dots)
COMPONENT_NAME = r"^[a-z][a-z0-9_.-]{0,199}$"


class Component(str):
    """A model component's name (`unet`, `text_encoder`, ...). A family declares the components it has
    (`family.ComponentSpec`): a new family, or ControlNet, adds its own without editing this module. The names below
    are the built-in families' own, for the code that names one."""

    __slots__ = ()

    TEXT_ENCODER: ClassVar[Component]
    TEXT_ENCODER_2: ClassVar[Component]  # SDXL's second (OpenCLIP bigG) text encoder
    UNET: ClassVar[Component]
    CONTROL_UNET: ClassVar[Component]  # the UNet with ControlNet residual inputs (Apple's `ControlledUnet`)
    CONTROLNET: ClassVar[Component]  # the kind of every ControlNet (each is `controlnet-<org>_<name>`)
    REFINER: ClassVar[Component]  # SDXL's refiner UNet, from the refiner pipeline (source.refiner)
    VAE_DECODER: ClassVar[Component]
    VAE_ENCODER: ClassVar[Component]
    SAFETY_CHECKER: ClassVar[Component]

    def __new__(cls, name: str) -> Component:
        if not isinstance(name, str) or not re.fullmatch(COMPONENT_NAME, name):
            raise ValueError(f"a component name is lowercase letters, digits, _, - and . (at most 200), not {name!r}")
        return super().__new__(cls, name)

    @property
    def value(self) -> str:
        """The name (as an enum's value reads: code written for the enum this was keeps working)."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Component({str.__repr__(self)})"

    @classmethod
    def __get_pydantic_json_schema__(cls, core: Any, handler: Any) -> dict[str, Any]:
        # marked, so that the manifest's schema can list the registered families' names where one goes
        return {"type": "string", "pattern": COMPONENT_NAME, "x-component": True}

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(strict=True, pattern=COMPONENT_NAME),
            serialization=core_schema.plain_serializer_function_ser_schema(str))


Component.TEXT_ENCODER = Component("text_encoder")
Component.TEXT_ENCODER_2 = Component("text_encoder_2")
Component.UNET = Component("unet")
Component.CONTROL_UNET = Component("control-unet")
Component.CONTROLNET = Component("controlnet")
Component.REFINER = Component("refiner")
Component.VAE_DECODER = Component("vae_decoder")
Component.VAE_ENCODER = Component("vae_encoder")
Component.SAFETY_CHECKER = Component("safety_checker")


def controlnet_component(repo: str) -> Component:
    """A ControlNet's component name, after its Hub repo as Apple's converter names its package
    (`ControlNet_<org>_<name>`), case folded: `lllyasviel/sd-controlnet-canny` -> `controlnet-lllyasviel_sd-controlnet-canny`."""
    return Component(f"{Component.CONTROLNET}-{repo.replace('/', '_').lower()}")


class ComputeUnit(str, Enum):
    ALL = "ALL"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"
    CPU_ONLY = "CPU_ONLY"


class Layout(str, Enum):
    PACKAGES = "packages"
    COMPILED = "compiled"
    ZIP = "zip"


class Format(str, Enum):
    """What a publish entry ships: Core ML packages (iOS/macOS 16-26) and/or a Core AI bundle (iOS/macOS 27)."""

    COREML = "coreml"
    COREAI = "coreai"


# An image size: an int for a square one (the form every square manifest and store key has always had), "WxH"
# (width x height) otherwise. Core ML models for the Neural Engine have fixed input shapes: one package per size.
Resolution = int | str
_SIZE = re.compile(r"^([1-9][0-9]{2,3})x([1-9][0-9]{2,3})$")


def size_of(resolution: Resolution) -> tuple[int, int]:
    """(width, height) of a resolution."""
    if isinstance(resolution, int):
        return resolution, resolution
    found = _SIZE.fullmatch(resolution)
    if found is None:
        raise ValueError(f"an image size is an int or 'WIDTHxHEIGHT', not {resolution!r}")
    return int(found.group(1)), int(found.group(2))


def resolution_of(width: int, height: int) -> Resolution:
    """The canonical form: an int when square."""
    return width if width == height else f"{width}x{height}"


def size_label(resolution: Resolution) -> str:
    """`512x768` (width x height), as folder and zip suffixes name a size."""
    width, height = size_of(resolution)
    return f"{width}x{height}"
