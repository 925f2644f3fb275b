"""Mixed-bit palettization: recipes from per-layer sensitivities, Apple's pre-analysis JSON, the manifest's settings,
and (slow) the analysis of a tiny UNet against what the applied package really does."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from publisher.compress.recipe import (
    CURVE_BITS,
    PALETTE_BITS,
    LayerSensitivity,
    apple_pre_analysis,
    average_bits,
    choose_bits,
    layers_from_apple,
    predicted_psnr_db,
    recipe_key,
)
from publisher.errors import ManifestError
from publisher.manifest import load_manifest
from tests.helpers import MANIFEST_HEAD, write_manifest


def synthetic_layers(count: int = 40, seed: int = 0) -> list[LayerSensitivity]:
    rng = random.Random(seed)
    layers = []
    for i in range(count):
        offset = rng.uniform(-8, 8)  # how tolerant this layer is
        psnr = {bits: 12 + 6 * bits + offset for bits in PALETTE_BITS}
        layers.append(LayerSensitivity(f"block.{i}.conv", rng.choice([4096, 16384, 65536, 147456]), f"{i:064x}", psnr))
    return layers


@pytest.mark.parametrize("target", [2.0, 3.3, 4.5, 6.0, 7.2])
def test_recipe_meets_an_average_bits_target(target: float) -> None:
    layers = synthetic_layers()
    recipe = choose_bits(layers, target)
    assert set(recipe) == {layer.name for layer in layers}
    assert set(recipe.values()) <= {*PALETTE_BITS, 16}
    assert abs(average_bits(layers, recipe) - target) <= 0.05
    assert average_bits(layers, recipe) <= target + 1e-9


def test_more_bits_never_predict_less_signal() -> None:
    layers = synthetic_layers()
    predicted = [predicted_psnr_db(layers, choose_bits(layers, bits)) for bits in CURVE_BITS]
    assert predicted == sorted(predicted)
    # against uniform palettization at the same average: the recipe spends bits where they buy the most
    for bits in (4, 6):
        uniform = predicted_psnr_db(layers, {layer.name: bits for layer in layers})
        assert predicted_psnr_db(layers, choose_bits(layers, float(bits))) > uniform + 1.0


def test_a_sensitive_layer_keeps_more_bits() -> None:
    layers = synthetic_layers()
    sensitive = LayerSensitivity("sensitive", 65536, "f" * 64, {bits: 5.0 * bits for bits in PALETTE_BITS})
    tolerant = LayerSensitivity("tolerant", 65536, "e" * 64, {bits: 30 + 5.0 * bits for bits in PALETTE_BITS})
    recipe = choose_bits([*layers, sensitive, tolerant], 4.0)
    assert recipe["sensitive"] > recipe["tolerant"]


def test_apple_json_round_trips() -> None:
    layers = [LayerSensitivity(layer.name, layer.size, layer.sha256,
                               {b: round(v, 1) for b, v in layer.psnr_db.items()},
                               {b: [round(v, 1), round(v, 1)] for b, v in layer.psnr_db.items()})
              for layer in synthetic_layers(12)]
    recipes = {recipe_key(average_bits(layers, r)): r for r in (choose_bits(layers, t) for t in (3.0, 4.5))}
    order = [layer.name for layer in layers]
    cumulative = {bits: (order, [(name, [40.0, 41.0]) for name in order[1::2]]) for bits in PALETTE_BITS}
    data = json.loads(json.dumps(apple_pre_analysis("org/model", layers, cumulative, {"original": 80.0, **{
        k: 40.0 for k in recipes}}, recipes, {"resolution": 128})))
    assert data["model_version"] == "org/model"
    assert set(data["single_layer"]) == {str(b) for b in PALETTE_BITS}
    assert data["single_layer"]["4"]["metadata"]["nbits"] == 4
    assert data["cumulative"]["6"]["metadata"]["candidates"] == [layer.name for layer in layers]
    assert all(re.fullmatch(r"recipe_\d+\.\d\d_bit_mixedpalette", key) for key in data["recipes"])
    assert set(data["recipes"]) <= set(data["baselines"])  # each recipe's PSNR under the same key
    back = layers_from_apple(data, hashes={layer.name: layer.sha256 for layer in layers})
    assert back == layers
    assert choose_bits(back, 4.5) == choose_bits(layers, 4.5)


MIXED = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-mixed"
    precision: {{type: palettize, mixed_bit: {{target_bits: 4.5}}}}
    attention: [SPLIT_EINSUM_V2]
    components: [text_encoder, unet]
    layouts: [packages]
"""


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("{target_bits: 4.5}", "{target_bits: 4.5, target_psnr_db: 40}",
     "publish[0].precision.mixed_bit: give one of target_bits, target_psnr_db or recipe"),
    ("{target_bits: 4.5}", "{}", "publish[0].precision.mixed_bit: give one of target_bits, target_psnr_db or recipe"),
    ("{target_bits: 4.5}", "{target_bits: 0.5}", "publish[0].precision.mixed_bit.target_bits: input should be "
                                                 "greater than 1"),
    ("{target_bits: 4.5}}", "{target_bits: 4.5}}, recipe: r.json",
     "publish[0].precision.recipe: not with mixed_bit: the analysis chooses the bits"),
    ("layouts: [packages]", "layouts: [packages]\n    chunk_unet: true",
     "publish[0].chunk_unet: a mixed 4.50-bit UNet is small enough (4.5 bits per weight): chunking is refused"),
])
def test_mixed_bit_settings_are_checked(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write_manifest(tmp_path, text=MIXED.replace(old, new))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.args[0].split(": ", 1)[1] == expected


def test_a_mixed_bit_variant_plans_one_analysis(tmp_path: Path) -> None:
    from publisher.plan import AnalyzeParams, build_plan

    loaded = load_manifest(write_manifest(tmp_path, text=MIXED))
    plan = build_plan([loaded], "me")
    [analyze] = plan.steps_of("analyze")
    assert isinstance(analyze.params, AnalyzeParams) and analyze.params.component == "unet"
    [compress] = plan.steps_of("compress")
    assert compress.inputs[1] == analyze.id and compress.params.component == "unet"
    assert plan.variants[0].precision.label == "mixed 4.50-bit"


# -- the analysis of a real (tiny) UNet ----------------------------------------------------------------------

SENSITIVE = "up_blocks.1.resnets.1.conv_shortcut"


@pytest.fixture(scope="module")
def sensitive_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline (latents 16x16) whose last skip projection is scaled 30x: its path dominates the output,
    so its palettization noise does too."""
    import torch
    from diffusers import UNet2DConditionModel

    from publisher.tiny import build_tiny_pipeline
    from publisher.vocabulary import Component

    source = build_tiny_pipeline(tmp_path_factory.mktemp("mixed") / "sd", components=(Component.UNET,),
                                 sample_size=16)
    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    with torch.no_grad():
        dict(unet.named_modules())[SENSITIVE].weight.mul_(30.0)
    shutil.rmtree(source / "unet")
    unet.save_pretrained(source / "unet")
    return source


@pytest.mark.slow
def test_analysis_ranks_prediction_and_package_agree(sensitive_source: Path, tmp_path: Path) -> None:
    from publisher.compress.palettize_scheme import SCHEME, PalettizeSettings
    from publisher.compress.scheme import CompressContext
    from publisher.compress.sensitivity import analyze_to_folder, load_record
    from publisher.convert.components import example_inputs, load_component
    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.deployment import DeploymentTarget
    from publisher.metrics import psnr
    from publisher.verify.executor import run_package
    from publisher.vocabulary import Attention, Component

    analysis = tmp_path / "analysis"
    analysis.mkdir()
    analyze_to_folder(sensitive_source, Component.UNET, 128, {"mixed_bit": {"target_bits": 4.5}}, "tiny/sd",
                      analysis, progress=False)
    record = load_record(analysis)
    ranked = sorted(record["layers"], key=lambda layer: layer["psnr_db"]["4"])
    assert ranked[0]["name"] == SENSITIVE, [(r["name"], r["psnr_db"]["4"]) for r in ranked[:3]]
    chosen = record["chosen"]
    assert abs(chosen["average_bits"] - 4.5) <= 0.05
    bits = {layer["name"]: layer["nbits"] for layer in chosen["layers"]}
    assert bits[SENSITIVE] >= max(b for name, b in bits.items() if name != SENSITIVE and b != 16) or bits[
        SENSITIVE] == 16
    # Apple's layout next to ours: its recipes hold our chosen one, its tables read back to the same ranking
    apple = json.loads((analysis / "pre-analysis.json").read_text())
    assert apple["recipes"][chosen["recipe"]] == bits
    assert apple["baselines"][chosen["recipe"]] == round(chosen["predicted_psnr_db"], 1)
    # every baseline Apple's pre-analysis writes, `linear_8bit` included (Apple's plot of the file reads it)
    baselines = apple["baselines"]
    assert {"original", "linear_8bit"} <= set(baselines)
    assert baselines["uniform_1bit"] < baselines["linear_8bit"] < baselines["original"]
    back = sorted(layers_from_apple(apple), key=lambda layer: layer.psnr_db[4])
    assert back[0].name == SENSITIVE

    # the package: the float16 UNet palettized by the recipe, run by the executor, against the float16 package
    float16 = tmp_path / "unet.mlpackage"
    convert_component(sensitive_source, Component.UNET, Attention.ORIGINAL, 128, DeploymentTarget.iOS17, float16,
                      PackageMetadata("tiny/sd@main", "mit", Attention.ORIGINAL))
    mixed = tmp_path / "mixed.mlpackage"
    settings = PalettizeSettings(type="palettize", mixed_bit={"target_bits": 4.5})
    report = SCHEME.apply(float16, mixed, settings, CompressContext(deployment_target=DeploymentTarget.iOS17,
                                                                    component="unet", analysis=analysis,
                                                                    progress=False))
    figures = SCHEME.figures(report)
    # every analysed layer matched an op by content, so the package holds the recipe's average
    assert figures["mixed_bit"]["matched_ops"] == len(chosen["layers"])
    assert abs(figures["bits"] - chosen["average_bits"]) < 0.01
    assert sorted(figures["recipe"].values()) == sorted(bits.values())
    spec = load_component(sensitive_source, Component.UNET, Attention.ORIGINAL, 128).spec
    measured = []
    for seed in range(record["samples"]):  # the analysis' own seeded inputs
        feed = {t.name: x.numpy() for t, x in zip(spec.inputs, example_inputs(spec, seed=seed), strict=True)}
        reference = run_package(float16, feed)["noise_pred"]
        measured.append(psnr(reference, run_package(mixed, feed)["noise_pred"]))
    assert abs(float(np.mean(measured)) - chosen["predicted_psnr_db"]) <= 1.0, (measured, chosen)


@pytest.mark.slow
def test_recipe_command_then_a_build_publish_the_recipe(tmp_path: Path, staging_hub, tiny_source_repo,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from publisher.cli import main
    from publisher.engine.build import BuildOptions, build
    from publisher.manifest import load_manifests
    from publisher.publish.card import card_text

    manifest = write_manifest(tmp_path / "manifests", text=MIXED)
    store = tmp_path / "store"
    monkeypatch.setenv("STAGING_HUB_TOKEN", staging_hub.token)
    plot = tmp_path / "curve.png"
    main(["recipe", str(manifest), "--store", str(store), "--source-endpoint", staging_hub.url, "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert "(built;" in printed and "(the manifest's target)" in printed and "uniform 6-bit" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = build(load_manifests([manifest]), BuildOptions(
        out=tmp_path / "out", store=store, namespace="tester", compile=False, endpoint=staging_hub.url,
        token=staging_hub.token, isolate=False, progress=False))
    assert result.ok, [v.error for v in result.variants]
    assert not any(step.startswith("analyze:") for step in result.built)  # the recipe command's analysis, reused
    folder = tmp_path / "out/tester/coreml-tiny-sd-mixed/split_einsum_v2"
    info = json.loads((folder / "build-info.json").read_text())
    apple = json.loads((folder / "tiny-sd_palettization_recipe.json").read_text())
    assert "tiny-sd_palettization_recipe.json" in info["files"]  # published with the variant
    unet = info["fidelity"]["unet"]
    assert abs(unet["bits"] - 4.5) <= 0.05 and unet["mixed_bit"]["matched_ops"] == unet["mixed_bit"]["layers"]
    assert sorted(unet["recipe"].values()) == sorted(apple["recipes"][unet["mixed_bit"]["recipe_name"]].values())
    assert unet["output_psnr_db"] >= 35
    assert "text_encoder" not in {c for c, f in info["fidelity"].items() if "bits" in f}  # no nbits: float16
    card = card_text("tester/coreml-tiny-sd-mixed", [info], "http://hub")
    assert "mixed-bit recipe for 4.5 bits" in card


def test_linear_8bit_is_int8_per_tensor_with_zero_kept() -> None:
    from publisher.compress.sensitivity import linear_8bit

    rng = np.random.default_rng(3)
    values = (rng.standard_normal((64, 32)) * 0.2 + 0.05).astype(np.float16)
    values[0, 0] = 0
    out = linear_8bit(values)
    step = (max(0.0, float(values.max())) - min(0.0, float(values.min()))) / 255
    assert out.shape == values.shape and out[0, 0] == 0  # the range holds 0, and 0 is a level
    assert np.max(np.abs(out - values.astype(np.float32))) <= step / 2 + 1e-6
    assert len(np.unique(out)) <= 256
    assert len(np.unique(linear_8bit(np.full((4, 4), 3.0)))) == 1  # a constant tensor stays one level


APPLE_RECIPE_MANIFEST = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-apple-recipe"
    precision: {{type: palettize, mixed_bit: {{recipe: {{file: pre-analysis.json, key: recipe_5.00_bit_mixedpalette}}}}}}
    attention: [ORIGINAL]
    components: [unet]
    layouts: [packages]
"""


def _apple_file(folder: Path, recipe: dict) -> None:  # type: ignore[type-arg]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pre-analysis.json").write_text(json.dumps({
        "model_version": "tiny/sd", "baselines": {"original": 80.0, "recipe_5.00_bit_mixedpalette": 40.0},
        "recipes": {"recipe_5.00_bit_mixedpalette": recipe}}))


def test_apple_recipe_files_are_read_and_checked_with_the_manifest(tmp_path: Path) -> None:
    from publisher.plan import build_plan

    _apple_file(tmp_path, {"down_blocks.0.resnets.0.conv1": 4, "mid_block.resnets.0.conv2": 16})
    path = write_manifest(tmp_path, text=APPLE_RECIPE_MANIFEST)
    loaded = load_manifest(path)
    assert loaded.inputs_of(0)["apple_recipe"] == [["down_blocks.0.resnets.0.conv1", 4],
                                                   ["mid_block.resnets.0.conv2", 16]]
    plan = build_plan([loaded], "me")
    (analyze,) = plan.steps_of("analyze")
    assert analyze.params.settings["apple_recipe"] == loaded.inputs_of(0)["apple_recipe"]
    assert plan.variants[0].precision.label == "mixed 5.00-bit (Apple recipe)"
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "pre-analysis.json" in text)
    for recipe, message in [({"x": 3}, "bits must be one of 1, 2, 4, 6, 8, 16 (16 keeps it float16), not 3"),
                            ({"x": True}, "not true")]:
        _apple_file(tmp_path, recipe)
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert info.value.lines[0].replace(str(path), "m.yaml").startswith(
            f"m.yaml:{line}: publish[0].precision.mixed_bit.recipe: pre-analysis.json: recipes.")
        assert message in info.value.lines[0]
    (tmp_path / "pre-analysis.json").write_text(json.dumps({"recipes": {"recipe_4.50_bit_mixedpalette": {"x": 4}}}))
    with pytest.raises(ManifestError, match=r"no recipe recipe_5\.00_bit_mixedpalette \(it has recipe_4\.50"):
        load_manifest(path)
    both = APPLE_RECIPE_MANIFEST.replace("mixed_bit: {{recipe:", "mixed_bit: {{target_bits: 4, recipe:")
    with pytest.raises(ManifestError, match="give one of target_bits, target_psnr_db or recipe"):
        load_manifest(write_manifest(tmp_path / "both", text=both))


def test_validate_sources_checks_apple_recipes_against_the_source_unet(tmp_path: Path, staging_hub, tiny_source_repo,  # type: ignore[no-untyped-def]
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`validate --sources` reads only the source's unet/config.json: a recipe naming modules the UNet lacks is one
    line on the recipe's line, exit 1; a matching one passes. Without --sources nothing is read from the Hub."""
    from publisher.cli import main

    monkeypatch.setenv("STAGING_HUB_TOKEN", staging_hub.token)
    _apple_file(tmp_path, {"down_blocks.0.resnets.0.conv1": 4, "mid_block.resnets.0.conv2": 16})
    path = write_manifest(tmp_path, text=APPLE_RECIPE_MANIFEST)
    main(["validate", str(path), "--sources", "--source-endpoint", staging_hub.url])
    assert capsys.readouterr().out.strip().endswith("1 manifests valid")
    _apple_file(tmp_path, {"down_blocks.0.resnets.0.conv1": 4, "down_blocks.9.nothing": 2, "up.x": 8})
    main(["validate", str(path), "--source-endpoint", staging_hub.url])  # the file alone is well-formed
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path), "--sources", "--source-endpoint", staging_hub.url])
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "pre-analysis.json" in text)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path}:{line}: publish[0].precision.mixed_bit.recipe: the recipe names 2 module(s) this UNet has no "
        "weight for: down_blocks.9.nothing, up.x (source tiny/sd@main)"]


@pytest.mark.slow
def test_a_build_from_apples_recipe_format(tmp_path: Path, tiny_source: Path, staging_hub, tiny_source_repo  # type: ignore[no-untyped-def]
                                           ) -> None:
    """A recipe in Apple's layout (diffusers module names, 16 = float16) applies with every layer matched, no
    analysis run; a module the UNet does not have fails the variant with its name."""
    from diffusers import UNet2DConditionModel
    from torch import nn

    from publisher.engine.build import BuildOptions, build
    from publisher.manifest import load_manifests

    unet = UNet2DConditionModel.from_pretrained(tiny_source / "unet")
    names = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))
             and module.weight.numel() >= 4096][:6]
    recipe = {name: bits for name, bits in zip(names, [4, 8, 16, 6, 2, 8], strict=False)}
    folder = tmp_path / "manifests"
    _apple_file(folder, recipe)
    manifest = write_manifest(folder, text=APPLE_RECIPE_MANIFEST)
    options = BuildOptions(out=tmp_path / "out", store=tmp_path / "store", namespace="tester", compile=False,
                           endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False)
    result = build(load_manifests([manifest]), options)
    assert result.ok, [v.error for v in result.variants]
    info = json.loads((tmp_path / "out/tester/coreml-tiny-sd-apple-recipe/original/build-info.json").read_text())
    unet_figures = info["fidelity"]["unet"]
    assert unet_figures["mixed_bit"]["layers"] == len(recipe) == unet_figures["mixed_bit"]["matched_ops"]
    assert sorted(unet_figures["recipe"].values()) == sorted(recipe.values())  # every layer at its bits
    # a module the UNet does not have: refused once the source is fetched, before anything converts
    _apple_file(folder, {**recipe, "down_blocks.9.nothing": 4})
    fresh = BuildOptions(out=tmp_path / "out2", store=tmp_path / "store2", namespace="tester", compile=False,
                         endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False)
    failed = build(load_manifests([manifest]), fresh)
    assert not failed.ok and failed.variants[0].error == \
        "the recipe names 1 module(s) this UNet has no weight for: down_blocks.9.nothing"
    assert failed.built == []

