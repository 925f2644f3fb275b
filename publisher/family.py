"""The model-family plug-in point: everything the pipeline knows about one kind of diffusers model, as data.

A family (SD 1.x/2.x today, in publisher.families.sd; SDXL next) declares its components: the diffusers folder
each loads from, the class that loads it and the wrapper that gives it the apps' interface, the Swift resource
name, whether the attention implementation changes it, whether compression schemes apply to it, its chunks, and
the contract's input/output names, shapes and dtypes; plus the tokenizer files the Swift pipeline reads and how to
read the dimensions the shapes depend on. The manifest, the plan, the converter, verification, the layout and the
card ask the family instead of naming components themselves. `register_family` adds one (a test adds a one-component
family that way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from publisher.contract import PACKAGE_TEMPLATE, ModelDims, ModelSpec, package_name
from publisher.errors import PublisherError, SourceError
from publisher.util.registry import Registry
from publisher.vocabulary import Component, Resolution, controlnet_component, size_of

DEFAULT_FAMILY = "sd"
CONTROLNET_PACKAGE_PREFIX = "ControlNet_"  # Apple's converter: `ControlNet_<org>_<name>.mlpackage`


def controlnet_package(repo: str) -> str:
    """A ControlNet's package as Apple's converter names it (and its Python pipeline opens it): the repo id as
    written, `/` as `_`."""
    return f"{CONTROLNET_PACKAGE_PREFIX}{repo.replace('/', '_')}.mlpackage"


@dataclass(frozen=True)
class ComponentSpec:
    component: Component
    folder: str  # the diffusers subfolder it is loaded from
    resource: str  # Swift resource name (`<resource>.mlmodelc`)
    loader: str  # "module:Class" whose from_pretrained loads the folder
    wrapper: str  # the convert-layer wrapper that gives it the contract's interface (publisher.convert.components)
    uses_attention: bool = False  # the attention implementation changes its graph (else converted once, shared)
    compressible: bool = False  # compression schemes apply to it (Apple's converter leaves the others float16)
    chunks: tuple[tuple[str, str], ...] = ()  # (submodule, resource) of its chunks, in the order the pipeline runs
    # at this many bits per weight or fewer the whole model is under the 1 GB an iOS app loads at once: chunking
    # is refused (SD's 0.86 B-parameter UNet: 6 bits; SDXL's 2.57 B: 3 bits)
    chunk_above_bits: float = 0
    resolution: int | None = None  # the only resolution it exists at (the safety checker: the Swift pipeline's 512)
    # its shapes follow the image size: converted per size of a resolution pack (the UNet, the VAE); the others (the
    # text encoders) are one conversion for every size
    sized: bool = False
    # "": read from the manifest's source; else the extra source (`source.<role>`) it comes from, where its
    # files are fetched into `folder` (SDXL's refiner: the refiner pipeline's `unet/` as `refiner/`)
    source_role: str = ""
    source_folder: str = ""  # its folder in that extra source's repo
    in_checkpoint: bool = True  # a single-file checkpoint of the family holds its weights (not the safety checker)
    optional: bool = False  # built only where a publish entry asks for it (the ControlledUnet), never by default
    same_weights_as: str = ""  # a component whose weights it has (the ControlledUnet: the UNet's), compressed once


@dataclass(frozen=True)
class ModelFamily:
    name: str
    description: str
    components: tuple[ComponentSpec, ...]
    model_spec: Callable[[Component, ModelDims], ModelSpec]
    read_dims: Callable[[Path, int], ModelDims]
    tokenizer_files: tuple[str, ...] = ("vocab.json", "merges.txt")
    swift_pipeline: str = "StableDiffusionPipeline"  # the Swift package's pipeline type that loads the Resources
    # the diffusers pipeline whose single-file and LoRA loaders read a community checkpoint of the family
    diffusers_pipeline: str = "diffusers:StableDiffusionPipeline"
    # what every ControlNet of the family is (component `controlnet`): each ControlNet a manifest lists is one
    # component `controlnet-<org>_<name>` from its own repo (None: the family has no ControlNets)
    controlnet: ComponentSpec | None = None
    # whether `formats: [coreai]` can publish a Core AI bundle of it (publisher.coreai_bundle: SD 1.x/2.x's four
    # components, as Apple's Core AI diffusion pipeline loads them)
    coreai: bool = False

    def component(self, component: Component) -> ComponentSpec:
        for spec in self.components:
            if spec.component == component:
                return spec
        instance = self._controlnet(component)
        if instance is not None:
            return instance
        raise PublisherError(f"family '{self.name}' has no component '{component.value}'")

    def _controlnet(self, component: str) -> ComponentSpec | None:
        """The spec of one ControlNet (`controlnet-<org>_<name>`): compiled as Apple's converter places it,
        `controlnet/<TitleCasedName>.mlmodelc` (each word of `<org>_<name>` split at _ and - title-cased)."""
        prefix = f"{Component.CONTROLNET}-"
        if self.controlnet is None or not component.startswith(prefix) or component == prefix:
            return None
        title = "".join(word.title() for word in re.split("[_-]", component[len(prefix):]))
        return replace(self.controlnet, component=Component(component), resource=f"controlnet/{title}")

    def is_controlnet(self, component: str) -> bool:
        return self._controlnet(component) is not None

    def has(self, component: Component) -> bool:
        """One of the components the family declares (a ControlNet is not: it comes from `controlnets`)."""
        return any(spec.component == component for spec in self.components)

    @property
    def component_names(self) -> tuple[Component, ...]:
        return tuple(spec.component for spec in self.components)

    def ordered(self, components: Iterable[Component]) -> list[Component]:
        """`components` (each one of this family's) in the order the family declares them."""
        names = self.component_names  # ControlNets last, by name
        return sorted(set(components), key=lambda c: (names.index(c), "") if c in names else (len(names), c))

    def submodules(self, component: Component, chunked: bool) -> tuple[str, ...]:
        """Package submodule names as Apple's Python pipeline opens them (chunks when chunked and it has any)."""
        spec = self.component(component)
        return tuple(name for name, _ in spec.chunks) if chunked and spec.chunks else (component.value,)

    @property
    def all_submodules(self) -> tuple[str, ...]:
        return tuple(name for spec in self.components for name in (spec.component.value,
                                                                      *(n for n, _ in spec.chunks)))

    def component_of(self, submodule: str) -> Component:
        for spec in self.components:
            if submodule == spec.component.value or submodule in (n for n, _ in spec.chunks):
                return spec.component
        if self.is_controlnet(submodule):
            return Component(submodule)
        raise PublisherError(f"family '{self.name}' has no submodule '{submodule}'")

    def resource_name(self, submodule: str) -> str:
        for spec in self.components:
            if submodule == spec.component.value:
                return spec.resource
            for name, resource in spec.chunks:
                if submodule == name:
                    return resource
        instance = self._controlnet(submodule)
        if instance is not None:
            return instance.resource
        raise PublisherError(f"family '{self.name}' has no submodule '{submodule}'")

    def compiled_name(self, submodule: str) -> str:
        return f"{self.resource_name(submodule)}.mlmodelc"

    def submodule_of_package(self, name: str, model_version: str) -> str | None:
        """The submodule a package folder name stands for (inverse of contract.package_name, and of a ControlNet's
        `ControlNet_<org>_<name>.mlpackage`), or None."""
        if name.startswith(CONTROLNET_PACKAGE_PREFIX) and name.endswith(".mlpackage"):
            try:
                component = controlnet_component(name[len(CONTROLNET_PACKAGE_PREFIX):-len(".mlpackage")])
            except ValueError:
                return None
            return component if self.is_controlnet(component) else None
        prefix = PACKAGE_TEMPLATE.split("{model_version}")[0]
        stem = name.removeprefix(f"{prefix}{model_version}_").removesuffix(".mlpackage")
        return stem if stem in self.all_submodules and package_name(model_version, stem) == name else None

    def chunk_index(self, submodule: str) -> int | None:
        """0 for a component's first chunk, 1 for its second, ...; None for a whole component."""
        for spec in self.components:
            names = [n for n, _ in spec.chunks]
            if submodule in names:
                return names.index(submodule)
        return None

    def dims(self, source: Path, resolution: Resolution) -> ModelDims:
        """The source's dimensions at an image size (the family reads its configs at the width)."""
        width, height = size_of(resolution)
        dims = self.read_dims(Path(source), width)
        return dims if height == width else replace(dims, height=height)

    def source_folders(self, components: tuple[Component, ...] | list[Component]) -> list[str]:
        return sorted({self.component(c).folder for c in components})


def read_config(source: Path, folder: str, name: str = "config.json") -> dict[str, object] | None:
    path = Path(source) / folder / name
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SourceError(f"{path}: not JSON: {exc}") from exc
    return data if isinstance(data, dict) else None


_REGISTRY: Registry[ModelFamily] = Registry("model family", lambda family: family.name,
                                            ("publisher.families.sd:FAMILY", "publisher.families.sdxl:FAMILY"))
register_family = _REGISTRY.register
unregister_family = _REGISTRY.unregister
families = _REGISTRY.all
family_named = _REGISTRY.named
