"""Mixed-bit pre-analysis: how much each UNet layer's palettization costs the end-to-end output, on CPU.

Signal strength as Apple defines it: PSNR of the UNet's output with palettized weights against the float16 model,
same seeded latents, timesteps and text embeddings. What makes it minutes rather than GPU-hours:
- the LUT of every (layer, bits) is the exact 1-D k-means solution from the weight's float16 histogram
  (publisher.compress.kmeans), the very weights the package will decode to, in milliseconds;
- the ANE-shaped UNet is a flat list of stages: the state before every stage is computed once, and a layer's
  perturbation runs only the stages from its own on;
- the analysis runs at a small latent size (`ANALYSIS_LATENT`, 16x16 by default; bench/mixed_bit.py measures how
  well its ranking of layers agrees with the full size), with torch on every core.
Apple's `cumulative` tables (layers palettized one after another, least sensitive first) are measured at up to
`CUMULATIVE_POINTS` points per bit-width.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from publisher.compress.kmeans import value_map
from publisher.compress.palettize import MIN_ELEMENTS, dense_palettized, weight_fingerprint
from publisher.compress.palettize_scheme import ANALYSIS, CANDIDATE_BITS, Granularity
from publisher.compress.recipe import (
    APPLE_PRE_ANALYSIS,
    CURVE_BITS,
    FLOAT16_BITS,
    LayerSensitivity,
    apple_pre_analysis,
    average_bits,
    choose_bits,
    predicted_psnr_db,
    recipe_key,
)
from publisher.errors import PublisherError
from publisher.family import DEFAULT_FAMILY
from publisher.metrics import psnr
from publisher.util.atomic import atomic_write_text
from publisher.vocabulary import Attention, Component, Resolution, size_of

ANALYSIS_LATENT = 16  # latent size the analysis runs at (at most the model's own)
SAMPLES = 2  # seeded input sets (Apple: 8 prompts on a GPU)
CUMULATIVE_POINTS = 16  # each a full forward per bit-width; the recipe itself does not use them


@dataclass
class _Candidate:
    name: str
    parameter: Any  # torch.nn.Parameter
    stage: int  # first stage to rerun when it changes (-1: the time embedding, the whole UNet)
    size: int
    sha256: str
    fingerprint: list[float]


class UnetProbe:
    """The float16 UNet with its per-stage states cached for a few seeded inputs (run as one batch), and a way to
    rerun it from a stage with some weights replaced."""

    def __init__(self, source: Path, resolution: Resolution, samples: int = SAMPLES, family: str = DEFAULT_FAMILY) -> None:
        import torch

        from publisher.convert.components import example_inputs, load_component

        loaded = load_component(source, Component.UNET, Attention.ORIGINAL, resolution, family=family)
        # convert/components.Unet, the ANE-shaped UNet (convert/unet.AneUnet) behind the apps' interface, read by
        # its stages (Any: nn.Module types every attribute `Tensor | Module`)
        self.wrapper = cast(Any, loaded.module)
        self.ane = cast(Any, self.wrapper.unet)
        self.samples = samples
        per_seed = [example_inputs(loaded.spec, seed=seed) for seed in range(samples)]
        self.inputs = tuple(torch.cat([x[i] for x in per_seed]) for i in range(len(per_seed[0])))
        with torch.no_grad():
            self.float32_output = self.wrapper(*self.inputs).numpy()
            for parameter in self.ane.parameters():  # the float16 model is the reference (Apple's definition)
                parameter.copy_(parameter.half().float())
            state = self.ane.start(*self.inputs)
            self.states: list[Any] = []
            for index in range(len(self.ane.stages)):
                self.states.append(_copy_state(state))
                self.ane.run(state, index, index + 1)
            self.reference = state.hidden.numpy()

    def candidates(self, min_elements: int = MIN_ELEMENTS) -> list[_Candidate]:
        """The weights the palettizer would compress (2-D or more, `min_elements` or more), by module name."""
        stage_of: dict[int, int] = {}
        for index, stage in enumerate(self.ane.stages):
            for module in stage.modules:
                for parameter in module.parameters():
                    stage_of.setdefault(id(parameter), index)
        found = []
        for name, parameter in self.ane.unet.named_parameters():
            if not name.endswith(".weight") or parameter.dim() < 2 or parameter.numel() < min_elements:
                continue
            values = parameter.detach().half().numpy()
            found.append(_Candidate(name.removesuffix(".weight"), parameter, stage_of.get(id(parameter), -1),
                                    parameter.numel(), hashlib.sha256(values.tobytes()).hexdigest(),
                                    weight_fingerprint(values)))
        return found

    def output_from(self, stage: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if stage < 0:
                return self.wrapper(*self.inputs).numpy()
            return self.ane.run(_copy_state(self.states[stage]), stage).hidden.numpy()

    def psnrs(self, output: np.ndarray, reference: np.ndarray | None = None) -> list[float]:
        """PSNR per seeded sample (each a classifier-free-guidance pair of rows)."""
        reference = self.reference if reference is None else reference
        return [psnr(r, o) for r, o in zip(np.split(reference, self.samples), np.split(output, self.samples),
                                           strict=True)]


def _copy_state(state: Any) -> Any:
    from publisher.convert.unet import UnetState

    return UnetState(hidden=state.hidden, emb=state.emb, context=state.context, skips=list(state.skips))


# Not a palette: `_Weights.set` with this "bit-width" gives a weight its linear 8-bit (int8) quantization, the baseline
# Apple's pre-analysis reports as `linear_8bit` (its plot of the file draws it).
LINEAR_8BIT = -8


def linear_8bit(values: np.ndarray) -> np.ndarray:
    """A weight quantized to int8 and back, per tensor, with a zero point (the range always holds 0), as the
    `linear_8bit` baseline of Apple's pre-analysis measures it."""
    low = min(0.0, float(values.min()))
    high = max(0.0, float(values.max()))
    if high == low:
        return values.astype(np.float32)
    scale = (high - low) / 255.0
    zero = np.round(-128.0 - low / scale)
    quantized = np.clip(np.round(values.astype(np.float32) / scale) + zero, -128, 127)
    return ((quantized - zero) * scale).astype(np.float32)


class _Weights:
    """Sets a candidate's weight to its float16 original or to its palettized version. Per-tensor palettizations
    are kept as 128 KB pattern -> value maps (publisher.compress.kmeans.value_map), so revisiting a (layer, bits)
    costs a table lookup, not a k-means; grouped ones are recomputed (a dense cache would hold five UNets)."""

    def __init__(self, candidates: list[_Candidate], granularity: Granularity, group_size: int) -> None:
        self.granularity, self.group_size = granularity, group_size
        self.originals = {c.name: c.parameter.detach().half().clone() for c in candidates}  # exact: float16 model
        self.maps: dict[tuple[str, int], np.ndarray] = {}

    def set(self, candidate: _Candidate, bits: int) -> None:
        import torch

        original = self.originals[candidate.name]
        if bits == FLOAT16_BITS:
            value = original.float()
        elif bits == LINEAR_8BIT:
            value = torch.from_numpy(linear_8bit(original.numpy())).reshape(original.shape)
        else:
            values = original.numpy()
            if self.granularity is Granularity.PER_TENSOR:
                key = (candidate.name, bits)
                if key not in self.maps:
                    self.maps[key] = value_map(values, bits)
                dense = self.maps[key][values.view(np.uint16)]
            else:
                dense = dense_palettized(values, bits, self.granularity, self.group_size)
            value = torch.from_numpy(dense.astype(np.float32)).reshape(original.shape)
        with torch.no_grad():
            candidate.parameter.copy_(value)


# The top bit-width (8) changes a recipe only for layers that are sensitive at the one below (6): k-means noise
# falls by about 6 dB per bit, so a layer already quiet at 6 bits is quieter still at 8. The single-layer runs at
# 8 bits are made for this most sensitive share (at 6 bits) of the layers; the others are estimated at 6 bits'
# PSNR + 6.02 dB per bit (the measured ones report how far the estimate is off). A fifth of the single-layer runs,
# and the slowest k-means (256 clusters), are saved on three quarters of the layers.
TOP_BITS_MEASURED_SHARE = 0.25


def top_bits_gain_db(below: int, top: int) -> float:
    """The PSNR a layer gains from `below` to `top` bits per weight when quantisation noise halves in amplitude
    with each bit (a palette of twice the entries)."""
    return 20 * math.log10(2) * (top - below)


def analyze(source: Path, resolution: Resolution, settings: Mapping[str, Any], model_version: str,
            progress: bool = True, latent: int = ANALYSIS_LATENT, samples: int = SAMPLES,
            min_elements: int = MIN_ELEMENTS, family: str = DEFAULT_FAMILY) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our analysis record, Apple's pre-analysis JSON) for the UNet of the diffusers folder `source`."""
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    analysis_resolution = min(*size_of(resolution), latent * 8)  # square, at most the model's own
    probe = UnetProbe(source, analysis_resolution, samples, family)
    granularity = Granularity(settings.get("granularity", Granularity.PER_TENSOR.value))
    candidates = probe.candidates(min_elements)
    if not candidates:
        raise PublisherError(f"{source}: the UNet has no weight of {min_elements} or more elements to palettize")
    set_weight = _Weights(candidates, granularity, int(settings.get("group_size") or 16)).set

    # single layer: each (layer, bits) alone, rerun from the layer's stage. The top bit-width is measured for the
    # most sensitive layers only (see TOP_BITS_MEASURED_SHARE); the others get the estimate, checked on those.
    top, below = CANDIDATE_BITS[-1], CANDIDATE_BITS[-2]
    ordered = sorted(candidates, key=lambda c: c.stage)
    measured_top = max(1, math.ceil(len(ordered) * TOP_BITS_MEASURED_SHARE))
    bar = tqdm(total=len(ordered) * (len(CANDIDATE_BITS) - 1) + measured_top, desc="analyze unet layers",
               unit="run", disable=not progress)
    per_layer: dict[str, dict[int, list[float]]] = {}
    for candidate in ordered:
        per_sample = per_layer[candidate.name] = {}
        for bits in CANDIDATE_BITS[:-1]:
            set_weight(candidate, bits)
            per_sample[bits] = probe.psnrs(probe.output_from(candidate.stage))
            bar.update()
        set_weight(candidate, FLOAT16_BITS)
    gain = top_bits_gain_db(below, top)
    sensitive = sorted(ordered, key=lambda c: float(np.mean(per_layer[c.name][below])))[:measured_top]
    estimate_errors = []
    for candidate in sorted(sensitive, key=lambda c: c.stage):
        set_weight(candidate, top)
        measured = probe.psnrs(probe.output_from(candidate.stage))
        set_weight(candidate, FLOAT16_BITS)
        estimate_errors.append(float(np.mean(measured)) - (float(np.mean(per_layer[candidate.name][below])) + gain))
        per_layer[candidate.name][top] = measured
        bar.update()
    bar.close()
    estimated = [c.name for c in ordered if top not in per_layer[c.name]]
    layers: list[LayerSensitivity] = []
    for candidate in ordered:
        per_sample = per_layer[candidate.name]
        per_sample.setdefault(top, [value + gain for value in per_sample[below]])
        layers.append(LayerSensitivity(candidate.name, candidate.size, candidate.sha256,
                                       {b: float(np.mean(v)) for b, v in sorted(per_sample.items())}, per_sample))
    order = {c.name: i for i, c in enumerate(candidates)}
    layers.sort(key=lambda layer: order[layer.name])  # program order, as the model names them
    by_name = {c.name: c for c in candidates}

    def measure(recipe: Mapping[str, int]) -> float:
        for name, bits in recipe.items():
            set_weight(by_name[name], bits)
        result = float(np.mean(probe.psnrs(probe.output_from(-1))))
        for name in recipe:
            set_weight(by_name[name], FLOAT16_BITS)
        return result

    # cumulative (Apple's tables): least sensitive first, measured at up to CUMULATIVE_POINTS points per bit-width
    cumulative: dict[int, tuple[list[str], list[tuple[str, list[float]]]]] = {}
    stride = max(1, math.ceil(len(layers) / CUMULATIVE_POINTS))
    for bits in tqdm(CANDIDATE_BITS, desc="analyze cumulative", disable=not progress):
        ranked = sorted(layers, key=lambda layer: -layer.psnr_db[bits])
        points = []
        for index, layer in enumerate(ranked):
            set_weight(by_name[layer.name], bits)
            if (index + 1) % stride == 0 or index == len(ranked) - 1:
                points.append((layer.name, probe.psnrs(probe.output_from(-1))))
        for layer in ranked:
            set_weight(by_name[layer.name], FLOAT16_BITS)
        cumulative[bits] = ([layer.name for layer in ranked], points)

    float16_vs_float32 = float(np.mean(probe.psnrs(probe.reference, probe.float32_output)))
    # the curve: for each average-bits point, the recipe of least predicted noise, then measured
    curve = []
    recipes: dict[str, dict[str, int]] = {}
    baselines: dict[str, float] = {"original": float16_vs_float32}
    for target in CURVE_BITS:
        recipe = choose_bits(layers, target)
        achieved = average_bits(layers, recipe)
        curve_psnr = measure(recipe)
        key = recipe_key(achieved)
        recipes[key], baselines[key] = recipe, curve_psnr
        curve.append({"target_bits": target, "average_bits": round(achieved, 4), "psnr_db": round(curve_psnr, 2),
                      "summed_psnr_db": round(predicted_psnr_db(layers, recipe), 2), "recipe": key})
    for bits in CANDIDATE_BITS:  # uniform palettization, for comparison
        baselines[f"uniform_{bits}bit"] = measure({layer.name: bits for layer in layers})
    # Apple's baseline (its plotting reads it): every analysed weight linearly quantized to 8 bits
    baselines["linear_8bit"] = measure({layer.name: LINEAR_8BIT for layer in layers})

    chosen: dict[str, Any] | None = None
    if settings.get("mixed_bit"):  # a manifest's target; without one (`publisher recipe` before choosing), the curve
        chosen_recipe, chosen_target = _choose(layers, settings["mixed_bit"], measure)
        chosen_average = average_bits(layers, chosen_recipe)
        predicted = measure(chosen_recipe)
        chosen_key = recipe_key(chosen_average)
        recipes[chosen_key], baselines[chosen_key] = chosen_recipe, predicted
        chosen = {"target": dict(chosen_target), "recipe": chosen_key, "average_bits": round(chosen_average, 4),
                  "predicted_psnr_db": round(predicted, 2), "float16_psnr_db": round(float16_vs_float32, 2),
                  "layers": [{"name": layer.name, "sha256": layer.sha256, "size": layer.size,
                              "fingerprint": by_name[layer.name].fingerprint, "nbits": chosen_recipe[layer.name]}
                             for layer in layers]}
    seconds = time.perf_counter() - start
    record = {
        "version": 1,
        "model_version": model_version,
        "component": "unet",
        "resolution": analysis_resolution,
        "samples": samples,
        "granularity": granularity.value,
        "min_elements": min_elements,
        "float16_vs_float32_psnr_db": round(float16_vs_float32, 2),
        # single-layer PSNRs at the top bit-width that are estimates, and how the estimate fared where measured
        "estimated": {str(top): estimated},
        "estimate_check": {"bits": top, "measured_layers": len(estimate_errors),
                           "median_error_db": round(float(np.median(estimate_errors)), 2),
                           "max_abs_error_db": round(float(np.max(np.abs(estimate_errors))), 2)},
        "layers": [{"name": layer.name, "size": layer.size, "sha256": layer.sha256,
                    "psnr_db": {str(b): round(v, 3) for b, v in layer.psnr_db.items()}} for layer in layers],
        "curve": curve,
        "uniform": {str(b): round(baselines[f"uniform_{b}bit"], 2) for b in CANDIDATE_BITS},
        "chosen": chosen,
        "seconds": round(seconds, 1),
    }
    apple = apple_pre_analysis(model_version, layers, cumulative, baselines, recipes,
                               {"resolution": analysis_resolution, "samples": samples})
    return record, apple


def _choose(layers: list[LayerSensitivity], target: Mapping[str, Any], measure: Callable[[Mapping[str, int]], float]
            ) -> tuple[dict[str, int], Mapping[str, Any]]:
    """The recipe for the manifest's target: at `target_bits` directly; for `target_psnr_db` the fewest average
    bits whose measured PSNR reaches it (bisection on the budget, each candidate recipe measured)."""
    if "target_bits" in target:
        return choose_bits(layers, float(target["target_bits"])), target
    wanted = float(target["target_psnr_db"])
    low, high = 1.0, float(FLOAT16_BITS)
    best = {layer.name: FLOAT16_BITS for layer in layers}
    for _ in range(12):
        middle = (low + high) / 2
        recipe = choose_bits(layers, middle)
        if measure(recipe) >= wanted:
            best, high = recipe, middle
        else:
            low = middle
        if high - low < 0.05:
            break
    return best, target


def analyze_to_folder(source: Path, component: Component, resolution: Resolution, settings: Mapping[str, Any],
                      model_version: str, out: Path, progress: bool = True, family: str = DEFAULT_FAMILY) -> None:
    """The analysis step: `analysis.json` (ours) and `pre-analysis.json` (Apple's layout) written into `out`."""
    if component != Component.UNET:
        raise PublisherError(f"a mixed-bit analysis is for the UNet, not {component.value}")
    if settings.get("mixed_bit", {}).get("recipe"):  # a recipe given in Apple's layout: matched, not measured
        record = apple_recipe_record(source, resolution, settings, model_version, family)
        atomic_write_text(out / ANALYSIS, json.dumps(record, indent=1, sort_keys=True) + "\n")
        recipe = settings["mixed_bit"]["recipe"]
        apple = {"model_version": model_version, "baselines": {},
                 "recipes": {recipe["key"]: dict(settings["apple_recipe"])}}
        atomic_write_text(out / APPLE_PRE_ANALYSIS, json.dumps(apple, indent=1) + "\n")
        return
    record, apple = analyze(source, resolution, settings, model_version, progress=progress, family=family)
    atomic_write_text(out / ANALYSIS, json.dumps(record, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / APPLE_PRE_ANALYSIS, json.dumps(apple, indent=1) + "\n")


def unet_weight_names(source: Path, family: str = DEFAULT_FAMILY) -> set[str]:
    """The module names of the source's UNet that hold a weight (Apple's recipe names), from its config alone: the
    model is built on the meta device, no weight is read."""
    import importlib

    import torch

    from publisher.family import family_named

    spec = family_named(family).component(Component.UNET)
    module, _, name = spec.loader.partition(":")
    config = json.loads((Path(source) / spec.folder / "config.json").read_text())
    with torch.device("meta"):
        unet = getattr(importlib.import_module(module), name).from_config(config)
    return {n.removesuffix(".weight") for n, _ in unet.named_parameters() if n.endswith(".weight")}


def unknown_modules(recipe: Iterable[str], weights: set[str]) -> str | None:
    """One line naming the recipe's modules that are no weight of this UNet (the first five), or None."""
    unknown = [str(name) for name in recipe if name not in weights]
    if not unknown:
        return None
    return (f"the recipe names {len(unknown)} module(s) this UNet has no weight for: "
            f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")


def apple_recipe_record(source: Path, resolution: Resolution, settings: Mapping[str, Any], model_version: str,
                        family: str = DEFAULT_FAMILY) -> dict[str, Any]:
    """An analysis record whose choice is a recipe in Apple's layout: its module names matched to the source UNet's
    weights (the compress step finds them in the package by their float16 bytes). Modules the recipe leaves out stay
    float16, as Apple's apply script leaves them; a name that is no weight of this UNet is an error naming the first."""
    import torch

    from publisher.convert.components import load_component

    recipe = {str(name): int(bits) for name, bits in settings["apple_recipe"]}
    loaded = load_component(source, Component.UNET, Attention.ORIGINAL, resolution, family=family)
    unet = cast(Any, loaded.module).unet.unet  # the diffusers module: its parameter names are Apple's module names
    weights = {name.removesuffix(".weight"): p for name, p in unet.named_parameters() if name.endswith(".weight")}
    problem = unknown_modules(recipe, set(weights))
    if problem is not None:
        raise PublisherError(problem)
    layers: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, bits in recipe.items():
            values = weights[name].detach().half().numpy()
            layers.append({"name": name, "size": int(values.size), "nbits": bits,
                           "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
                           "fingerprint": weight_fingerprint(values)})
    covered = sum(layer["size"] for layer in layers)
    average = sum(layer["size"] * layer["nbits"] for layer in layers) / covered
    key = settings["mixed_bit"]["recipe"]["key"]
    return {"version": 1, "model_version": model_version, "component": "unet", "resolution": resolution,
            "source_of_recipe": {"format": "apple-pre-analysis", "file": settings["mixed_bit"]["recipe"]["file"],
                                 "key": key},
            "chosen": {"target": {"recipe": key}, "recipe": key, "average_bits": round(average, 4),
                       "layers": layers}}


def load_record(folder: Path) -> dict[str, Any]:
    """The analysis record an analysis step stored in `folder`."""
    return json.loads((Path(folder) / ANALYSIS).read_text())


def plot_curve(record: Mapping[str, Any], path: Path, title: str) -> None:
    """The PNG people choose a recipe from: average bits vs PSNR for the mixed-bit curve and uniform palettes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    curve = record["curve"]
    axes.plot([p["average_bits"] for p in curve], [p["psnr_db"] for p in curve], "o-", label="mixed-bit (measured)")
    uniform = sorted((int(b), v) for b, v in record["uniform"].items())
    axes.plot([b for b, _ in uniform], [v for _, v in uniform], "s--", label="uniform palettization")
    axes.axhline(record["float16_vs_float32_psnr_db"], color="gray", linestyle=":", label="float16 vs float32")
    if record.get("chosen"):
        axes.plot([record["chosen"]["average_bits"]], [record["chosen"]["predicted_psnr_db"]], "r*", markersize=14,
                  label=f"chosen ({record['chosen']['recipe']})")
    axes.set_xlabel("average bits per UNet weight")
    axes.set_ylabel("UNet output PSNR vs float16 (dB)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
