"""The compression-scheme plug-in point: what a scheme declares, and the registry the manifest, the plan, the engine,
verification and the card look schemes up in.

A scheme is one module: its manifest settings (a pydantic model whose `type` names the scheme), the rules on them,
the minimum deployment target they need, how it rewrites a float16 package, the weights a rewritten package decodes
to (verification loads them into the PyTorch model) and the figures its report gives the card. `float16` (no
compression) and `palettize` are built in; `register_scheme` adds one (a test adds an identity scheme that way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from publisher.deployment import DeploymentTarget
from publisher.util.registry import Registry

REPORT = "compression.json"  # a compress step's report, next to its package


class CompressionSettings(BaseModel):
    """A manifest's `precision:` mapping; each scheme subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    type: str

    @property
    def scheme(self) -> CompressionScheme:
        return scheme_named(self.type)

    @property
    def label(self) -> str:
        return self.scheme.label(self)


@dataclass(frozen=True, kw_only=True)
class CompressContext:
    """What a compress step knows besides the scheme's settings."""

    deployment_target: DeploymentTarget
    component: str
    # what the files the settings name held when the manifest was loaded (`CompressionScheme.read_inputs`): part
    # of the step's parameters, so its store key follows their contents; the step never reads the files again
    inputs: Mapping[str, Any] = field(default_factory=dict)
    analysis: Path | None = None  # the output folder of the step's analysis step, when the scheme asked for one
    progress: bool = True


@dataclass(frozen=True)
class AnalysisRequest:
    """A scheme asks the plan for an analysis of one component's source weights before it compresses it
    (mixed-bit palettization: per-layer sensitivities); `params` key the analysis in the store."""

    component: str
    params: dict[str, Any] = field(default_factory=dict)


Loc = tuple[str | int, ...]


class CompressionScheme(ABC):
    name: ClassVar[str]
    settings_model: ClassVar[type[CompressionSettings]]

    # -- declared by the settings (manifest and plan; nothing runs) -----------------------------------------

    def compresses(self, settings: CompressionSettings, component: str) -> bool:
        """Whether the step rewrites this component's package (the family says which components may be)."""
        return True

    @abstractmethod
    def label(self, settings: CompressionSettings) -> str:
        """Short text for tables and the card (`6-bit`, `float16`)."""

    def minimum_target(self, settings: CompressionSettings) -> DeploymentTarget:
        """The oldest OS that runs the rewritten packages (the default target of a variant)."""
        return DeploymentTarget.iOS16

    def weight_bits(self, settings: CompressionSettings) -> float:
        """Bits per compressed weight (at most: a target of a mixed recipe); decides whether chunking pays."""
        return 16.0

    def problems(self, settings: CompressionSettings, target: DeploymentTarget) -> list[tuple[Loc, str]]:
        """Rules across the settings' fields and the variant's deployment target: (location in the publish entry,
        e.g. `("precision", "nbits")`, message)."""
        return []

    def own_conversion(self, settings: CompressionSettings) -> bool:
        """True when the float16 package must be converted at the variant's own target (it cannot reuse a
        conversion made for an older target)."""
        return False

    def analysis(self, settings: CompressionSettings, component: str, inputs: Mapping[str, Any] | None = None
                 ) -> AnalysisRequest | None:
        """An analysis of the source this component's compression needs first (None: none); `inputs` are the
        contents `read_inputs` read."""
        return None

    def read_inputs(self, settings: CompressionSettings, manifest_folder: Path
                    ) -> tuple[dict[str, Any], list[tuple[Loc, str]]]:
        """The contents of the files the settings name (a recipe), read and checked once when the manifest is
        loaded: (JSON-able contents, problems at their location in the publish entry). The contents become the
        compress step's parameters (`CompressContext.inputs`): two repos share a step only when they are equal."""
        return {}, []

    # -- running (the engine's compress step; verification; the card) --------------------------------------

    @abstractmethod
    def apply(self, source: Path, output: Path, settings: CompressionSettings, context: CompressContext
              ) -> dict[str, Any]:
        """Write the compressed copy of the float16 package `source` to `output`; return the report (JSON)."""

    def decoded_weights(self, package: Path) -> Mapping[str, np.ndarray]:
        """Op name -> the dense weight a compressed package decodes to (verification runs PyTorch on them; it
        iterates `items()` once, so a scheme may decode lazily). Empty: not this scheme's package."""
        return {}

    def figures(self, report: dict[str, Any]) -> dict[str, Any]:
        """What build-info and the card show of a report: `bits`, `compressed_ops`, `min_snr_db`, `mean_snr_db`,
        and whatever else the scheme wants on record."""
        return {}


_REGISTRY: Registry[CompressionScheme] = Registry(
    "compression scheme", lambda scheme: scheme.name,
    ("publisher.compress.float16:SCHEME", "publisher.compress.palettize_scheme:SCHEME"))
register_scheme = _REGISTRY.register
unregister_scheme = _REGISTRY.unregister
schemes = _REGISTRY.all
scheme_named = _REGISTRY.named


def validate_precision(raw: Any, handler: Callable[[Any], Any]) -> CompressionSettings:
    """pydantic wrap validator of `precision:`: the mapping is validated by the model of the scheme its `type`
    names, so errors point into it (`precision.nbits: ...`). A field that belongs to another scheme is named so."""
    if isinstance(raw, CompressionSettings):
        return raw
    if not isinstance(raw, dict):
        raise PydanticCustomError("precision_type", "must be a mapping with a 'type' ({types})",
                                  {"types": ", ".join(schemes())})
    known = schemes()
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in known:  # a mapping or a list is no name (and not hashable)
        details: list[InitErrorDetails] = [{
            "type": PydanticCustomError("literal_error", "must be one of {expected}",
                                        {"expected": ", ".join(known)}),
            "loc": ("type",), "input": kind}] if "type" in raw else [
            {"type": "missing", "loc": ("type",), "input": raw}]
        raise ValidationError.from_exception_data("precision", details)
    model = known[kind].settings_model
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        owned = [[name for name, other in known.items() if name != kind and error["loc"]
                  and error["loc"][0] in other.settings_model.model_fields] if error["type"] == "extra_forbidden"
                 else [] for error in errors]
        if not any(owned):
            raise
        refined: list[InitErrorDetails] = []
        for error, owners in zip(errors, owned, strict=True):
            if owners:
                refined.append({"type": PydanticCustomError("scheme_field", "only allowed when type is {owners}",
                                                            {"owners": " or ".join(f"'{o}'" for o in owners)}),
                                "loc": tuple(error["loc"]), "input": error["input"]})
            else:
                refined.append({"type": error["type"], "loc": tuple(error["loc"]), "input": error["input"],
                                # pydantic's ErrorDetails and InitErrorDetails share `ctx`; its stub says otherwise
                                **({"ctx": error["ctx"]} if "ctx" in error else {})})  # type: ignore[typeddict-item]
        raise ValidationError.from_exception_data("precision", refined) from None


def precision_json_schema() -> dict[str, Any]:
    """One JSON Schema branch per registered scheme (for editors)."""
    return {"oneOf": [scheme.settings_model.model_json_schema() for scheme in schemes().values()]}
