"""The manifest rules that span fields; each yields (location, message) so the error names the exact field and line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

from publisher.manifest_schema import (
    CHECKPOINT_SUFFIXES,
    MAX_SIZES,
    REPO_TEMPLATE_RE,
    Manifest,
)
from publisher.vocabulary import Component, Format, Layout, size_of

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
    errors.extend(_controlnet_errors(manifest, family))
    errors.extend(_coreai_errors(manifest, family))
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


def _controlnet_errors(manifest: Manifest, family: Any) -> list[tuple[Loc, str]]:
    """`controlnets`: a family that has them, each once (repo ids are case-insensitive), asked for by a publish
    entry."""
    if not manifest.controlnets:
        return []
    if family.controlnet is None:
        return [(("controlnets",), f"family '{family.name}' has no ControlNets (Apple's Swift package loads "
                 "ControlNets for SD 1.x/2.x only)")]
    errors: list[tuple[Loc, str]] = []
    # Apple's Resources name each by its repo, title-cased without separators: two repos may not share one
    resources = [family.component(c).resource for c in manifest.controlnet_components]
    for index, resource in _duplicates(resources):
        errors.append((("controlnets", index, "repo"), f"'{manifest.controlnets[index].repo}' is compiled to "
                       f"{resource}.mlmodelc, as an earlier ControlNet is"))
    if not any(target.controlnet for target in manifest.publish):
        errors.append((("controlnets",), "no publish entry asks for them (set `controlnet: true` or a list of "
                       "attentions on one)"))
    return errors


def _coreai_errors(manifest: Manifest, family: Any) -> list[tuple[Loc, str]]:
    """`formats: [..., coreai]`: a family with Core AI assets, a square default size (the Swift pipeline's image
    size is one number), the components its loader needs, a compression Core AI has; each format once."""
    from publisher.coreai_bundle import ASSETS, REQUIRED, compression_for

    errors: list[tuple[Loc, str]] = []
    for i, target in enumerate(manifest.publish):
        at: Loc = ("publish", i, "formats")
        for index, item in _duplicates(target.formats):
            errors.append((at + (index,), f"duplicate '{_show(item)}'"))
        if Format.COREAI not in target.formats:
            if target.coreai_compression != "precision":
                errors.append((("publish", i, "coreai_compression"), "only with `formats: [..., coreai]`"))
            continue
        if not family.coreai:
            errors.append((at, f"family '{family.name}' has no Core AI bundle (Apple's Core AI diffusion pipeline "
                           "loads SD 1.x/2.x)"))
            continue
        width, height = size_of(manifest.default_size)
        if width != height:
            errors.append((at, f"a Core AI bundle is square (the Swift pipeline's image size is one number), not the "
                           f"default size {width}x{height}"))
        chosen = manifest.components_for(target)
        missing = [c.value for c in REQUIRED if c not in chosen]
        if missing:
            errors.append((at, f"a Core AI bundle needs {', '.join(missing)} among the components "
                           f"({', '.join(c.value for c in ASSETS)})"))
        compression = compression_for(target.precision, target.coreai_compression)
        if isinstance(compression, str):
            errors.append((("publish", i, "precision"), compression))
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
