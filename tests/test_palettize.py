"""Palettization of tiny float16 packages: LUTs, packing, sizes, reports, recipes, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from publisher.compress.kmeans import palettize_grouped, palettize_tensor
from publisher.compress.lut import lut_lookup, lut_snr
from publisher.compress.packing import pack_indices, unpack_indices
from publisher.compress.palettize import (
    PalettizeConfig,
    PalettizeError,
    iter_palettized_weights,
    palettize_package,
    read_palettized_weights,
)
from publisher.compress.palettize_scheme import Granularity, read_recipe
from publisher.convert.coreml import PackageMetadata, convert_component
from publisher.deployment import DeploymentTarget
from publisher.metrics import snr
from publisher.milfile import PackageFiles, WeightReader, const_values, main_block, op_name, operand_values, read_spec
from publisher.mlpackage import import_coremltools, load_program, main_operations, package_info
from publisher.tiny import build_tiny_pipeline
from publisher.vocabulary import Attention, Component

pytestmark = pytest.mark.slow  # converts, builds or publishes models


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-pal") / "source",
                               components=(Component.TEXT_ENCODER, Component.UNET))


@pytest.fixture(scope="module")
def unet16(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "unet.mlpackage"
    convert_component(source, Component.UNET, Attention.ORIGINAL, 256, DeploymentTarget.iOS16, out,
                      PackageMetadata("tiny@main", "mit", Attention.ORIGINAL))
    return out


def _size(package: Path) -> int:
    return sum(p.stat().st_size for p in package.rglob("*") if p.is_file())


def _float16_weights(package: Path, min_elements: int = 2048) -> dict[str, np.ndarray]:
    found = {}
    for op in main_operations(load_program(package)):
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.dtype == np.float16 and value.size >= min_elements \
                and value.ndim >= 2:
            if not any(c.op_type.startswith("gather") for c in op.outputs[0].child_ops):
                found[op.name] = value
    return found


def test_kmeans_matches_coremltools_exact_solver() -> None:
    import_coremltools()
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    rng = np.random.default_rng(3)
    tensor = (rng.standard_normal((64, 32, 3, 3)) * 0.05).astype(np.float16)
    for nbits in (2, 4, 6, 8):
        palette = palettize_tensor(tensor, nbits)
        lut, indices = _get_kmeans_lookup_table_and_weight(nbits, tensor)
        assert np.array_equal(palette.lut, lut.astype(np.float16).reshape(-1))
        assert np.array_equal(palette.indices.reshape(-1), indices.reshape(-1).astype(np.uint8))


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_packing_round_trip_and_layout(nbits: int) -> None:
    import_coremltools()
    from coremltools.optimize import _utils

    rng = np.random.default_rng(nbits)
    indices = rng.integers(0, 1 << nbits, size=1003).astype(np.uint8)
    packed = pack_indices(indices, nbits)
    assert len(packed) == -(-1003 * nbits // 8)
    assert np.array_equal(packed, _utils.pack_elements_into_bits(indices, nbits))
    assert np.array_equal(unpack_indices(packed, nbits, 1003), indices)


def test_grouped_luts_are_per_group() -> None:
    rng = np.random.default_rng(0)
    tensor = np.concatenate([rng.standard_normal((16, 40)) * 0.01, rng.standard_normal((16, 40)) * 10]).astype(
        np.float16)
    luts, indices = palettize_grouped(tensor, 4, 16)
    assert luts.shape == (2, 16)
    assert np.abs(luts[0]).max() < 1 < np.abs(luts[1]).max()
    error = np.abs(np.concatenate([luts[0][indices[:16]], luts[1][indices[16:]]]).astype(np.float32)
                   - tensor.astype(np.float32))
    # each group is fitted on its own scale: a shared LUT could not get the small group this close
    assert error[:16].max() < 0.01
    assert error[16:].max() < 10


@pytest.mark.parametrize("nbits", [8, 6, 4, 2])
def test_every_nbits_per_tensor(unet16: Path, tmp_path: Path, nbits: int) -> None:
    out = tmp_path / f"unet{nbits}.mlpackage"
    report = palettize_package(unet16, out, PalettizeConfig(nbits, deployment_target=DeploymentTarget.iOS17),
                               progress=False)
    weights = read_palettized_weights(out, decoder="coremltools")
    originals = _float16_weights(unet16)
    assert set(weights) == set(originals) == {op["op"] for op in report["ops"]}
    for name, (lut, indices, dense) in weights.items():
        assert lut.size == 1 << nbits
        assert indices.shape == originals[name].shape
        assert np.array_equal(lut_lookup(lut, indices), dense)  # what coremltools decodes is the LUT lookup
    # size: each palettized weight shrinks to nbits/16 of its float16 bytes, plus its LUT, blob alignment and
    # the larger op description in model.mlmodel
    weight_bytes = sum(v.nbytes for v in originals.values())
    overhead = len(originals) * (2 * (1 << nbits) + 256)
    saved = _size(unet16) - _size(out)
    assert saved >= weight_bytes * (1 - nbits / 16) - overhead
    assert package_info(out).specification_version == 8  # iOS17
    assert package_info(out).inputs == package_info(unet16).inputs
    assert report["min_snr_db"] > {8: 40, 6: 28, 4: 16, 2: 5}[nbits]


def test_sizes_and_snr_order_by_bits(unet16: Path, tmp_path: Path) -> None:
    sizes, snrs = [], []
    for nbits in (8, 4, 2):
        report = palettize_package(unet16, tmp_path / f"u{nbits}.mlpackage",
                                   PalettizeConfig(nbits, deployment_target=DeploymentTarget.iOS17), progress=False)
        sizes.append(report["package_bytes"])
        snrs.append(report["mean_snr_db"])
    assert sizes[0] > sizes[1] > sizes[2]
    assert snrs[0] > snrs[1] > snrs[2]


def test_grouped_channel_needs_and_uses_ios18(source: Path, unet16: Path, tmp_path: Path) -> None:
    with pytest.raises(PalettizeError, match="per_grouped_channel needs an iOS18 program"):
        palettize_package(unet16, tmp_path / "x.mlpackage",
                          PalettizeConfig(4, Granularity.PER_GROUPED_CHANNEL, 16), progress=False)
    ios18 = tmp_path / "unet18.mlpackage"
    convert_component(source, Component.UNET, Attention.ORIGINAL, 256, DeploymentTarget.iOS18, ios18,
                      PackageMetadata("tiny@main", "mit", Attention.ORIGINAL))
    out = tmp_path / "grouped.mlpackage"
    report = palettize_package(ios18, out, PalettizeConfig(4, Granularity.PER_GROUPED_CHANNEL, 16,
                                                           deployment_target=DeploymentTarget.iOS18), progress=False)
    weights = read_palettized_weights(out, decoder="coremltools")
    assert set(weights) == set(_float16_weights(ios18))
    grouped = [name for name, (lut, _, _) in weights.items() if lut.shape[0] > 1]
    assert grouped, "weights with a multiple of 16 output channels get one LUT per group"
    for lut, indices, dense in weights.values():
        assert np.array_equal(lut_lookup(lut, indices), dense)
    per_tensor = palettize_package(ios18, tmp_path / "pt.mlpackage",
                                   PalettizeConfig(4, deployment_target=DeploymentTarget.iOS18), progress=False)
    assert report["mean_snr_db"] > per_tensor["mean_snr_db"]  # more LUTs fit better
    assert report["granularity"] == "per_grouped_channel"


def test_embedding_table_stays_float16(source: Path, tmp_path: Path) -> None:
    text = tmp_path / "te.mlpackage"
    convert_component(source, Component.TEXT_ENCODER, Attention.ORIGINAL, 256, DeploymentTarget.iOS16, text,
                      PackageMetadata("tiny@main", "mit", Attention.ORIGINAL))
    out = tmp_path / "te6.mlpackage"
    palettize_package(text, out, PalettizeConfig(6, min_elements=256, deployment_target=DeploymentTarget.iOS17),
                      progress=False)
    ops = main_operations(load_program(out))
    gathers = [op for op in ops if op.op_type.startswith("gather")]
    assert gathers
    embedding_sources = {op.x.op.op_type for op in gathers if op.x.op is not None}
    assert "const" in embedding_sources and "constexpr_lut_to_dense" not in embedding_sources


def test_recipe_mixed_bits(unet16: Path, tmp_path: Path) -> None:
    names = sorted(_float16_weights(unet16))
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps({names[0]: 8, names[1]: 0, "*conv_in*": 2}))
    recipe, problem = read_recipe(tmp_path, "recipe.json")
    assert problem is None
    report = palettize_package(unet16, tmp_path / "mixed.mlpackage",
                               PalettizeConfig(4, recipe=recipe, deployment_target=DeploymentTarget.iOS17),
                               progress=False)
    bits = {op["op"]: op["nbits"] for op in report["ops"]}
    assert bits[names[0]] == 8
    assert names[1] not in bits  # 0 keeps it float16
    assert {b for n, b in bits.items() if "conv_in" in n} <= {2}
    assert report["mixed"] is True
    assert report["recipe_unmatched"] == []
    unmatched = palettize_package(unet16, tmp_path / "unmatched.mlpackage", PalettizeConfig(
        4, recipe={names[0]: 8, "no_such_op": 2, "*nowhere*": 1}, deployment_target=DeploymentTarget.iOS17),
        progress=False)
    assert unmatched["recipe_unmatched"] == ["*nowhere*", "no_such_op"]


def test_refuses_packages_that_are_not_float16(unet16: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "once.mlpackage"
    palettize_package(unet16, out, PalettizeConfig(6, deployment_target=DeploymentTarget.iOS17), progress=False)
    with pytest.raises(PalettizeError, match="already compressed"):
        palettize_package(out, tmp_path / "twice.mlpackage", PalettizeConfig(6), progress=False)
    # a float32 ML Program
    import numpy as np_
    import torch

    from publisher.convert.components import example_inputs, load_component
    from publisher.convert.coreml import trace
    from publisher.mlpackage import save_package

    ct = import_coremltools()
    loaded = load_component(source, Component.TEXT_ENCODER, Attention.ORIGINAL, 256)
    with torch.no_grad():
        traced = trace(loaded.module, example_inputs(loaded.spec))
    model = ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=(1, 77), dtype=np_.float32)],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                       minimum_deployment_target=ct.target.iOS16, skip_model_load=True)
    fp32 = tmp_path / "fp32.mlpackage"
    save_package(model, fp32)
    with pytest.raises(PalettizeError, match="not a float16 ML Program"):
        palettize_package(fp32, tmp_path / "no.mlpackage", PalettizeConfig(6), progress=False)


def _serialised_by_coremltools(source: Path, palettized: Path, out: Path, target: DeploymentTarget) -> None:
    """The same palettization written the slow way: each const replaced through coremltools' MIL builder and the
    program serialised by ct.convert. Test oracle for the direct proto/weight-file writer."""
    ct = import_coremltools()
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    solutions = {name: (lut, indices) for name, lut, indices in iter_palettized_weights(palettized)}
    program = load_program(source)
    function = program.functions["main"]
    function.opset_version = max(function.opset_version, getattr(ct.target, target.value))
    with function:
        for op in list(function.operations):
            if op.op_type != "const" or op.name not in solutions:
                continue
            lut, indices = solutions[op.name]
            value = op.outputs[0].val
            name, op.name = op.name, op.name + "_float16"
            if lut.ndim == 1:  # iOS16 form
                bits = int(np.log2(lut.size))
                new = mb.constexpr_lut_to_dense(indices=pack_indices(indices, bits), lut=lut, before_op=op, name=name,
                                                shape=np.array(value.shape, dtype=np.uint32))
            else:
                bits = int(np.log2(lut.shape[-2]))
                dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{bits}"))
                new = mb.constexpr_lut_to_dense(indices=indices.astype(dtype), lut=lut, before_op=op, name=name)
            function.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
            function.remove_ops([op])
    model = ct.convert(program, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
                       minimum_deployment_target=function.opset_version, skip_model_load=True)
    model.save(str(out))


def _program_summary(package: Path) -> tuple[int, str, list[tuple[Any, ...]]]:
    """Spec version, opset, and per op: type, name, and for LUT ops each attribute's type and decoded value."""
    spec = read_spec(package)
    reader = WeightReader(PackageFiles.of(package))
    ops = []
    for op in main_block(spec, package).operations:
        entry: tuple[Any, ...] = (op.type, op_name(op))
        if op.type == "constexpr_lut_to_dense":
            values = operand_values(op)
            entry += (tuple(sorted(op.attributes)), tuple(sorted(op.inputs)))
            for key in sorted(values):
                value = values[key]
                entry += (key, value.type.SerializeToString(deterministic=True), value.WhichOneof("value"),
                          reader.read(value).tobytes() if key != "name" else b"")
        ops.append(entry)
    return spec.specificationVersion, spec.mlProgram.functions["main"].opset, ops


@pytest.mark.parametrize(("nbits", "granularity", "target"), [
    (6, Granularity.PER_TENSOR, DeploymentTarget.iOS17),
    (1, Granularity.PER_TENSOR, DeploymentTarget.iOS16),  # a 2-entry LUT is an immediate value, not a blob
    (4, Granularity.PER_TENSOR, DeploymentTarget.iOS18),
    (2, Granularity.PER_GROUPED_CHANNEL, DeploymentTarget.iOS18),
])
def test_direct_writer_matches_coremltools_serialisation(unet16: Path, tmp_path: Path, nbits: int,
                                                         granularity: Granularity, target: DeploymentTarget) -> None:
    ours = tmp_path / "ours.mlpackage"
    palettize_package(unet16, ours, PalettizeConfig(nbits, granularity, 16, deployment_target=target), progress=False)
    theirs = tmp_path / "theirs.mlpackage"
    _serialised_by_coremltools(unet16, ours, theirs, target)
    assert _program_summary(ours) == _program_summary(theirs)
    # and every weight that was not palettized is carried over bit for bit
    ours_consts = {op.name: op.outputs[0].val for op in main_operations(load_program(ours)) if op.op_type == "const"}
    source_consts = {op.name: op.outputs[0].val for op in main_operations(load_program(unet16)) if op.op_type == "const"}
    direct = const_values(unet16)  # the direct reader agrees with coremltools' loader on every const
    assert set(direct) == set(source_consts)
    assert all(np.array_equal(direct[name], source_consts[name]) for name in direct)
    kept = set(source_consts) - set(read_palettized_weights(ours))
    assert len(kept) > len(source_consts) // 2  # biases, norms, shapes, small weights
    for name in kept:
        assert np.array_equal(ours_consts[name], source_consts[name])


def test_lut_snr_equals_dense_snr() -> None:
    rng = np.random.default_rng(5)
    reference = (rng.standard_normal((32, 48)) * 0.1).astype(np.float16)
    luts, indices = palettize_grouped(reference, 4, 8)
    lut = luts.reshape(4, 1, 16, 1)
    dense = lut_lookup(lut, indices)
    assert lut_snr(reference, lut, indices) == pytest.approx(snr(reference, dense), abs=1e-3)
    palette = palettize_tensor(reference, 2)
    assert lut_snr(reference, palette.lut, palette.indices) == pytest.approx(snr(reference, palette.dequantize()),
                                                                             abs=1e-3)


def _brute_force_sse(values: np.ndarray, weights: np.ndarray, k: int) -> float:
    """Least weighted squared error of k contiguous clusters, by the plain O(k n^2) DP."""
    n = len(values)

    def cost(a: int, b: int) -> float:
        w, x = weights[a:b], values[a:b]
        mean = float((w * x).sum() / w.sum())
        return float((w * (x - mean) ** 2).sum())

    best = [cost(0, i) if i else 0.0 for i in range(n + 1)]
    for layer in range(2, k + 1):
        best = [min(best[j] + cost(j, i) for j in range(layer - 1, i)) if i >= layer else np.inf
                for i in range(n + 1)]
    return best[n]


@pytest.mark.parametrize("seed", range(6))
def test_solver_reaches_the_brute_force_optimum(seed: int) -> None:
    from publisher.compress.kmeans import solve_weighted

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    values = np.sort(np.unique(np.round(rng.standard_normal(n) * 3, 2)))
    weights = rng.integers(1, 50, size=len(values)).astype(np.float64)
    if seed % 2:
        weights[rng.integers(0, len(values))] = 10_000  # one heavy value, as in real weight histograms
    for k in (2, 3, 5, len(values)):
        clusters, centroids = solve_weighted(values, weights, k)
        assert np.all(np.diff(clusters) >= 0) and len(centroids) == min(k, len(values))
        sse = float((weights * (values - centroids[clusters]) ** 2).sum())
        assert sse == pytest.approx(_brute_force_sse(values, weights, min(k, len(values))), rel=1e-9, abs=1e-12)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        palettize_tensor(np.array([[1.0, np.inf], [0.5, 0.25]], dtype=np.float16), 2)


def test_solver_is_exact_on_values_spanning_six_orders_of_magnitude() -> None:
    from publisher.compress.kmeans import solve_weighted

    for seed in range(5):
        rng = np.random.default_rng(seed)
        mixed = np.concatenate([rng.standard_normal(25) * 1e-3, rng.standard_normal(6) * 1e3])
        values = np.unique(mixed.astype(np.float16).astype(np.float64))
        weights = rng.integers(1, 10**6, size=len(values)).astype(np.float64)
        for k in (4, 16):
            clusters, centroids = solve_weighted(values, weights, k)
            sse = float((weights * (values - centroids[clusters]) ** 2).sum())
            assert sse == pytest.approx(_brute_force_sse(values, weights, k), rel=1e-9)
