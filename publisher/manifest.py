"""Manifest schema and loading: YAML in, a validated `Manifest` out, or one-line errors with file:line.

Every default that the four base-model manifests share lives here, in the models, so that a manifest only
says what differs (source, license, target repos and their variants).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
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
    ValidationError,
    WithJsonSchema,
    WrapValidator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from publisher.compress.scheme import CompressionSettings, precision_json_schema, validate_precision
from publisher.deployment import DeploymentTarget
from publisher.errors import ManifestError
from publisher.vocabulary import Attention, Component, ComputeUnit, Layout, Resolution, resolution_of, size_of

__all__ = ["Attention", "Component", "ComputeUnit", "DeploymentTarget", "Layout", "LoadedManifest", "Manifest",
           "load_manifest", "load_manifests"]

SCHEMA_FILE_NAME = "manifest.schema.json"
# Bounds on what a manifest may make the loader do (a real one is ~1 KB, ~60 nodes, 4 levels deep): a YAML alias
# bomb or a deeply nested document is refused in one line instead of hanging or crashing `validate`.
MAX_MANIFEST_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 32
MANIFEST_SUFFIXES = (".yaml", ".yml")
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
    controlnet: Annotated[
        Annotated[StrictBool, Tag("[bool]")] | Annotated[list[Attention], Tag("[list]")],
        Discriminator(lambda value: "[list]" if isinstance(value, list) else "[bool]"),
    ] = Field(default=False, description="also the ControlNet-ready UNet (Apple's ControlledUnet, package "
              "`..._control-unet.mlpackage`) beside the Unet: true for every attention, or a list of them")

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
        """Which source a component is read from: "" (the manifest's source), "vae" or "refiner"; None when its
        family reads it from an extra source the manifest does not name."""
        from publisher.family import family_named

        spec = family_named(self.family).component(component)
        if spec.source_role:
            return spec.source_role if getattr(self.source, spec.source_role) is not None else None
        if spec.folder == "vae" and self.source.vae is not None:
            return "vae"
        return ""

    def source_of(self, role: str) -> Source | ExtraSource:
        return self.source if not role else getattr(self.source, role)

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


# ---------------------------------------------------------------------------------------------------------
# Rules that span fields; each yields (location, message) so the error names the exact field and line.

Loc = tuple[str | int, ...]


def _duplicates(items: Sequence[Any]) -> Iterable[tuple[int, Any]]:
    seen: set[Any] = set()
    for index, item in enumerate(items):
        if item in seen:
            yield index, item
        seen.add(item)


def _show(value: Any) -> str:
    return value.value if isinstance(value, Enum) else str(value)


def cross_field_errors(manifest: Manifest) -> list[tuple[Loc, str]]:
    from publisher.family import families

    errors: list[tuple[Loc, str]] = []
    known = families()
    if manifest.family not in known:
        return [(("family",), f"must be one of {', '.join(known)}")]
    family = known[manifest.family]
    for index, item in _duplicates(manifest.source.components or []):
        errors.append((("source", "components", index), f"duplicate '{_show(item)}'"))
    errors.extend(_community_source_errors(manifest, family))
    errors.extend(_size_errors(manifest))
    if manifest.source.refiner is not None and not any(spec.source_role == "refiner" for spec in family.components):
        errors.append((("source", "refiner"), f"family '{family.name}' has no refiner"))
    for index, item in enumerate(manifest.source.components or []):
        if not family.has(item):
            errors.append((("source", "components", index), f"'{item.value}' is not a component of family "
                           f"'{family.name}' ({', '.join(c.value for c in family.component_names)})"))
        elif manifest.source_role(item) is None:
            role = family.component(item).source_role
            errors.append((("source", "components", index), f"'{item.value}' is read from source.{role}, "
                           "which is not given"))
    if errors:
        return errors
    repo_first: dict[str, int] = {}
    for i, target in enumerate(manifest.publish):
        at: Loc = ("publish", i)
        if not REPO_TEMPLATE_RE.fullmatch(target.repo):
            errors.append((at + ("repo",), "must be 'namespace/name' (letters, digits, '-', '_', '.'; "
                           "the namespace may be '{namespace}')"))
        key = target.repo.lower()  # the Hub matches repo ids case-insensitively
        if key in repo_first:
            errors.append((at + ("repo",), f"duplicate of publish[{repo_first[key]}].repo"))
        repo_first.setdefault(key, i)
        for field in ("attention", "components", "layouts"):
            for index, item in _duplicates(getattr(target, field) or []):
                errors.append((at + (field, index), f"duplicate '{_show(item)}'"))
        for index, component in enumerate(target.components or []):
            if not family.has(component):
                errors.append((at + ("components", index), f"'{component.value}' is not a component of family "
                               f"'{family.name}' ({', '.join(c.value for c in family.component_names)})"))
            elif component not in manifest.source_components:
                errors.append((at + ("components", index),
                               f"'{component.value}' is not provided by the source (see source.components)"))
            elif family.component(component).resolution not in (None, manifest.default_size):
                only = family.component(component).resolution
                errors.append((at + ("components", index),
                               f"a {component.value.replace('_', ' ')} needs resolution {only} (the Swift pipeline "
                               f"feeds it a {only}x{only} image), not {manifest.default_size}"))
        for attention in target.compute_units:
            if attention not in target.attention:
                errors.append((at + ("compute_units", attention.value),
                               f"'{attention.value}' is not in this repo's attention list"))
        precision = target.precision
        errors.extend((at + loc, message) for loc, message in
                      precision.scheme.problems(precision, target.deployment_target))
        if not isinstance(target.chunk_unet, bool):
            for index, attention in enumerate(target.chunk_unet):
                if attention not in target.attention:
                    errors.append((at + ("chunk_unet", index),
                                   f"'{attention.value}' is not in this repo's attention list"))
            for index, item in _duplicates(target.chunk_unet):
                errors.append((at + ("chunk_unet", index), f"duplicate '{_show(item)}'"))
        if target.chunk_unet:
            chunked = [family.component(c) for c in manifest.components_for(target) if family.component(c).chunks]
            if not chunked:
                errors.append((at + ("chunk_unet",), "needs a component that has chunks (the 'unet')"))
            bits = precision.scheme.weight_bits(precision)
            if chunked and bits <= min(spec.chunk_above_bits for spec in chunked):
                errors.append((at + ("chunk_unet",),
                               f"a {precision.label} UNet is small enough ({bits:g} bits per weight): chunking is "
                               "refused"))
        if target.controlnet:
            if not family.has(Component.CONTROL_UNET):
                errors.append((at + ("controlnet",), f"family '{family.name}' has no ControlNet-ready UNet (Apple's "
                               "Swift package loads ControlNets for SD 1.x/2.x only)"))
            for index, attention in enumerate(target.controlnet if isinstance(target.controlnet, list) else []):
                if attention not in target.attention:
                    errors.append((at + ("controlnet", index),
                                   f"'{attention.value}' is not in this repo's attention list"))
        if Layout.ZIP in target.layouts and Layout.COMPILED not in target.layouts:
            errors.append((at + ("layouts",), "'zip' needs 'compiled' (the zip holds the compiled Resources)"))
    return errors


def _size_errors(manifest: Manifest) -> list[tuple[Loc, str]]:
    """Each size's sides are multiples of 64 from 256 to 2048; no size twice (512 and 512x512 are one)."""
    listed = isinstance(manifest.resolution, list)
    values = manifest.resolution if isinstance(manifest.resolution, list) else [manifest.resolution]
    errors: list[tuple[Loc, str]] = []
    if listed and not 1 <= len(values) <= MAX_SIZES:
        return [(("resolution",), f"lists 1 to {MAX_SIZES} sizes, not {len(values)}")]
    seen: set[tuple[int, int]] = set()
    for index, value in enumerate(values):
        at: Loc = ("resolution", index) if listed else ("resolution",)
        size = size_of(value)
        if any(side % 64 or not 256 <= side <= 2048 for side in size):
            errors.append((at, f"'{value}': each side must be a multiple of 64 from 256 to 2048"))
        elif size in seen:
            errors.append((at, f"'{value}': the size {size[0]}x{size[1]} is listed twice"))
        seen.add(size)
    return errors


def _community_source_errors(manifest: Manifest, family: Any) -> list[tuple[Loc, str]]:
    """The rules of a single-file checkpoint and of LoRAs (`source.file`, `source.config`, `source.loras`)."""
    source = manifest.source
    errors: list[tuple[Loc, str]] = []
    files: list[tuple[Loc, str]] = [(("source", "file"), source.file)] if source.file is not None else []
    files += [(("source", "loras", index, "file"), lora.file) for index, lora in enumerate(source.loras)]
    for loc, name in files:
        if any(part in ("", ".", "..") for part in name.split("/")):
            errors.append((loc, "must be a file path inside the repo (no empty, '.' or '..' part)"))
        elif not name.lower().endswith(CHECKPOINT_SUFFIXES):
            errors.append((loc, f"must be a {' or '.join(CHECKPOINT_SUFFIXES)} file"))
    if source.file is not None:
        if source.config is None:
            errors.append((("source", "file"), "needs source.config: the diffusers repo whose configs and tokenizer "
                           "describe the checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)"))
        if source.weights != "auto":
            errors.append((("source", "weights"), "does not apply to a single-file checkpoint (its weights are "
                           "converted in the file's own precision)"))
        for index, item in enumerate(source.components or []):
            if family.has(item) and not family.component(item).source_role and \
                    not family.component(item).in_checkpoint:
                errors.append((("source", "components", index), f"'{item.value}' is not in a single-file "
                               "checkpoint"))
    elif source.config is not None:
        errors.append((("source", "config"), "applies only with source.file (a single-file checkpoint)"))
    for index, _ in _duplicates([(lora.repo.lower(), lora.file) for lora in source.loras]):
        errors.append((("source", "loras", index), "duplicate LoRA (same repo and file)"))
    return errors


# ---------------------------------------------------------------------------------------------------------
# Loading with line numbers


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(root)"


def _line_of(document: Any, loc: Loc) -> int:
    """1-based line of the deepest node of `loc` that exists in the YAML document."""
    line = 0
    node = document
    for part in loc:
        if isinstance(node, CommentedMap):
            key = _find_key(node, part)
            if key is None:
                break
            line = node.lc.value(key)[0] if not isinstance(node[key], (CommentedMap, CommentedSeq)) \
                else node.lc.key(key)[0]
            node = node[key]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line = node.lc.item(part)[0]
            node = node[part]
        else:
            break
    return line + 1


def _find_key(node: CommentedMap, part: str | int) -> Any:
    if part in node:
        return part
    for key in node:  # keys may be non-strings in YAML (1: x), or enums rendered as strings
        if str(key) == str(part):
            return key
    return None


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", "")).replace(" or ", ", ").replace("'", "")
        return f"must be one of {expected}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch":
        return f"does not match {ctx.get('pattern')}"
    if kind == "value_error" and ctx.get("error") is not None:  # a validator's own message
        return str(ctx["error"])
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def _clean_loc(loc: Sequence[Any]) -> Loc:
    # pydantic appends '[key]' for errors on a dict's keys (reported at the key itself), and a union's tag
    return tuple(part for part in loc if part not in ("[key]", "[bool]", "[list]", "[one]"))


def parse_manifest(text: str, path: Path) -> tuple[Manifest | None, list[str]]:
    """Validate one manifest's text; returns the manifest or the error lines (`file:line: field: message`)."""
    manifest, _, errors = _parse(text, path)
    return manifest, errors


def _parse(text: str, path: Path) -> tuple[Manifest | None, tuple[dict[str, Any], ...], list[str]]:
    """parse_manifest, and the contents of the files each publish entry's precision names (read next to it)."""
    manifest, document, errors = _validate(text, path)
    if manifest is None:
        return None, (), errors
    inputs: list[dict[str, Any]] = []
    problems: list[tuple[Loc, str]] = []
    for index, target in enumerate(manifest.publish):
        read, found = target.precision.scheme.read_inputs(target.precision, path.parent)
        inputs.append(read)
        problems.extend((("publish", index, *loc), message) for loc, message in found)
    if problems:
        return None, (), [_one_line(f"{path}:{_line_of(document, loc)}: {format_loc(loc)}: {msg}")
                          for loc, msg in problems]
    return manifest, tuple(inputs), []


def _validate(text: str, path: Path) -> tuple[Manifest | None, Any, list[str]]:
    name = str(path)
    depth = 0
    for number, char in enumerate(text):  # flow nesting, before the parser recurses into it
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if depth > MAX_DEPTH:
            return None, None, [f"{name}:{text.count(chr(10), 0, number) + 1}: (yaml): nested deeper than {MAX_DEPTH} "
                          "levels"]
    try:
        document = YAML(typ="rt").load(text)
    except RecursionError:
        return None, None, [f"{name}:1: (yaml): nested deeper than this loader follows (a manifest needs {MAX_DEPTH} "
                      "levels at most)"]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = (exc.problem or exc.context or "invalid YAML").strip().replace("\n", " ")
        return None, None, [_one_line(f"{name}:{line}: (yaml): {problem}")]
    except YAMLError as exc:
        return None, None, [_one_line(f"{name}:1: (yaml): {str(exc).splitlines()[0] if str(exc) else 'invalid YAML'}")]
    if document is None:
        return None, None, [f"{name}:1: (root): the manifest is empty"]
    if not isinstance(document, CommentedMap):
        return None, None, [f"{name}:1: (root): must be a mapping of fields, not {type(document).__name__}"]
    try:
        plain = _plain(document, [MAX_NODES], 0)
    except _TooLarge as exc:
        return None, None, [f"{name}:1: (yaml): {exc}"]
    try:
        manifest = Manifest.model_validate(plain)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = _clean_loc(error["loc"])
            lines.append(_one_line(f"{name}:{_line_of(document, loc)}: {format_loc(loc)}: {_message(error)}"))
        return None, None, lines
    errors = cross_field_errors(manifest)
    if errors:
        return None, document, [_one_line(f"{name}:{_line_of(document, loc)}: {format_loc(loc)}: {msg}")
                      for loc, msg in errors]
    return manifest, document, []


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """Control characters (newlines, ANSI escapes) in names or values from the file are shown escaped, so that one
    problem is always one line and a manifest cannot forge output."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


class _TooLarge(Exception):
    pass


def _plain(node: Any, budget: list[int], depth: int) -> Any:
    """ruamel's round-trip nodes -> plain dicts/lists (pydantic's strict mode wants builtin types). Aliases are
    expanded here, so the node budget and the depth bound what an alias bomb can cost."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(f"expands to more than {MAX_NODES} values (YAML aliases?); a manifest is far smaller")
    if depth > MAX_DEPTH:
        raise _TooLarge(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        return {(str(k) if not isinstance(k, (str, int, bool)) else k): _plain(v, budget, depth + 1)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, budget, depth + 1) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


def load_manifest(path: Path) -> LoadedManifest:
    loaded, errors = _load(path)
    if loaded is None:
        raise ManifestError(errors[0], errors)
    return loaded


def _load(path: Path) -> tuple[LoadedManifest | None, list[str]]:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            return None, [f"{path}:1: (file): {size} bytes; a manifest may have {MAX_MANIFEST_BYTES} at most"]
        raw = path.read_bytes()
    except OSError as exc:
        return None, [f"{path}:1: (file): cannot read: {exc.strerror or exc}"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, [f"{path}:{line}: (file): not UTF-8 text (byte {exc.start})"]
    manifest, inputs, errors = _parse(text, path)
    if manifest is None:
        return None, errors
    return LoadedManifest(path=path, manifest=manifest, sha256=hashlib.sha256(raw).hexdigest(),
                          precision_inputs=inputs), []


def manifest_files(paths: Sequence[Path]) -> list[Path]:
    """Expand directories into their manifest files (sorted); files are taken as given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise ManifestError(f"{path}: no such file or directory")
    if not files:
        raise ManifestError(f"no manifest (*.yaml) found in {', '.join(str(p) for p in paths)}")
    return files


def load_manifests(paths: Sequence[Path]) -> list[LoadedManifest]:
    """Load every manifest; all errors of all files are reported together. Two manifests may not
    share a name or a target repo."""
    loaded: list[LoadedManifest] = []
    errors: list[str] = []
    for path in manifest_files(paths):
        item, item_errors = _load(path)
        errors.extend(item_errors)
        if item is not None:
            loaded.append(item)
    names: dict[str, Path] = {}
    repos: dict[str, Path] = {}
    for item in loaded:
        if item.manifest.name in names:
            errors.append(f"{item.path}:1: name: '{item.manifest.name}' is also the name of {names[item.manifest.name]}")
        names.setdefault(item.manifest.name, item.path)
        for i, target in enumerate(item.manifest.publish):
            key = target.repo.lower()
            if key in repos and repos[key] != item.path:
                errors.append(f"{item.path}:1: publish[{i}].repo: '{target.repo}' is also published by {repos[key]}")
            repos.setdefault(key, item.path)
    if errors:
        raise ManifestError(errors[0], errors)
    return loaded


def _hub_repo_id_problem(repo_id: str) -> str | None:
    """huggingface_hub's own repo-id rule (it refuses '--' and '..', a leading or trailing '-' or '.', ...)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def check_namespace(namespace: str) -> str:
    if not NAMESPACE_RE.fullmatch(namespace) or _hub_repo_id_problem(f"{namespace}/x") is not None:
        raise ManifestError(_one_line(f"namespace '{namespace}': must be letters, digits, '-', '_' or '.', without "
                                      "'--' or '..' (a Hub user or org)"))
    return namespace


def _line_in_file(path: Path, loc: Loc) -> int:
    try:
        return _line_of(YAML(typ="rt").load(path.read_text(encoding="utf-8")), loc)
    except Exception:  # the file validated a moment ago; a line number is a courtesy
        return 1


def check_resolved(loaded: Sequence[LoadedManifest], namespace: str) -> None:
    """Rules on repo ids once `{namespace}` is filled in: each must pass huggingface_hub's validation, and no two
    publish entries (in one file or across files) may name the same repo. Raises ManifestError with every line."""
    check_namespace(namespace)
    errors: list[str] = []
    first: dict[str, tuple[Path, int]] = {}
    for item in loaded:
        for i, target in enumerate(item.manifest.publish):
            repo_id = target.repo_id(namespace)
            at = ("publish", i, "repo")
            problem = _hub_repo_id_problem(repo_id)
            if problem is not None:
                errors.append(_one_line(f"{item.path}:{_line_in_file(item.path, at)}: {format_loc(at)}: "
                                        f"'{repo_id}' is not a valid Hub repo id: {problem}"))
            key = repo_id.lower()  # the Hub matches repo ids case-insensitively
            if key in first:
                other, index = first[key]
                where = f"publish[{index}]" + ("" if other == item.path else f" of {other}")
                errors.append(_one_line(f"{item.path}:{_line_in_file(item.path, at)}: {format_loc(at)}: "
                                        f"'{repo_id}' is also published by {where}"))
            first.setdefault(key, (item.path, i))
    if errors:
        raise ManifestError(errors[0], errors)


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    # `precision` is one branch per registered compression scheme, whatever the Python type says
    branches = precision_json_schema()["oneOf"]
    for branch in branches:
        for name, definition in branch.pop("$defs", {}).items():
            schema.setdefault("$defs", {})[name] = definition
    schema["$defs"]["PublishRepo"]["properties"]["precision"] = {"oneOf": branches}
    schema["$defs"].pop("CompressionSettings", None)
    from publisher.family import families

    schema["properties"]["family"]["enum"] = list(families())
    # component names are the families' own (a plug-in family adds its names): the registered ones, for editors
    names = list(dict.fromkeys(c.value for family in families().values() for c in family.component_names))

    def mark(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop("x-component", False):
                node.pop("pattern", None)
                node["enum"] = names
            for value in node.values():
                mark(value)
        elif isinstance(node, list):
            for value in node:
                mark(value)

    mark(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "coreml-publisher manifest"
    return schema
