"""A variant: one (repo, attention, size) folder of a published repo, as the plan expands it from a manifest; or a
repo's Core AI bundle (`coreai/`, format coreai: one per repo, at the default size, whatever the attention)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from publisher.compress.scheme import CompressionSettings
from publisher.contract import package_name, zip_file_name
from publisher.coreai_bundle import FOLDER as COREAI_FOLDER
from publisher.coreai_bundle import CoreAICompression
from publisher.deployment import DeploymentTarget
from publisher.family import ModelFamily, controlnet_package, family_named
from publisher.util.hashing import json_sha256
from publisher.vocabulary import Attention, Component, ComputeUnit, Format, Layout, Resolution, size_label


@dataclass(frozen=True)
class ExtraSourceRef:
    """A repo some of a variant's components are read from besides the manifest's source (`source.<role>`)."""

    role: str  # "vae" | "refiner"
    repo: str
    revision: str
    weights: str = "auto"

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision}" + ("" if self.weights == "auto" else f"#{self.weights}")


@dataclass(frozen=True)
class Variant:
    """One (repo, attention, size) folder of a published repo: `<attention>` at the manifest's default size, a
    resolution pack `<attention>_<W>x<H>` at each further one."""

    manifest_name: str
    manifest_path: str
    repo_id: str
    attention: Attention
    precision: CompressionSettings
    components: tuple[Component, ...]
    compute_unit: ComputeUnit
    deployment_target: DeploymentTarget
    chunk_unet: bool
    layouts: tuple[Layout, ...]
    source_repo: str
    source_revision: str
    resolution: Resolution  # this folder's image size
    source_weights: str = "auto"
    license: str = "other"
    family: str = "sd"
    # the contents of the files `precision` names (a recipe), read with the manifest
    precision_inputs: dict[str, Any] = field(default_factory=dict, hash=False)
    extra_sources: tuple[ExtraSourceRef, ...] = ()
    roles: tuple[tuple[Component, str], ...] = ()  # the components read from an extra source, and its role
    # a community source: one checkpoint file of `source_repo`, described by the diffusers repo `source_config`
    # (repo, revision); LoRAs fused before conversion, each (repo, file, revision, scale)
    source_file: str = ""
    source_config: tuple[str, str] = ("", "")
    source_loras: tuple[tuple[str, str, str, float], ...] = ()
    # the manifest's default size (None: this folder's): a resolution pack shares the conversions no size changes
    # (the text encoders) and the source's analysis with the default size's folder
    default_size: Resolution | None = None
    # the end-to-end check (publisher.evaluate): whether the manifest wants it, and its settings where they are not
    # the defaults ((name, value) pairs: floor_db, margin_db, steps)
    evaluate: bool = True
    evaluate_settings: tuple[tuple[str, Any], ...] = ()
    # what it ships: Core ML packages, or (format coreai) a Core AI bundle with this compression
    format: Format = Format.COREML
    coreai_compression: CoreAICompression = field(default_factory=CoreAICompression)
    # where the workflow runs it (not part of what it is: absent from to_json)
    convert_runner: str = "ubuntu-24.04"
    compile_runner: str = "macos-14"
    coreai_runner: str = ""  # the optional macOS 27 job that checks Core AI bundles ("": none)

    @property
    def model_family(self) -> ModelFamily:
        return family_named(self.family)

    def role_of(self, component: Component) -> str:
        """"" for a component read from the manifest's source, else the role of its extra source."""
        return dict(self.roles).get(component, "")

    def extra_source(self, role: str) -> ExtraSourceRef:
        return next(ref for ref in self.extra_sources if ref.role == role)

    def uses_attention(self, component: Component) -> bool:
        return self.model_family.component(component).uses_attention

    def compresses(self, component: Component) -> bool:
        """The variant's compression scheme rewrites this component (the family says which may be)."""
        return self.model_family.component(component).compressible and self.precision.scheme.compresses(
            self.precision, component.value)

    def package_file(self, submodule: str) -> str:
        """A package's folder name as Apple's converter writes it and its Python pipeline opens it: after the
        source repo (`Stable_Diffusion_version_<org>_<name>_<submodule>.mlpackage`), a ControlNet's after its own
        repo as the manifest writes it (`ControlNet_<org>_<name>.mlpackage`)."""
        if self.model_family.is_controlnet(submodule):
            return controlnet_package(self.extra_source(submodule).repo)
        return package_name(self.source_repo.replace("/", "_"), submodule)

    @property
    def base_size(self) -> Resolution:
        return self.resolution if self.default_size is None else self.default_size

    @property
    def coreai(self) -> bool:
        return self.format is Format.COREAI

    @property
    def folder(self) -> str:
        """`original`, or `original_512x768` for a resolution pack; `coreai` for a Core AI bundle."""
        if self.coreai:
            return COREAI_FOLDER
        suffix = "" if self.resolution == self.base_size else f"_{size_label(self.resolution)}"
        return self.attention.folder + suffix

    def size_of_component(self, component: Component) -> Resolution:
        """The size a component is converted at: this folder's when its shapes follow the image size, else the
        default size's (one conversion shared by every pack)."""
        return self.resolution if self.model_family.component(component).sized else self.base_size

    @property
    def id(self) -> str:
        return f"{self.repo_id}/{self.folder}"

    @property
    def repo_name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    @property
    def zip_name(self) -> str:
        return zip_file_name(self.repo_name, self.folder)

    def to_json(self) -> dict[str, Any]:
        """Everything that defines this variant (not where its manifest file happens to lie)."""
        return {
            "id": self.id,
            "manifest": self.manifest_name,
            "repo": self.repo_id,
            "attention": self.attention.value,
            "folder": self.folder,
            "precision": self.precision.model_dump(mode="json", exclude_none=True),
            "precision_label": self.precision.label,
            # only when there are any (a recipe file's contents): variant hashes without them stay what they were
            **({"precision_inputs_sha256": json_sha256(self.precision_inputs)} if self.precision_inputs else {}),
            "components": [c.value for c in self.components],
            "compute_unit": self.compute_unit.value,
            "minimum_deployment_target": self.deployment_target.value,
            "chunk_unet": self.chunk_unet,
            "layouts": [layout.value for layout in self.layouts],
            "source": {"repo": self.source_repo, "revision": self.source_revision,
                       **({"weights": self.source_weights} if self.source_weights != "auto" else {}),
                       # only when given: the variant hash of a diffusers-format source stays what it was
                       **({"file": self.source_file, "config": {"repo": self.source_config[0],
                                                                "revision": self.source_config[1]}}
                          if self.source_file else {}),
                       **({"loras": [{"repo": r, "file": f, "revision": v, "scale": s}
                                     for r, f, v, s in self.source_loras]} if self.source_loras else {})},
            "resolution": self.resolution,
            # only for a resolution pack: a default-size folder's variant hash stays what it was
            **({"default_size": self.base_size} if self.resolution != self.base_size else {}),
            "license": self.license,
            "family": self.family,
            # only when not the default: the variant hash of a variant with the default check stays what it was
            **({"evaluate": dict(self.evaluate_settings) if self.evaluate else False}
               if not self.evaluate or self.evaluate_settings else {}),
            **({"format": self.format.value, "coreai_compression": self.coreai_compression.label}
               if self.coreai else {}),
            # only when there are any: the variant hash of a variant without extra sources stays what it was
            **({"extra_sources": {ref.role: {"repo": ref.repo, "revision": ref.revision, "weights": ref.weights}
                                  for ref in self.extra_sources}} if self.extra_sources else {}),
        }
