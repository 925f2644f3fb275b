"""Conversion on a tiny SD-shaped model: rewritten attention matches diffusers, packages meet the contract."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from publisher.contract import ModelDims
from publisher.convert.chunk import UnetChunk1, UnetChunk2, chunk_specs, convert_unet_chunks
from publisher.convert.components import example_inputs, load_component
from publisher.convert.coreml import PackageMetadata, convert_isolated
from publisher.deployment import DeploymentTarget
from publisher.engine.source import fetch_source
from publisher.errors import SourceError
from publisher.families.sd import sd_model_spec as model_spec
from publisher.family import family_named
from publisher.metrics import psnr
from publisher.mlpackage import load_program, main_operations, package_info
from publisher.tiny import build_tiny_pipeline
from publisher.vocabulary import Attention, Component
from tests.helpers import SD_COMPONENTS

pytestmark = pytest.mark.slow  # converts, builds or publishes models

RESOLUTION = 256


def _outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        result = module(*inputs)
    result = result if isinstance(result, tuple) else (result,)
    return tuple(r.numpy() for r in result)


@pytest.mark.parametrize("attention", list(Attention))
def test_ane_unet_matches_diffusers(tiny_source: Path, attention: Attention) -> None:
    """Every attention implementation runs the ANE-shaped UNet; in float32 it is diffusers' UNet (>= 60 dB)."""
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(tiny_source / "unet").eval()
    rewritten = load_component(tiny_source, Component.UNET, attention, RESOLUTION)
    assert {k.removeprefix("unet.unet.") for k in rewritten.module.state_dict()} == set(reference.state_dict())
    assert not any(isinstance(m, torch.nn.Linear) for m in rewritten.module.modules()), "a linear layer is left"
    inputs = example_inputs(rewritten.spec)
    sample, timestep, context = inputs
    with torch.no_grad():
        expected = reference(sample, timestep, context.squeeze(2).transpose(1, 2)).sample.numpy()
    assert psnr(expected, _outputs(rewritten.module, inputs)[0]) >= 60


def test_ane_unet_loads_a_diffusers_state_dict_unchanged(tiny_source: Path) -> None:
    from diffusers import UNet2DConditionModel

    from publisher.convert.attention import original_core
    from publisher.convert.unet import AneUnet

    trained = UNet2DConditionModel.from_pretrained(tiny_source / "unet").eval()
    config = UNet2DConditionModel.load_config(tiny_source / "unet")
    fresh = AneUnet(UNet2DConditionModel.from_config(config).eval(), original_core)
    fresh.load_diffusers_state_dict(trained.state_dict())  # 2-D linear weights become 1x1 conv weights
    inputs = example_inputs(model_spec(Component.UNET, ModelDims(resolution=RESOLUTION, text_hidden=32)))
    with torch.no_grad():
        expected = trained(inputs[0], inputs[1], inputs[2].squeeze(2).transpose(1, 2)).sample.numpy()
        assert psnr(expected, fresh(*inputs).numpy()) >= 60


@pytest.mark.parametrize("component", [Component.VAE_DECODER, Component.VAE_ENCODER])
def test_vae_is_diffusers_own_for_every_attention(tiny_source: Path, component: Component) -> None:
    """Apple's converter traces the VAE unchanged whatever the attention implementation (a "pure ConvNet" to it):
    every attention gets diffusers' own attention module and the very same outputs."""
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    loaded = {attention: load_component(tiny_source, component, attention, RESOLUTION) for attention in Attention}
    inputs = example_inputs(loaded[Attention.ORIGINAL].spec)
    expected = _outputs(loaded[Attention.ORIGINAL].module, inputs)
    for attention, component_module in loaded.items():
        assert any(isinstance(m, DiffusersAttention) for m in component_module.module.modules()), attention
        for ref, out in zip(expected, _outputs(component_module.module, inputs), strict=True):
            assert np.array_equal(ref, out), attention


def test_safety_checker_agrees_with_diffusers(tiny_source: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    original = StableDiffusionSafetyChecker.from_pretrained(tiny_source / "safety_checker").eval()
    wrapper = load_component(tiny_source, Component.SAFETY_CHECKER, Attention.ORIGINAL, RESOLUTION).module
    samples = []
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        samples.append((torch.rand((1, 3, 224, 224), generator=generator) * 2 - 1,
                        torch.rand((1, RESOLUTION, RESOLUTION, 3), generator=generator)))
    # thresholds that flag about half of the samples: concept 0 at the median score, the rest never
    with torch.no_grad():
        embeds = torch.cat([original.visual_projection(original.vision_model(c)[1]) for c, _ in samples])
        cosine = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(original.concept_embeds).T
        for checker in (original, wrapper):
            checker.concept_embeds_weights.fill_(2.0)
            checker.concept_embeds_weights[0] = cosine[:, 0].median()
            checker.special_care_embeds_weights.fill_(2.0)
    flags = []
    for clip_input, images in samples:
        with torch.no_grad():
            _, expected = original(clip_input=clip_input, images=images.numpy().copy())
            filtered, has_nsfw, _ = wrapper(clip_input, images, torch.zeros(1))
        flags.append(bool(expected[0]))
        assert has_nsfw.shape == (1, 1, 1, 1)  # Apple's shape
        assert bool(has_nsfw.flatten()[0] > 0.5) == bool(expected[0])
        assert torch.equal(filtered, torch.zeros_like(images) if expected[0] else images)
    assert any(flags) and not all(flags), "the sample should contain flagged and clean images"


def test_safety_checker_adjustment_moves_the_special_care_scores_only(tiny_source: Path) -> None:
    """Apple's semantics: `adjustment` is added to the special-care scores; a special-care hit adds 0.01 to every
    concept score, never the adjustment itself."""
    wrapper = load_component(tiny_source, Component.SAFETY_CHECKER, Attention.ORIGINAL, RESOLUTION).module
    generator = torch.Generator().manual_seed(3)
    clip_input = torch.rand((1, 3, 224, 224), generator=generator) * 2 - 1
    images = torch.rand((1, RESOLUTION, RESOLUTION, 3), generator=generator)
    with torch.no_grad():
        wrapper.special_care_embeds_weights.fill_(1.5)  # no special-care hit without adjustment (cosine <= 1)
        _, _, base = wrapper(clip_input, images, torch.zeros(1))
        _, _, small = wrapper(clip_input, images, torch.full((1,), 0.25))
        _, _, large = wrapper(clip_input, images, torch.full((1,), 3.0))
    assert torch.equal(small, base)  # 0.25 does not lift any special-care score over 0
    assert torch.allclose(large - base, torch.full_like(base, 0.01), atol=1e-6)


@pytest.mark.parametrize("attention", list(Attention))
@pytest.mark.parametrize("component", SD_COMPONENTS)
def test_package_interface_is_the_contract(converted: dict, tiny_source: Path, attention: Attention,
                                           component: Component) -> None:
    info = package_info(converted[attention, component])
    spec = model_spec(component, ModelDims(resolution=converted["resolution", component], text_hidden=32))
    assert info.is_mlprogram
    assert [(t.name, t.shape, t.dtype) for t in info.inputs] == [(t.name, t.shape, t.dtype) for t in spec.inputs]
    assert [(t.name, t.shape, t.dtype) for t in info.outputs] == [(t.name, t.shape, t.dtype) for t in spec.outputs]
    # Apple's converter: every input float16 but the token ids; every output float32
    assert [t.dtype for t in info.inputs] == ["float32" if t.name == "input_ids" else "float16" for t in info.inputs]
    assert {t.dtype for t in info.outputs} == {"float32"}
    # a component the attention does not change is converted once (the fixture: with ORIGINAL's metadata)
    changed = family_named("sd").component(component).uses_attention
    assert info.metadata["com.github.coreml-publisher.attention"] == (attention if changed else Attention.ORIGINAL).value


def _op_counts(package: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in main_operations(load_program(package)):
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts


def _attention_layers(tiny_source: Path) -> int:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    unet = UNet2DConditionModel.from_pretrained(tiny_source / "unet")
    return sum(1 for m in unet.modules() if isinstance(m, DiffusersAttention))


def _assert_ane_structure(package: Path, attention: Attention, layers: int) -> dict[str, int]:
    counts = _op_counts(package)
    assert counts.get("linear", 0) == 0, counts
    if attention is Attention.ORIGINAL:
        assert counts.get("transpose", 0) == 0, counts
    else:
        assert counts.get("matmul", 0) == 0, counts
        assert counts.get("transpose", 0) <= layers, counts
    return counts


@pytest.mark.parametrize("attention", list(Attention))
def test_unet_has_the_neural_engine_structure(converted: dict, tiny_source: Path, attention: Attention) -> None:
    layers = _attention_layers(tiny_source)
    counts = _assert_ane_structure(converted[attention, Component.UNET], attention, layers)
    if attention is Attention.ORIGINAL:
        assert counts.get("matmul", 0) == 2 * layers, counts  # scores and output, per layer
    else:
        assert counts.get("transpose", 0) == layers, counts  # the keys, once per layer
        assert counts.get("einsum", 0) >= 2 * layers, counts


def _ops_with_two_long_axes(package: Path, limit: int = 512) -> list[str]:
    found = []
    for op in main_operations(load_program(package)):
        for value in op.outputs:
            shape = getattr(value, "shape", ()) or ()
            if sum(1 for d in shape if isinstance(d, int) and d > limit) >= 2:
                found.append(f"{op.op_type} {op.name} {shape}")
    return found


def test_split_einsum_v2_keeps_query_chunks_at_512(converted: dict) -> None:
    # the tiny UNet attends over 32x32 = 1024 positions at its first level: more than one chunk
    assert _ops_with_two_long_axes(converted[Attention.SPLIT_EINSUM_V2, Component.UNET]) == []
    # the check can fail: SPLIT_EINSUM builds (1024 keys x 1024 queries) score tensors
    assert _ops_with_two_long_axes(converted[Attention.SPLIT_EINSUM, Component.UNET])


@pytest.mark.parametrize("attention", list(Attention))
def test_chunked_unet_composes_to_the_whole(tiny_source: Path, tmp_path: Path, attention: Attention) -> None:
    loaded = load_component(tiny_source, Component.UNET, attention, RESOLUTION)
    example = example_inputs(loaded.spec)
    specs, intermediates = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
    with torch.no_grad():
        whole = loaded.module(*example).numpy()
        composed = UnetChunk2(loaded.module, specs.cut)(example[2], *intermediates).numpy()
        assert len(UnetChunk1(loaded.module, specs.cut)(*example)) == len(specs.chunk1_outputs)
    assert psnr(whole, composed) > 100
    paths = convert_unet_chunks(tiny_source, attention, RESOLUTION, DeploymentTarget.iOS16,
                                (tmp_path / "c1.mlpackage", tmp_path / "c2.mlpackage"),
                                PackageMetadata("tiny/sd@main", "mit", attention))
    first, second = (package_info(Path(p)) for p in paths)
    assert [(t.name, t.dtype) for t in first.inputs] == [
        ("sample", "float16"), ("timestep", "float16"), ("encoder_hidden_states", "float16")]
    assert {t.dtype for t in first.outputs} == {"float32"}
    # the Swift pipeline feeds chunk 1's outputs merged with the UNet's inputs to chunk 2, by name
    chained = {(t.name, t.shape, t.dtype) for t in first.outputs} | {
        (t.name, t.shape, t.dtype) for t in first.inputs}
    assert {(t.name, t.shape, t.dtype) for t in second.inputs} <= chained
    assert [(t.name, t.shape, t.dtype) for t in second.outputs] == [("noise_pred", (2, 4, 32, 32), "float32")]
    layers = _attention_layers(tiny_source)
    for path in paths:
        _assert_ane_structure(Path(path), attention, layers)
    sizes = [(Path(p) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size for p in paths]
    assert abs(sizes[0] - sizes[1]) <= 0.1 * max(sizes), sizes  # cut where the weight bytes split in half


def _tree_digest(package: Path) -> dict[str, str]:
    return {str(p.relative_to(package)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(package.rglob("*")) if p.is_file()}


def test_isolated_conversion_is_byte_identical(tiny_source: Path, converted: dict, tmp_path: Path) -> None:
    again = tmp_path / "te.mlpackage"
    result = convert_isolated(tiny_source, Component.TEXT_ENCODER, Attention.ORIGINAL, RESOLUTION,
                              DeploymentTarget.iOS16, again, PackageMetadata("tiny/sd@main", "mit", Attention.ORIGINAL))
    assert result.outputs == ["last_hidden_state", "pooled_outputs"]
    assert _tree_digest(again) == _tree_digest(converted[Attention.ORIGINAL, Component.TEXT_ENCODER])


def test_missing_component_is_one_clear_line(tmp_path: Path) -> None:
    source = build_tiny_pipeline(tmp_path / "sd2", components=(Component.TEXT_ENCODER, Component.UNET))
    with pytest.raises(SourceError) as info:
        load_component(source, Component.SAFETY_CHECKER, Attention.ORIGINAL, RESOLUTION, label="org/sd2@main")
    assert str(info.value) == ("source org/sd2@main has no safety_checker (folder safety_checker/ with a config.json "
                               "is missing); drop it from the manifest's components")


def test_fetch_source_from_the_hub(tiny_source: Path, hf_api, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hf_api.create_repo("tiny/sd-source", exist_ok=True)
    commit = hf_api.upload_folder(folder_path=tiny_source, repo_id="tiny/sd-source").oid
    fetched = fetch_source("tiny/sd-source", "main", [Component.UNET, Component.TEXT_ENCODER], tmp_path / "cache",
                           endpoint=staging_hub.url, token=staging_hub.token)
    assert fetched.commit == commit
    assert (fetched.path / "unet" / "config.json").exists()
    assert (fetched.path / "tokenizer" / "merges.txt").exists()
    assert not (fetched.path / "safety_checker").exists()  # only what the components need
    with pytest.raises(SourceError, match=r"^source tiny/sd-source has no revision 'v9'$"):
        fetch_source("tiny/sd-source", "v9", [Component.UNET], tmp_path / "cache", endpoint=staging_hub.url,
                     token=staging_hub.token)
    hf_api.create_repo("tiny/sd2-source", exist_ok=True)
    hf_api.upload_folder(folder_path=tiny_source, repo_id="tiny/sd2-source", ignore_patterns=["safety_checker/*"])
    with pytest.raises(SourceError, match=r"^source tiny/sd2-source@main has no safety_checker"):
        fetch_source("tiny/sd2-source", "main", [Component.SAFETY_CHECKER], tmp_path / "cache",
                     endpoint=staging_hub.url, token=staging_hub.token)


@pytest.mark.parametrize("component", [Component.UNET, Component.VAE_DECODER])
def test_weights_equal_a_plain_coremltools_conversion(converted: dict, tiny_source: Path, component: Component) -> None:
    """The two-phase conversion (float32 weights replaced one at a time, cast by torch) stores the same float16
    weights as coremltools' own one-call conversion of the same traced module."""
    from publisher.mlpackage import import_coremltools

    ct = import_coremltools()
    attention = Attention.SPLIT_EINSUM_V2
    loaded = load_component(tiny_source, component, attention, RESOLUTION)
    traced = torch.jit.trace(loaded.module.eval(), example_inputs(loaded.spec), check_trace=False)
    plain = ct.convert(traced, inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(t.dtype).type)
                                       for t in loaded.spec.inputs],
                       outputs=[ct.TensorType(name=t.name, dtype=np.dtype(t.dtype).type) for t in loaded.spec.outputs],
                       convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                       minimum_deployment_target=ct.target.iOS16, skip_model_load=True)

    def weights(program: object) -> list[str]:
        values = [op.val.val for op in main_operations(program) if op.op_type == "const"]
        return sorted(hashlib.sha256(v.tobytes()).hexdigest() for v in values
                      if isinstance(v, np.ndarray) and v.dtype == np.float16 and v.size >= 256)

    ours = weights(load_program(converted[attention, component]))
    assert len(ours) > 10 and ours == weights(plain._mil_program)


def test_float16_cast_is_numpys_bit_for_bit() -> None:
    from publisher.convert.coreml import to_float16

    rng = np.random.default_rng(0)
    values = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-10, 7, 200_000)).astype(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, -65520, 6.1e-5, 5.96e-8, 2.98e-8,
                      2.9e-8, 1e-40, 1e30], dtype=np.float32)
    values = np.concatenate([values, edges, np.nextafter(edges, np.float32(np.inf))])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    assert np.array_equal(to_float16(values).view(np.uint16), expected.view(np.uint16))


def _make_temporary_package() -> tuple[str, bool]:
    """What coremltools does for every converted model: a package folder made with tempfile, left for exit."""
    import tempfile

    folder = tempfile.mkdtemp(suffix=".mlpackage")
    Path(folder, "weight.bin").write_bytes(b"\0" * 1024)
    return folder, Path(folder).exists()


def test_isolated_steps_leave_no_temporary_files() -> None:
    """A process forked from the server ends without exit handlers (coremltools' clean-up of its temporary
    packages): each step gets a temp folder of its own, removed when it returns."""
    from publisher.convert.coreml import run_isolated

    folder, existed = run_isolated(_make_temporary_package)
    assert existed and Path(folder).parent.name.startswith("publisher-step-")
    assert not Path(folder).exists() and not Path(folder).parent.exists()


@pytest.mark.parametrize(("attention", "component"), [(Attention.SPLIT_EINSUM_V2, Component.UNET),
                                                      (Attention.ORIGINAL, Component.VAE_DECODER),
                                                      (Attention.ORIGINAL, Component.TEXT_ENCODER)])
def test_one_validation_per_pipeline_converts_byte_for_byte(converted: dict, tiny_source: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, attention: Attention,
                                                            component: Component) -> None:
    """The conversion that validates the program once per pass pipeline writes the very package coremltools' own
    pipeline manager (a validation after every pass) writes."""
    import contextlib

    from publisher.convert import coreml

    monkeypatch.setattr(coreml, "_validated_once_per_pipeline", contextlib.nullcontext)
    again = tmp_path / "again.mlpackage"
    coreml.convert_component(tiny_source, component, attention, RESOLUTION, DeploymentTarget.iOS16, again,
                             PackageMetadata("tiny/sd@main", "mit", attention))
    assert _tree_digest(again) == _tree_digest(converted[attention, component])


def test_a_pipeline_that_breaks_the_program_is_still_refused() -> None:
    """The one validation at the end of a pipeline catches what a pass broke."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.block import InvalidBlockStateError
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline, PassPipelineManager
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    from publisher.convert.coreml import _validated_once_per_pipeline

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.relu(x=mb.add(x=x, y=1.0))

    class Break:
        def set_options(self, options: object) -> None:
            return None

        def __call__(self, program: object) -> None:  # the add's output claims a second consumer
            ops = list(program.functions["main"].operations)  # type: ignore[attr-defined]
            add = next(op for op in ops if op.op_type == "add")
            add.outputs[0]._child_ops.append(add)

    PASS_REGISTRY.passes["test::break_program"] = Break()
    try:
        pipeline = PassPipeline(pass_names=["common::noop_elimination", "test::break_program"],
                                pipeline_name="broken")
        with _validated_once_per_pipeline(), pytest.raises(InvalidBlockStateError):
            PassPipelineManager.apply_pipeline(prog, pipeline)
        assert "test::break_program" in PASS_REGISTRY.passes
    finally:
        del PASS_REGISTRY.passes["test::break_program"]


def test_a_killed_steps_temp_folder_is_removed_and_a_running_ones_kept(tmp_path: Path) -> None:
    import subprocess
    import sys

    from publisher.convert.coreml import STEP_FOLDER_PREFIX, remove_stale_step_folders

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = tmp_path / f"{STEP_FOLDER_PREFIX}{gone.stdout.strip()}-abc"
    (dead / "tmp1.mlpackage").mkdir(parents=True)
    (dead / "tmp1.mlpackage" / "weight.bin").write_bytes(b"\0" * 1024)
    running = tmp_path / f"{STEP_FOLDER_PREFIX}{os.getpid()}-def"
    running.mkdir()
    other = tmp_path / "publisher-hf-home-xyz"
    other.mkdir()
    assert remove_stale_step_folders(tmp_path) == 1
    assert not dead.exists() and running.is_dir() and other.is_dir()


def _torch_threads() -> int:
    return torch.get_num_threads()


def test_an_isolated_step_runs_with_the_threads_it_is_given() -> None:
    from publisher.convert.coreml import run_isolated

    assert run_isolated(_torch_threads, threads=1) == 1
    assert run_isolated(_torch_threads) == torch.get_num_threads()  # not told: torch's default, as here


@pytest.mark.parametrize("attention", list(Attention))
def test_unet_weights_are_pytorchs_to_q_included(converted: dict, tiny_source: Path, attention: Attention) -> None:
    """Every UNet weight of a package is its PyTorch parameter in float16, byte for byte: the attention scale
    multiplies the scores, as in Apple's converter, so it is not folded into `to_q` (Apple's apply script and our
    verification match weights by value)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_source / "unet")
    params = {name: p.detach().numpy().astype(np.float16) for name, p in unet.named_parameters()
              if p.dim() >= 2 and p.numel() >= 256}
    by_bytes = {hashlib.sha256(v.reshape(-1).tobytes()).hexdigest(): name for name, v in params.items()}
    package_weights = {hashlib.sha256(op.val.val.reshape(-1).tobytes()).hexdigest()
                       for op in main_operations(load_program(converted[attention, Component.UNET]))
                       if op.op_type == "const" and isinstance(op.val.val, np.ndarray)
                       and op.val.val.dtype == np.float16 and op.val.val.size >= 256}
    missing = sorted(name for digest, name in by_bytes.items() if digest not in package_weights)
    assert any(name.endswith("to_q.weight") for name in params)
    assert missing == []


def test_generate_judges_an_image_with_the_safety_checker_as_diffusers_does(converted: dict, tiny_source: Path
                                                                             ) -> None:
    """The Swift SafetyChecker's input (the image resized whole to 224, ImageNet statistics) through the package on
    the executor: the same verdict as diffusers' checker on that input, flagged and unflagged images both seen."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from publisher.generate import is_safe, safety_input
    from publisher.verify.runtime import ExecutorRuntime

    package = converted[Attention.ORIGINAL, Component.SAFETY_CHECKER]
    checker = ExecutorRuntime().open(package)
    reference = StableDiffusionSafetyChecker.from_pretrained(tiny_source / "safety_checker").eval()
    verdicts = []
    for seed in range(8):
        image = np.random.RandomState(seed).randint(0, 256, (256, 256, 3)).astype(np.uint8)
        clip_input = torch.from_numpy(safety_input(image, 224))
        with torch.no_grad():
            _, flagged = reference(clip_input=clip_input, images=np.zeros((1, 256, 256, 3), np.float32))
        verdicts.append((is_safe(checker, package, image), not flagged[0]))
    assert all(ours == theirs for ours, theirs in verdicts), verdicts
    assert {ours for ours, _ in verdicts} == {True, False}  # the check can fail either way
