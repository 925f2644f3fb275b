"""Mixed-bit recipes from per-layer sensitivities: the bit-width per layer for a target, and Apple's JSON format.

A layer's sensitivity at n bits is the PSNR of the model's output (against the float16 model) with that layer
alone palettized to n bits. Noise powers of independent layers add, so a recipe's output noise is predicted as the
sum of its layers' noise (10^(-PSNR/10) each); the recipe for a bit budget is the one that minimises that sum, found
exactly by dynamic programming over the budget (not greedily), so an average-bits target is met to a few hundredths
of a bit. The analysis then measures the chosen recipe itself: the prediction on record is measured, not summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from publisher.compress.palettize_scheme import CANDIDATE_BITS as PALETTE_BITS
from publisher.compress.palettize_scheme import FLOAT16_BITS

OPTIONS = (*PALETTE_BITS, FLOAT16_BITS)
APPLE_PRE_ANALYSIS = "pre-analysis.json"  # the analysis step's copy in Apple's layout
CURVE_BITS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0)  # the curve's points (average bits)


@dataclass(frozen=True)
class LayerSensitivity:
    name: str  # the PyTorch module name (Apple's recipe key)
    size: int  # elements
    sha256: str  # of the float16 weight bytes: how a package's op is matched to this layer
    psnr_db: Mapping[int, float]  # bits -> mean output PSNR with this layer alone at that many bits
    per_sample: Mapping[int, Sequence[float]] = field(default_factory=dict)

    def noise(self, bits: int) -> float:
        return 0.0 if bits == FLOAT16_BITS else 10.0 ** (-self.psnr_db[bits] / 10.0)


def average_bits(layers: Sequence[LayerSensitivity], recipe: Mapping[str, int]) -> float:
    total = sum(layer.size for layer in layers)
    return sum(layer.size * recipe[layer.name] for layer in layers) / total


def predicted_psnr_db(layers: Sequence[LayerSensitivity], recipe: Mapping[str, int]) -> float:
    noise = sum(layer.noise(recipe[layer.name]) for layer in layers)
    return math.inf if noise == 0 else -10.0 * math.log10(noise)


def choose_bits(layers: Sequence[LayerSensitivity], target_bits: float, tolerance: float = 0.02,
                buckets: int = 100_000) -> dict[str, int]:
    """The recipe of least predicted noise whose average is at most `target_bits`, preferring one within
    `tolerance` bits of it. Budget in buckets of total*16/buckets bit-elements: the rounding moves the average
    by at most len(layers)*8/buckets bits."""
    if not layers:
        return {}
    total = sum(layer.size for layer in layers)
    unit = total * FLOAT16_BITS / buckets
    best = np.full(buckets + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(layers), buckets + 1), dtype=np.int8)
    weights = [[round(layer.size * bits / unit) for bits in OPTIONS] for layer in layers]
    for i, layer in enumerate(layers):
        new = np.full(buckets + 1, np.inf)
        for j, bits in enumerate(OPTIONS):
            w = weights[i][j]
            if w > buckets:
                continue
            candidate = np.full(buckets + 1, np.inf)
            candidate[w:] = best[: buckets + 1 - w] + layer.noise(bits)
            better = candidate < new
            new[better] = candidate[better]
            choice[i][better] = j
        best = new
    limit = min(buckets, math.floor(target_bits * total / unit + 1e-9))
    low = max(0, math.ceil((target_bits - tolerance) * total / unit - 1e-9))
    window = best[low: limit + 1]
    if window.size and np.isfinite(window).any():
        k = low + int(np.argmin(window))
    else:
        feasible = best[: limit + 1]
        if not np.isfinite(feasible).any():  # the target is below 1 bit per weight: every layer at 1 bit
            return {layer.name: PALETTE_BITS[0] for layer in layers}
        k = int(np.argmin(np.where(np.isfinite(feasible), feasible, np.inf)))
    recipe: dict[str, int] = {}
    for i in range(len(layers) - 1, -1, -1):
        j = int(choice[i][k])
        recipe[layers[i].name] = OPTIONS[j]
        k -= weights[i][j]
    return dict(reversed(recipe.items()))


def pre_analysis_name(model_version: str) -> str:
    """The file name Apple's pre-analysis script gives its JSON (`<org>-<name>_palettization_recipe.json`)."""
    return f"{model_version.replace('/', '-')}_palettization_recipe.json"


def recipe_key(average: float) -> str:
    """Apple's name of a recipe: `recipe_4.50_bit_mixedpalette`."""
    return f"recipe_{average:.2f}_bit_mixedpalette"


def apple_pre_analysis(model_version: str, layers: Sequence[LayerSensitivity],
                       cumulative: Mapping[int, tuple[Sequence[str], Sequence[tuple[str, Sequence[float]]]]],
                       baselines: Mapping[str, float], recipes: Mapping[str, Mapping[str, int]],
                       metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The layout of Apple's `mixed_bit_compression_pre_analysis.py` output: `single_layer` and `cumulative`
    per bit-width (module name -> per-sample PSNRs, with a `metadata` entry), `baselines` (dB) and `recipes`
    (module name -> bits, 16 for float16), read by its `mixed_bit_compression_apply.py --selected-recipe`."""
    single = {}
    for bits in PALETTE_BITS:
        entry: dict[str, Any] = {"metadata": {"nbits": bits, "out_ngroups": 1, "in_ngroups": 1, "cumulative": False,
                                              **metadata}}
        entry.update({layer.name: [round(v, 1) for v in layer.per_sample.get(bits, [layer.psnr_db[bits]])]
                      for layer in layers})
        single[str(bits)] = entry
    sizes = {layer.name: layer.size for layer in layers}
    cumulative_json = {}
    for bits, (order, points) in cumulative.items():
        # `candidates`: every layer, least sensitive first; entries: the PSNR once the layers up to it are palettized
        entry = {"metadata": {"nbits": bits, "out_ngroups": 1, "in_ngroups": 1, "cumulative": True,
                              "candidates": list(order), "sizes": [sizes[name] for name in order], **metadata}}
        entry.update({name: [round(v, 1) for v in values] for name, values in points})
        cumulative_json[str(bits)] = entry
    return {"model_version": model_version, "single_layer": single, "cumulative": cumulative_json,
            "baselines": {k: round(float(v), 1) for k, v in baselines.items()},
            "recipes": {k: dict(v) for k, v in recipes.items()}}


def layers_from_apple(data: Mapping[str, Any], sizes: Mapping[str, int] | None = None,
                      hashes: Mapping[str, str] | None = None) -> list[LayerSensitivity]:
    """Sensitivities back from Apple's layout (its single-layer table; sizes from the cumulative metadata)."""
    single = data["single_layer"]
    names = [name for name in single[str(PALETTE_BITS[0])] if name != "metadata"]
    if sizes is None:
        sizes = {}
        for entry in data.get("cumulative", {}).values():
            sizes.update(zip(entry["metadata"]["candidates"], entry["metadata"]["sizes"], strict=True))
    return [LayerSensitivity(name=name, size=int(sizes[name]), sha256=(hashes or {}).get(name, ""),
                             psnr_db={bits: float(np.mean(single[str(bits)][name])) for bits in PALETTE_BITS},
                             per_sample={bits: list(single[str(bits)][name]) for bits in PALETTE_BITS})
            for name in names]
