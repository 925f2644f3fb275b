"""The reference executor: kernels against torch, every tiny package against PyTorch, broken conversions caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from publisher.compress.palettize import PalettizeConfig, palettize_package
from publisher.convert.components import example_inputs, load_component, source_dims
from publisher.convert.coreml import PackageMetadata, convert_module
from publisher.deployment import DeploymentTarget
from publisher.mlpackage import import_coremltools
from publisher.verify import executor
from publisher.verify.executor import ExecutorError, run_program
from publisher.verify.fidelity import PSNR_BAR_DB, verify_package
from publisher.vocabulary import Attention, Component
from tests.conftest import RESOLUTION
from tests.helpers import SD_COMPONENTS

pytestmark = pytest.mark.slow  # converts, builds or publishes models


def _program(build, shapes: dict[str, tuple[int, ...]]):  # type: ignore[no-untyped-def]
    """A one-input MIL program built with coremltools' builder."""
    ct = import_coremltools()
    from coremltools.converters.mil.mil import Builder as mb

    (key, shape), = shapes.items()

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(a):  # type: ignore[no-untyped-def]
        return build(mb, a)

    return prog, {key: next(iter(prog.functions["main"].inputs))}


@pytest.mark.parametrize(("stride", "pad", "groups", "dilation"),
                         [(1, (1, 1, 1, 1), 1, 1), (2, (0, 1, 2, 0), 1, 1), (1, (2, 2, 2, 2), 2, 2)])
def test_conv_kernel_matches_torch(stride: int, pad: tuple[int, ...], groups: int, dilation: int) -> None:
    rng = np.random.default_rng(stride + groups)
    x = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    weight = rng.standard_normal((6, 4 // groups, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    prog, names = _program(lambda mb, a: mb.conv(x=a, weight=weight, bias=bias, strides=[stride, stride],
                                                 pad_type="custom", pad=list(pad), dilations=[dilation, dilation],
                                                 groups=groups), {"x": x.shape})
    got = next(iter(run_program(prog, {names["x"]: x}).values()))
    padded = F.pad(torch.from_numpy(x), (pad[2], pad[3], pad[0], pad[1]))
    expected = F.conv2d(padded, torch.from_numpy(weight), torch.from_numpy(bias), stride=stride, dilation=dilation,
                        groups=groups).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_other_kernels_match_torch() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)

    def build(mb, a):  # type: ignore[no-untyped-def]
        up = mb.upsample_nearest_neighbor(x=a, scale_factor_height=2.0, scale_factor_width=2.0)
        act = mb.silu(x=up)
        return mb.reduce_mean(x=act, axes=[1, 3], keep_dims=True), mb.reduce_l2_norm(x=a, axes=[2], keep_dims=False)

    prog, names = _program(build, {"x": x.shape})
    mean, norm = run_program(prog, {names["x"]: x}).values()
    t = torch.from_numpy(x)
    expected = F.silu(F.interpolate(t, scale_factor=2, mode="nearest")).mean(dim=(1, 3), keepdim=True)
    np.testing.assert_allclose(mean, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm, t.norm(dim=2).numpy(), rtol=1e-5)


def test_gather_nd_kernel() -> None:
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    indices = np.array([[4], [1]], dtype=np.int32)
    prog, names = _program(lambda mb, a: mb.gather_nd(x=a, indices=indices, batch_dims=1), {"x": x.shape})
    got = next(iter(run_program(prog, {names["x"]: x}).values()))
    np.testing.assert_array_equal(got, np.stack([x[0, 4], x[1, 1]]))


def test_an_op_nobody_can_evaluate_is_named(converted: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from publisher.mlpackage import load_program

    monkeypatch.delitem(executor.KERNELS, "conv")
    package = converted[Attention.ORIGINAL, Component.VAE_DECODER]
    with pytest.raises(ExecutorError, match=r"cannot evaluate op \S+ of type conv"):
        run_program(load_program(package), {"z": np.zeros((1, 4, 32, 32), dtype=np.float32)})


@pytest.mark.parametrize("attention", list(Attention))
@pytest.mark.parametrize("component", SD_COMPONENTS)
def test_float16_packages_meet_the_bar(converted: dict, tiny_source: Path, attention: Attention,
                                       component: Component) -> None:
    result = verify_package(converted[attention, component], tiny_source, component.value, attention,
                            converted["resolution", component])
    assert result.passed, result.to_json()
    assert result.min_psnr_db >= PSNR_BAR_DB


@pytest.mark.parametrize("attention", list(Attention))
@pytest.mark.parametrize("component", [Component.TEXT_ENCODER, Component.UNET])
def test_6bit_packages_meet_the_bar(converted: dict, tiny_source: Path, tmp_path: Path, attention: Attention,
                                    component: Component) -> None:
    float16 = converted[attention, component]
    palettized = tmp_path / "p.mlpackage"
    palettize_package(float16, palettized, PalettizeConfig(6, min_elements=256,
                                                           deployment_target=DeploymentTarget.iOS17), progress=False)
    result = verify_package(palettized, tiny_source, component.value, attention, RESOLUTION, float16_package=float16)
    assert result.passed, result.to_json()
    assert result.psnr_vs_float_db is not None
    # the graph matches its own decoded weights far better than the float model it approximates
    assert result.min_psnr_db > min(result.psnr_vs_float_db.values())
    # the decoded weights (read one at a time) found their parameters by the sha256 of their float16 bytes; a weight
    # the converter rescaled (the attention scale folded into a query projection) has no byte-equal parameter
    from publisher.compress.palettize import iter_palettized_weights

    ops = sum(1 for _ in iter_palettized_weights(palettized))
    (note,) = result.notes
    replaced = int(note.split()[0])
    assert note.endswith("parameters replaced by their palettize values") and 0.9 * ops <= replaced <= ops


@pytest.mark.parametrize("target", [DeploymentTarget.iOS17, DeploymentTarget.iOS18])
def test_lut_kernel_decodes_as_coremltools_does(converted: dict, tmp_path: Path, target: DeploymentTarget) -> None:
    """The executor decodes palettized weights with the project's decoder: the same values coremltools
    materialises, for the packed iOS16 op and the iOS18 op (grouped-channel LUTs there)."""
    from publisher.compress.palettize_scheme import Granularity
    from publisher.mlpackage import load_program
    from publisher.verify.executor import _lut_to_dense

    palettized = tmp_path / "p.mlpackage"
    config = PalettizeConfig(4, min_elements=256, deployment_target=target) if target is DeploymentTarget.iOS17 \
        else PalettizeConfig(4, min_elements=256, deployment_target=target,
                             granularity=Granularity.PER_GROUPED_CHANNEL, group_size=8)
    palettize_package(converted[Attention.ORIGINAL, Component.UNET], palettized, config, progress=False)
    ops = [op for op in load_program(palettized).functions["main"].operations
           if op.op_type == "constexpr_lut_to_dense"]
    assert ops
    for op in ops:
        ours = _lut_to_dense(op, {})
        theirs = op.materialized_val_inference()
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and np.array_equal(ours, theirs), op.name


class _SwappedChannels(torch.nn.Module):
    """Test-only broken conversion: the decoder's output channels in the wrong order (BGR for RGB)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z)[:, [2, 1, 0]]


class _DroppedBias(torch.nn.Module):
    """Test-only broken conversion: the latent projection (post_quant_conv) loses its bias."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        assert inner.post_quant_conv.bias.abs().max() > 0
        inner.post_quant_conv.bias.data.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z)


@pytest.mark.parametrize("breaker", [_SwappedChannels, _DroppedBias])
def test_broken_conversion_is_caught(tiny_source: Path, tmp_path: Path, breaker) -> None:  # type: ignore[no-untyped-def]
    component = Component.VAE_DECODER
    loaded = load_component(tiny_source, component, Attention.ORIGINAL, RESOLUTION)
    package = tmp_path / "broken.mlpackage"
    convert_module([breaker(loaded.module)], loaded.spec, example_inputs(loaded.spec), DeploymentTarget.iOS16,
                   PackageMetadata("tiny/sd@main", "mit", Attention.ORIGINAL), package)
    result = verify_package(package, tiny_source, component.value, Attention.ORIGINAL, RESOLUTION)
    assert not result.passed, result.to_json()
    assert result.min_psnr_db < PSNR_BAR_DB
    from publisher.verify.contract import contract_problems

    # the interface is right: only the numbers can tell
    assert contract_problems(package, component.value, source_dims(tiny_source, RESOLUTION)) == []


def test_decoded_weights_digest_names_what_pytorch_runs() -> None:
    """Equal for the same decoded weights replacing the same float16 weights (in any order, under other op
    names); different when one value, a shape or the weight it replaces differs."""
    from publisher.verify.fidelity import decoded_weights_digest

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 8)).astype(np.float16), rng.standard_normal(16).astype(np.float16)
    base = decoded_weights_digest({"w1": a, "w2": b}, {"w1": "f1", "w2": "f2"})
    assert decoded_weights_digest({"x2": b, "x1": a}, {"x1": "f1", "x2": "f2"}) == base
    changed = a.copy()
    changed[0, 0] = np.float16(changed[0, 0] + 1)
    assert decoded_weights_digest({"w1": changed, "w2": b}, {"w1": "f1", "w2": "f2"}) != base
    assert decoded_weights_digest({"w1": a.reshape(8, 4), "w2": b}, {"w1": "f1", "w2": "f2"}) != base
    assert decoded_weights_digest({"w1": a, "w2": b}, {"w1": "f2", "w2": "f1"}) != base
    assert decoded_weights_digest({"w1": a, "w2": b}, {}) != base  # matched by name, not by the float16 weight
