"""The manifest's schema: the pydantic models a manifest validates into, and the defaults the base-model manifests
share (a manifest only says what differs). Loading with line numbers is publisher.manifest; the rules that span
fields are publisher.manifest_rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Strict,
    Tag,
    WithJsonSchema,
    WrapValidator,
)

from publisher.compress.scheme import CompressionSettings, validate_precision
from publisher.deployment import DeploymentTarget
from publisher.vocabulary import (
    Attention,
    Component,
    ComputeUnit,
    Format,
    Layout,
    Resolution,
    resolution_of,
    size_of,
)

# An org or user name, or the run-time placeholder; then a repo name. Hub names: letters, digits, - _ .
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_RE = re.compile(rf"{_NAME}/{_NAME}")
REPO_TEMPLATE_RE = re.compile(rf"(?:\{{namespace\}}|{_NAME})/{_NAME}")
NAMESPACE_RE = re.compile(_NAME)
SLUG_RE = r"^[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?$"


DEFAULT_FAMILY = "sd"


StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictStr = Annotated[str, Strict()]


MIN_SIDE, MAX_SIDE, SIDE_STEP = 256, 2048, 64
MAX_SIZES = 8


def _size_value(value: Any) -> int | str:
    """An image size as a manifest writes it: an int (a square's side) or `WIDTHxHEIGHT`; each side a multiple of
    64 from 256 to 2048."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < MIN_SIDE:
            raise ValueError(f"input should be greater than or equal to {MIN_SIDE}")
        if value > MAX_SIDE:
            raise ValueError(f"input should be less than or equal to {MAX_SIDE}")
        if value % SIDE_STEP:
            raise ValueError(f"input should be a multiple of {SIDE_STEP}")
        return value
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{2,3}x[1-9][0-9]{2,3}", value):
        return value  # its sides are checked with the other fields (the error names the list item)
    raise ValueError("must be a square's side (512) or WIDTHxHEIGHT (512x768)")


SizeValue = Annotated[Any, PlainValidator(_size_value), WithJsonSchema({"oneOf": [
    {"type": "integer", "minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": SIDE_STEP},
    {"type": "string", "pattern": r"^[1-9][0-9]{2,3}x[1-9][0-9]{2,3}$"}]})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


# `precision:` is validated by the model of the compression scheme its `type` names (publisher.compress.scheme)
Precision = Annotated[CompressionSettings, WrapValidator(validate_precision)]


class ExtraSource(_Model):
    """Another repo some components are read from (a custom VAE, SDXL's refiner)."""

    repo: Annotated[StrictStr, Field(pattern=f"^{REPO_ID_RE.pattern}$", description="repo id, `org/name`")]
    revision: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")] = "main"
    weights: Literal["auto", "fp16", "fp32"] = "auto"


MAX_CONTROLNETS = 8


# a file inside a repo (single-file checkpoints, LoRAs): relative, no backslash; `.`/`..` segments are refused by
# the cross-field rules (the schema's regex engine has no look-ahead)
REPO_FILE_RE = r"^[A-Za-z0-9_][A-Za-z0-9._ +()/-]{0,254}$"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
MAX_LORAS = 16


class ConfigSource(_Model):
    """The diffusers-format repo whose configs and tokenizer describe a single-file checkpoint's architecture."""

    repo: Annotated[StrictStr, Field(pattern=f"^{REPO_ID_RE.pattern}$", description="repo id, `org/name`")]
    revision: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")] = "main"


class LoraSource(_Model):
    """A LoRA fused into the UNet and text encoder(s) before conversion (diffusers' and kohya's formats)."""

    repo: Annotated[StrictStr, Field(pattern=f"^{REPO_ID_RE.pattern}$", description="repo id, `org/name`")]
    file: Annotated[StrictStr, Field(pattern=REPO_FILE_RE, description="the LoRA's weights file in the repo")]
    revision: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")] = "main"
    scale: Annotated[float, Strict(), Field(ge=-8, le=8, allow_inf_nan=False)] = 1.0


class Source(_Model):
    repo: Annotated[StrictStr, Field(pattern=f"^{REPO_ID_RE.pattern}$", description="diffusers repo id, `org/name`")]
    revision: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")] = "main"
    file: Annotated[StrictStr, Field(pattern=REPO_FILE_RE)] | None = Field(
        default=None, description="a single-file checkpoint in `repo` (original LDM key layout, .safetensors; a "
        ".ckpt pickle only if it loads with torch.load(weights_only=True)); needs `config`"
    )
    config: ConfigSource | None = Field(
        default=None, description="with `file`: the diffusers-format repo whose model_index.json, configs and "
        "tokenizer describe the checkpoint (its weights are never downloaded)"
    )
    loras: list[LoraSource] = Field(default_factory=list, max_length=MAX_LORAS, description="LoRAs fused into "
                                    "the UNet and text encoder(s), in this order, each at its scale")
    vae: ExtraSource | None = Field(
        default=None, description="a custom VAE for the VAE components (any family): a pipeline repo's `vae/` or a "
        "VAE repo with its config.json at the root, e.g. madebyollin/sdxl-vae-fp16-fix"
    )
    refiner: ExtraSource | None = Field(
        default=None, description="SDXL: the refiner pipeline whose `unet/` becomes the `refiner` component "
        "(UnetRefiner), e.g. stabilityai/stable-diffusion-xl-refiner-1.0"
    )
    components: list[Component] | None = Field(
        default=None, min_length=1, description="what the source provides (default: every component of its family)"
    )
    weights: Literal["auto", "fp16", "fp32"] = Field(
        default="auto", description="which weight copy to download: auto prefers fp16 safetensors, then float32 "
        "safetensors, then .bin"
    )

    @property
    def model_version(self) -> str:
        """The `--model-version` Apple's Python pipeline derives package names from (`/` -> `_`)."""
        return self.repo.replace("/", "_")


class EvaluateOptions(_Model):
    """The end-to-end check's settings (publisher.evaluate): its gate's floor and margin, its denoising steps."""

    floor_db: Annotated[float, Strict(), Field(ge=0, le=200, allow_inf_nan=False, description="end-to-end image "
                        "PSNR (dB, against diffusers' float32 pipeline) a variant needs to be published (default: "
                        "30 for float16, 15 for a compressed variant)")] | None = None
    margin_db: Annotated[float, Strict(), Field(ge=0, le=100, allow_inf_nan=False, description="how far under the "
                         "published revision's figure a rebuild may fall")] = 1.0
    steps: Annotated[int, Strict(), Field(ge=1, le=100, description="denoising steps per prompt")] = 10


class PublishRepo(_Model):
    repo: Annotated[
        StrictStr,
        Field(description="`org/name`, where org may be `{namespace}`, given at run time", max_length=200),
    ]
    precision: Precision
    attention: list[Attention] = Field(min_length=1)
    compute_units: dict[Attention, ComputeUnit] = Field(
        default_factory=dict, description="overrides of ORIGINAL -> CPU_AND_GPU, SPLIT_EINSUM* -> ALL"
    )
    minimum_deployment_target: DeploymentTarget | None = Field(
        default=None, description="default: what the compression needs (iOS16 for float16, iOS17 for palettized, "
        "iOS18 for grouped channels)"
    )
    components: list[Component] | None = Field(
        default=None, min_length=1, description="default: the source's (the safety checker only at resolution 512)"
    )
    chunk_unet: Annotated[
        Annotated[StrictBool, Tag("[bool]")] | Annotated[list[Attention], Tag("[list]")],
        Discriminator(lambda value: "[list]" if isinstance(value, list) else "[bool]"),
    ] = Field(default=False, description="UNet in two chunks (for iOS): true for every attention, or a list of them")
    layouts: list[Layout] = Field(default_factory=lambda: list(Layout), min_length=1)
    evaluate: Annotated[
        Annotated[StrictBool, Tag("[bool]")] | Annotated[EvaluateOptions, Tag("[options]")],
        Discriminator(lambda value: "[bool]" if isinstance(value, bool) else "[options]"),
    ] = Field(default=True, description="the end-to-end check (seeded prompts through the packages against "
              "diffusers' float32 pipeline; figures, a sample image and the publish gate): true (run where it is "
              "cheap: tiny models on Linux, any model on macOS; `publisher build --evaluate on` forces it), false, "
              "or its settings")
    controlnet: Annotated[
        Annotated[StrictBool, Tag("[bool]")] | Annotated[list[Attention], Tag("[list]")],
        Discriminator(lambda value: "[list]" if isinstance(value, list) else "[bool]"),
    ] = Field(default=False, description="also the ControlNet-ready UNet (Apple's ControlledUnet, package "
              "`..._control-unet.mlpackage`) beside the Unet, and the manifest's `controlnets` "
              "(`ControlNet_<org>_<name>.mlpackage`, compiled `controlnet/<Name>.mlmodelc`): true for every "
              "attention, or a list of them")

    formats: list[Format] = Field(default_factory=lambda: [Format.COREML], min_length=1, max_length=2,
                                  description="coreml: the Core ML variants (one folder per attention); coreai: also a "
                                  "Core AI bundle for iOS/macOS 27 in `coreai/` (SD 1.x/2.x, the default size, "
                                  "float16 or the entry's uniform palettization unless coreai_compression says int4)")
    coreai_compression: Literal["precision", "int4"] = Field(
        default="precision", description="the Core AI bundle's text encoder and UNet weights: as the entry's precision "
        "(float16, or palettized at its nbits), or int4 (Apple's INT4 preset, per block of 32)")

    def controls(self, attention: Attention) -> bool:
        """Whether this attention's folder also gets the ControlledUnet."""
        return self.controlnet if isinstance(self.controlnet, bool) else attention in self.controlnet

    @property
    def deployment_target(self) -> DeploymentTarget:
        if self.minimum_deployment_target is not None:
            return self.minimum_deployment_target
        return self.precision.scheme.minimum_target(self.precision)

    def chunks_unet(self, attention: Attention) -> bool:
        if isinstance(self.chunk_unet, bool):
            return self.chunk_unet
        return attention in self.chunk_unet

    def compute_unit(self, attention: Attention) -> ComputeUnit:
        return self.compute_units.get(attention, attention.default_compute_unit)

    def repo_id(self, namespace: str) -> str:
        return self.repo.replace("{namespace}", namespace)


RUNNER_LABEL = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Runners(_Model):
    """Where the scheduled workflow runs this model's jobs (GitHub Actions runner labels)."""

    convert: Annotated[StrictStr, Field(pattern=RUNNER_LABEL, description="Linux job: fetch, convert, compress, "
                                         "verify (ubuntu-24.04 has 16 GiB)")] = "ubuntu-24.04"
    compile: Annotated[StrictStr, Field(pattern=RUNNER_LABEL, description="macOS job: compile, Core ML check")] \
        = "macos-14"
    coreai_check: Annotated[StrictStr | None, Field(pattern=RUNNER_LABEL, description="optional macOS 27 job: each "
                            "Core AI bundle loaded through the OS framework and held to its stored PyTorch outputs "
                            "(`publisher verify --runtime coreai`) before anything is published; none by "
                            "default")] = None


class Manifest(_Model):
    name: Annotated[StrictStr, Field(pattern=SLUG_RE, description="short id of the base model, e.g. sd-v1-5")]
    family: Annotated[StrictStr, Field(max_length=64, description="model family (publisher.family): what its "
                                       "components are and how the apps use them")] = DEFAULT_FAMILY
    description: Annotated[StrictStr, Field(max_length=500)] | None = None
    source: Source
    license: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9.+-]{0,63}$", description="Hub license id")]
    resolution: Annotated[
        Annotated[SizeValue, Tag("[one]")] | Annotated[list[SizeValue], Tag("[list]")],
        Discriminator(lambda value: "[list]" if isinstance(value, list) else "[one]"),
    ] = Field(default=512, description="the image size: a square side (512), `WIDTHxHEIGHT` (`512x768`), or a list of "
              "them: the first is each variant's default size, each further one a resolution pack (`<attention>_WxH`"
              " folders beside the default's); sides are multiples of 64 from 256 to 2048")
    publish: list[PublishRepo] = Field(min_length=1)
    controlnets: list[ExtraSource] = Field(
        default_factory=list, max_length=MAX_CONTROLNETS, description="ControlNet models (diffusers ControlNetModel "
        "repos trained for this base, e.g. lllyasviel/sd-controlnet-canny), converted for the publish entries that "
        "ask for `controlnet`, per attention, size and precision")
    runners: Runners = Field(default_factory=Runners, description="runner labels of the scheduled workflow's jobs "
                             "(a larger runner where a model does not fit the default's memory)")

    @property
    def sizes(self) -> list[Resolution]:
        """The image sizes, the default first (canonical: an int when square)."""
        values = self.resolution if isinstance(self.resolution, list) else [self.resolution]
        return [resolution_of(*size_of(value)) for value in values]

    @property
    def default_size(self) -> Resolution:
        return self.sizes[0]

    @property
    def source_components(self) -> list[Component]:
        from publisher.family import family_named

        if self.source.components is not None:
            return list(self.source.components)
        family = family_named(self.family)  # a component read from an extra source is there when that source is
        return [c for c in family.component_names if self.source_role(c) is not None
                and not family.component(c).optional  # asked for by a publish entry (the ControlledUnet)
                and (self.source.file is None or self.source_role(c) or family.component(c).in_checkpoint)]

    def source_role(self, component: Component) -> str | None:
        """Which source a component is read from: "" (the manifest's source), "vae" or "refiner", a ControlNet's
        own name; None when its family reads it from an extra source the manifest does not name."""
        from publisher.family import family_named

        family = family_named(self.family)
        spec = family.component(component)
        if family.is_controlnet(component):
            return component.value if component in self.controlnet_components else None
        if spec.source_role:
            return spec.source_role if getattr(self.source, spec.source_role) is not None else None
        if spec.folder == "vae" and self.source.vae is not None:
            return "vae"
        return ""

    def source_of(self, role: str) -> Source | ExtraSource:
        if role in self.controlnet_components:
            return self.controlnets[self.controlnet_components.index(Component(role))]
        return self.source if not role else getattr(self.source, role)

    @property
    def controlnet_components(self) -> list[Component]:
        """Each listed ControlNet's component (`controlnet-<org>_<name>`), in the manifest's order."""
        from publisher.vocabulary import controlnet_component

        return [controlnet_component(c.repo) for c in self.controlnets]

    def components_for(self, target: PublishRepo, size: Resolution | None = None) -> list[Component]:
        """The target's components at an image size (default: the default size); by default the source's, less
        those that exist at another size only (the safety checker of a pack at another size is left out)."""
        from publisher.family import family_named

        size = self.default_size if size is None else size
        family = family_named(self.family)
        if target.components is not None:
            chosen = list(target.components)
            return chosen if size == self.default_size else \
                [c for c in chosen if family.component(c).resolution in (None, size)]
        return [c for c in self.source_components if family.component(c).resolution in (None, size)]


@dataclass(frozen=True)
class LoadedManifest:
    path: Path
    manifest: Manifest
    sha256: str
    # per `publish` entry: the contents of the files its precision names (a recipe), read once here and checked;
    # the plan keys the compress steps by them
    precision_inputs: tuple[dict[str, Any], ...] = ()

    def inputs_of(self, index: int) -> dict[str, Any]:
        return self.precision_inputs[index] if index < len(self.precision_inputs) else {}
