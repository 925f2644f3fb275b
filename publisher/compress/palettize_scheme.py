"""`precision: {type: palettize, ...}`: k-means palettization, uniform (`nbits`), from a recipe file, or mixed-bit
(`mixed_bit: {target_bits | target_psnr_db}`: per-layer bit-widths from the build's own sensitivity analysis)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict

from publisher.compress.palettize import Granularity
from publisher.compress.scheme import AnalysisRequest, CompressContext, CompressionScheme, CompressionSettings, Loc
from publisher.deployment import DeploymentTarget
from publisher.errors import PublisherError

ANALYSIS = "analysis.json"  # the analysis step's result (publisher.compress.sensitivity writes it)
# The UNet is what mixed-bit recipes are for (Apple's pre-analysis covers the UNet alone).
MIXED_BIT_COMPONENT = "unet"
CANDIDATE_BITS = (1, 2, 4, 6, 8)
FLOAT16_BITS = 16  # in a recipe: the layer stays float16


class AppleRecipe(BaseModel):
    """One recipe of a file in the layout of Apple's `mixed_bit_compression_pre_analysis.py` (its `recipes`: diffusers
    module name -> bits, 16 keeps the weight float16), as its `mixed_bit_compression_apply.py --selected-recipe`
    reads it: listed modules get their bits, the others stay float16."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: Annotated[str, Strict(), Field(min_length=1, max_length=255, description="relative to the manifest")]
    key: Annotated[str, Strict(), Field(pattern=r"^recipe_\d+\.\d+_bit_mixedpalette$",
                                        description="e.g. recipe_4.50_bit_mixedpalette")]

    @property
    def bits(self) -> float:
        return float(self.key.split("_")[1])


class MixedBit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target_bits: Annotated[float, Field(gt=1.0, le=8.0, description="average bits per UNet weight")] | None = None
    target_psnr_db: Annotated[float, Field(gt=0.0, le=120.0, description="end-to-end PSNR of the UNet output "
                                                                           "against the float16 model")] | None = None
    recipe: AppleRecipe | None = Field(default=None, description="a recipe in Apple's pre-analysis format (Apple "
                                       "publishes them for the base models): no analysis is run")

    @property
    def label(self) -> str:
        if self.recipe is not None:
            return f"mixed {self.recipe.bits:.2f}-bit (Apple recipe)"
        if self.target_bits is not None:
            return f"mixed {self.target_bits:.2f}-bit"
        return f"mixed @{self.target_psnr_db:g} dB"


class PalettizeSettings(CompressionSettings):
    """k-means palettization with `nbits` (per tensor, or per group of output channels), a recipe, or mixed-bit."""

    type: Literal["palettize"]
    nbits: Literal[1, 2, 4, 6, 8] | None = None
    granularity: Granularity = Granularity.PER_TENSOR
    group_size: Annotated[int, Strict(), Field(ge=1, le=4096)] | None = None
    recipe: Annotated[str, Strict(), Field(min_length=1, max_length=255)] | None = Field(
        default=None, description="JSON file (relative to the manifest) mapping op names to nbits, for mixed-bit"
    )
    mixed_bit: MixedBit | None = Field(default=None, description="per-layer bits chosen by the build's analysis of "
                                       "the UNet; `nbits`, if given, is used for the other components")

    @property
    def effective_group_size(self) -> int:
        return self.group_size or 16


# Bounds on a recipe file (Apple's SDXL UNet recipe names ~800 layers, a few tens of KB).
MAX_RECIPE_BYTES = 4 * 1024 * 1024
MAX_RECIPE_ENTRIES = 100_000
RECIPE_BITS = (0, *CANDIDATE_BITS)  # 0: the weight stays float16


def inside_folder(relative: str) -> bool:
    path = PurePosixPath(relative.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and ":" not in relative and not relative.startswith("~")


class Palettize(CompressionScheme):
    name = "palettize"
    settings_model = PalettizeSettings

    def _settings(self, settings: CompressionSettings) -> PalettizeSettings:
        assert isinstance(settings, PalettizeSettings)
        return settings

    def compresses(self, settings: CompressionSettings, component: str) -> bool:
        s = self._settings(settings)
        return s.nbits is not None or (s.mixed_bit is not None and component == MIXED_BIT_COMPONENT)

    def label(self, settings: CompressionSettings) -> str:
        s = self._settings(settings)
        if s.mixed_bit is not None:
            label = s.mixed_bit.label
        else:
            label = f"{s.nbits}-bit" + (" mixed" if s.recipe else "")
        if s.granularity is Granularity.PER_GROUPED_CHANNEL:
            label += f" g{s.effective_group_size}"
        return label

    def minimum_target(self, settings: CompressionSettings) -> DeploymentTarget:
        grouped = self._settings(settings).granularity is Granularity.PER_GROUPED_CHANNEL
        return DeploymentTarget.iOS18 if grouped else DeploymentTarget.iOS17

    def weight_bits(self, settings: CompressionSettings) -> float:
        s = self._settings(settings)
        if s.mixed_bit is not None:
            if s.mixed_bit.recipe is not None:
                return s.mixed_bit.recipe.bits
            return s.mixed_bit.target_bits or 8.0
        return float(s.nbits or 16)

    def own_conversion(self, settings: CompressionSettings) -> bool:
        # grouped LUTs need an iOS18 program from the conversion on
        return self._settings(settings).granularity is Granularity.PER_GROUPED_CHANNEL

    def problems(self, settings: CompressionSettings, target: DeploymentTarget) -> list[tuple[Loc, str]]:
        s = self._settings(settings)
        errors: list[tuple[Loc, str]] = []
        if s.nbits is None and s.mixed_bit is None:
            errors.append((("precision", "nbits"), "required when type is 'palettize'"))
        if s.mixed_bit is not None:
            given = [name for name in ("target_bits", "target_psnr_db", "recipe")
                     if getattr(s.mixed_bit, name) is not None]
            if len(given) != 1:
                errors.append((("precision", "mixed_bit"), "give one of target_bits, target_psnr_db or recipe"))
            if s.mixed_bit.recipe is not None and not inside_folder(s.mixed_bit.recipe.file):
                errors.append((("precision", "mixed_bit", "recipe", "file"),
                               "must be a relative path inside the manifest's folder"))
            if s.recipe is not None:
                errors.append((("precision", "recipe"), "not with mixed_bit: the analysis chooses the bits"))
        if target.level < 17:
            errors.append((("minimum_deployment_target",), "palettized weights need iOS17/macOS14 or later"))
        if s.granularity is Granularity.PER_GROUPED_CHANNEL and target.level < 18:
            errors.append((("precision", "granularity"),
                           "per_grouped_channel needs minimum_deployment_target iOS18/macOS15 or later"))
        if s.recipe is not None and not inside_folder(s.recipe):
            errors.append((("precision", "recipe"), "must be a relative path inside the manifest's folder"))
        if s.group_size is not None and s.granularity is not Granularity.PER_GROUPED_CHANNEL:
            errors.append((("precision", "group_size"), "only allowed with granularity per_grouped_channel"))
        return errors

    def read_inputs(self, settings: CompressionSettings, manifest_folder: Path
                    ) -> tuple[dict[str, Any], list[tuple[Loc, str]]]:
        s = self._settings(settings)
        apple = s.mixed_bit.recipe if s.mixed_bit is not None else None
        if apple is not None:
            if not inside_folder(apple.file):
                return {}, []  # `problems` refuses it
            layers, problem = read_apple_recipe(manifest_folder, apple.file, apple.key)
            if problem is not None:
                return {}, [(("precision", "mixed_bit", "recipe"), problem)]
            return {"apple_recipe": [[name, bits] for name, bits in layers.items()]}, []
        if s.recipe is None or not inside_folder(s.recipe):
            return {}, []  # no file, or one `problems` refuses
        recipe, problem = read_recipe(manifest_folder, s.recipe)
        if problem is not None:
            return {}, [(("precision", "recipe"), problem)]
        # as [name, bits] pairs in the file's order: the first entry that matches an op decides its bits, so the
        # order is part of what the step computes (and of its key)
        return {"recipe": [[name, bits] for name, bits in recipe.items()]}, []

    def analysis(self, settings: CompressionSettings, component: str, inputs: Mapping[str, Any] | None = None
                 ) -> AnalysisRequest | None:
        s = self._settings(settings)
        if s.mixed_bit is None or component != MIXED_BIT_COMPONENT:
            return None
        params: dict[str, Any] = {
            "mixed_bit": s.mixed_bit.model_dump(mode="json", exclude_none=True),
            "granularity": s.granularity.value,
            "group_size": s.effective_group_size if s.granularity is Granularity.PER_GROUPED_CHANNEL else None,
        }
        if s.mixed_bit.recipe is not None:  # the recipe's layers matched to the source's weights: no measuring
            params["apple_recipe"] = list((inputs or {}).get("apple_recipe", []))
        return AnalysisRequest(component, params)

    def apply(self, source: Path, output: Path, settings: CompressionSettings, context: CompressContext
              ) -> dict[str, Any]:
        from publisher.compress.palettize import PalettizeConfig, palettize_package, recipe_for_package

        s = self._settings(settings)
        recipe: dict[str, int] = {}
        chosen: dict[str, Any] | None = None
        if s.recipe is not None:
            if "recipe" not in context.inputs:
                raise PublisherError(f"recipe {s.recipe}: not read with the manifest (the plan carries its contents)")
            recipe = {str(name): int(bits) for name, bits in context.inputs["recipe"]}
        nbits = s.nbits or 0
        if s.mixed_bit is not None and context.component == MIXED_BIT_COMPONENT:
            if context.analysis is None:
                raise PublisherError("a mixed-bit palettization needs its analysis step's result")
            chosen = json.loads((context.analysis / ANALYSIS).read_text()).get("chosen")
            if not chosen:
                raise PublisherError(f"{context.analysis / ANALYSIS}: the analysis chose no recipe (no target)")
            # the analysis names PyTorch weights; the package names MIL ops: matched by the float16 bytes
            recipe, sizes = recipe_for_package(source, [
                {**entry, "nbits": 0 if entry["nbits"] == FLOAT16_BITS else entry["nbits"]} for entry in chosen["layers"]])
            nbits = 0  # a weight the analysis did not cover stays float16 (as Apple's apply script leaves it)
        config = PalettizeConfig(nbits=nbits, granularity=s.granularity, group_size=s.effective_group_size,
                                 recipe=recipe, deployment_target=context.deployment_target)
        report = palettize_package(source, output, config, progress=context.progress)
        if s.recipe is None:  # a recipe the analysis made names the package's own ops: nothing to check
            report.pop("recipe_unmatched", None)
        if chosen is not None:
            report["mixed_bit"] = {key: chosen[key] for key in ("target", "average_bits", "predicted_psnr_db",
                                                                 "float16_psnr_db") if key in chosen}
            # the recipe as applied: every analysed layer found in the package (by content), float16 ones at 16
            matched = sum(sizes.values())
            report["mixed_bit"].update({
                "recipe_name": chosen["recipe"],  # its key in the published pre-analysis JSON (Apple's layout)
                "layers": len(chosen["layers"]), "matched_ops": len(recipe),
                "applied_average_bits": round(sum((bits or FLOAT16_BITS) * sizes[op] for op, bits in recipe.items())
                                              / matched, 4) if matched else None,
                "recipe": {op: bits or FLOAT16_BITS for op, bits in sorted(recipe.items())}})
        return report

    def decoded_weights(self, package: Path) -> Mapping[str, np.ndarray]:
        from publisher.compress.palettize import DecodedWeights

        return DecodedWeights(package)

    def figures(self, report: dict[str, Any]) -> dict[str, Any]:
        ops = report.get("ops", [])
        elements = sum(int(np.prod(op["shape"])) for op in ops)
        average = sum(op["nbits"] * int(np.prod(op["shape"])) for op in ops) / elements if elements else None
        mixed = report.get("mixed_bit")
        if mixed:  # the recipe's average: float16 layers count 16 bits, as in Apple's figures
            bits: Any = round(mixed["applied_average_bits"], 2)
        elif report.get("mixed"):
            bits = round(average or 0.0, 2)
        else:
            bits = report["nbits"]
        figures: dict[str, Any] = {
            "scheme": self.name,
            "bits": bits,
            "granularity": report.get("granularity"),
            "compressed_ops": report.get("palettized_ops"),
            "min_snr_db": report.get("min_snr_db"),
            "mean_snr_db": report.get("mean_snr_db"),
            "package_bytes": report.get("package_bytes"),
        }
        if mixed:
            figures["mixed_bit"] = {k: v for k, v in mixed.items() if k != "recipe"}
            figures["recipe"] = mixed["recipe"]  # the per-layer choice (op name -> bits, 16: float16), on record
        return figures


SCHEME = Palettize()


def _read_json_inside(folder: Path, relative: str, max_bytes: int, what: str) -> tuple[str, Any, str | None]:
    """A JSON file the manifest names, read from inside its folder (a symlink out of it is refused) and bounded
    before it is read: (text, value, None) or ("", None, one line naming the file)."""
    base = folder.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        return "", None, f"{relative} leads outside the manifest's folder"
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return "", None, f"{relative}: {size} bytes; {what} may have {max_bytes} at most"
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return "", None, f"{relative}: cannot read the recipe: {getattr(exc, 'strerror', None) or exc}"
    try:
        return text, json.loads(text), None
    except ValueError as exc:
        return "", None, f"{relative}:{getattr(exc, 'lineno', 1)}: not JSON: {getattr(exc, 'msg', exc)}"


def read_recipe(folder: Path, relative: str) -> tuple[dict[str, int], str | None]:
    """A recipe file (JSON object: op name or fnmatch pattern -> nbits, 0 keeps the weight float16), read from
    inside the manifest's folder and checked: (the recipe in the file's order, None) or ({}, one line naming the file,
    line and entry)."""
    text, data, problem = _read_json_inside(folder, relative, MAX_RECIPE_BYTES, "a recipe")
    if problem is not None:
        return {}, problem
    if not isinstance(data, dict):
        return {}, f"{relative}:1: a recipe is a JSON object of op name -> nbits, not {type(data).__name__}"
    if not data:
        return {}, f"{relative}:1: the recipe is empty"
    if len(data) > MAX_RECIPE_ENTRIES:
        return {}, f"{relative}: {len(data)} entries; a recipe may have {MAX_RECIPE_ENTRIES} at most"
    for name, bits in data.items():
        if not name.strip():
            return {}, f"{relative}:{_line_of_key(text, name)}: an op name is empty"
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in RECIPE_BITS:
            return {}, (f"{relative}:{_line_of_key(text, name)}: {name!r}: nbits must be one of "
                        f"{', '.join(map(str, RECIPE_BITS))} (0 keeps it float16), not {json.dumps(bits)}")
    return {str(name): int(bits) for name, bits in data.items()}, None


def _line_of_key(text: str, key: str) -> int:
    at = text.find(json.dumps(key))
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


APPLE_BITS = (*CANDIDATE_BITS, FLOAT16_BITS)


def read_apple_recipe(folder: Path, relative: str, key: str) -> tuple[dict[str, int], str | None]:
    """Recipe `key` of a file in Apple's pre-analysis layout (`recipes`: module name -> 1/2/4/6/8, 16 for float16),
    read from inside the manifest's folder and checked: (module name -> bits, None) or ({}, one line)."""
    # Apple's files hold the per-layer tables too: a few MB for SDXL
    _, data, problem = _read_json_inside(folder, relative, 16 * MAX_RECIPE_BYTES, "a pre-analysis file")
    if problem is not None:
        return {}, problem
    recipes = data.get("recipes") if isinstance(data, dict) else None
    if not isinstance(recipes, dict) or not recipes:
        return {}, f"{relative}: no `recipes` (not a file in the layout of Apple's pre-analysis)"
    if key not in recipes:
        return {}, f"{relative}: no recipe {key} (it has {', '.join(sorted(map(str, recipes))[:8])})"
    recipe = recipes[key]
    if not isinstance(recipe, dict) or not recipe or len(recipe) > MAX_RECIPE_ENTRIES:
        return {}, f"{relative}: recipes.{key} must be a non-empty object of module name -> bits"
    for name, bits in recipe.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in APPLE_BITS:
            return {}, (f"{relative}: recipes.{key}.{name}: bits must be one of "
                        f"{', '.join(map(str, APPLE_BITS))} (16 keeps it float16), not {json.dumps(bits)}")
    return {str(name): int(bits) for name, bits in recipe.items()}, None
