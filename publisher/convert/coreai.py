"""Core AI assets (`.aimodel`, iOS/macOS 27) of an SD 1.x/2.x pipeline, as Apple's Swift Core AI diffusion pipeline
loads them (apple/coreai-models `CoreAIDiffusionPipeline`).

Each component is one program with a function `main`, converted by coreai-torch from `torch.export` of a thin
wrapper, in the precision of the variant (float16: the Swift pipeline converts its float inputs to what a function
declares). Names, shapes and dtypes as that pipeline feeds them (positionally, in this order):

- `TextEncoder`: `input_ids` int32 (1, 77) -> `last_hidden_state` (1, 77, C) (the Swift loader wants exactly one
  input and a rank-3 output);
- `Unet`: `sample` (2, 4, h, w), `timestep` (2,), `encoder_hidden_states` (2, 77, C) -> `noise_pred`; the pipeline
  checks its image size against `sample`'s height x 8;
- `VAEDecoder`: `z` (1, 4, h, w), the latents already divided by the scale factor -> `image` (1, 3, H, W) in [-1, 1];
- `VAEEncoder`: `image` (1, 3, H, W) in [-1, 1] -> `latent_params` (1, 8, h, w) (mean and log-variance).

Nearest-neighbour 2x upsampling is written as two `repeat_interleave`s: Core AI's GPU graph does not take a
nearest-neighbour interpolate (the op falls back to the CPU, a copy each way at every upsampler).

The bytes are made reproducible: Core AI's generated function names are drawn from a seeded generator around the
export, its metadata is written with sorted keys and the creation date given (not the clock), so the same inputs give
the same files and a re-export that changes nothing republishes nothing.
"""

from __future__ import annotations

import json
import logging
import random
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from publisher.coreai_bundle import ASSETS, COMPRESSIBLE, CoreAICompression
from publisher.errors import SourceError, ToolchainError
from publisher.vocabulary import Component

# Apple's INT4 preset: per block of 32 input channels, on weights of at least 32768 values (smaller ones, such as the
# UNet's conv_in with its 4 input channels, cannot be cut in blocks of 32 and stay float16). A palettization takes
# weights from the Core ML packages' threshold on (coremltools' 2048).
INT4_BLOCK = 32
MIN_ELEMENTS = {"int4": 32768, "palettize": 2048}
_SEED = 20260601  # the converter's generated names: any fixed seed


class _TextEncoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids.to(torch.long)).last_hidden_state


class _Unet(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        return self.model(sample, timestep, encoder_hidden_states).sample


class _VAEDecoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample


class _VAEEncoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image).latent_dist.parameters


def _upsample_by_repeat(self: Any, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any
                        ) -> torch.Tensor:
    """diffusers' Upsample2D (nearest, 2x, then its conv) with the interpolation as two repeat_interleaves."""
    hidden_states = hidden_states.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    if self.use_conv:
        conv = self.conv if getattr(self, "name", "conv") == "conv" else self.Conv2d_0
        hidden_states = conv(hidden_states)
    return hidden_states


def _repeat_upsamplers(module: nn.Module) -> None:
    from diffusers.models.upsampling import Upsample2D

    for child in module.modules():
        if isinstance(child, Upsample2D) and not child.use_conv_transpose and child.interpolate \
                and getattr(child, "norm", None) is None:
            child.forward = types.MethodType(_upsample_by_repeat, child)  # type: ignore[method-assign]


def load_wrapper(source: Path, component: Component, dtype: torch.dtype) -> nn.Module:
    """The component of a diffusers SD folder, wrapped to Apple's interface, in `dtype`."""
    if component not in ASSETS:
        raise SourceError(f"no Core AI asset for component '{component.value}'")
    if component == Component.TEXT_ENCODER:
        from transformers import CLIPTextModel

        module: nn.Module = _TextEncoder(CLIPTextModel.from_pretrained(Path(source) / "text_encoder"))
    elif component == Component.UNET:
        from diffusers import UNet2DConditionModel

        module = _Unet(UNet2DConditionModel.from_pretrained(Path(source) / "unet"))
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(source) / "vae")
        module = _VAEDecoder(vae) if component == Component.VAE_DECODER else _VAEEncoder(vae)
    _repeat_upsamplers(module)
    return module.eval().to(dtype)


def example_inputs(module: nn.Module, component: Component, resolution: int, dtype: torch.dtype,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the asset's shapes and dtypes (a square image of `resolution` pixels)."""
    generator = torch.Generator().manual_seed(seed)
    latent = resolution // 8
    inner: Any = module.model
    if component == Component.TEXT_ENCODER:
        vocab = int(inner.config.vocab_size)
        ids = torch.randint(0, vocab, (1, 77), generator=generator, dtype=torch.int64)
        return (ids.to(torch.int32),)
    if component == Component.UNET:
        config = inner.config
        width = config.cross_attention_dim
        width = width[0] if isinstance(width, (list, tuple)) else width
        return (torch.randn(2, config.in_channels, latent, latent, generator=generator).to(dtype),
                torch.tensor([999.0, 999.0]).to(dtype),
                torch.randn(2, 77, int(width), generator=generator).to(dtype))
    if component == Component.VAE_DECODER:
        channels = int(inner.config.latent_channels)
        return (torch.randn(1, channels, latent, latent, generator=generator).to(dtype),)
    return ((torch.rand(1, 3, resolution, resolution, generator=generator) * 2 - 1).to(dtype),)


# the modules of coreai's authoring API that draw generated function names (`secrets.choice`)
_NAMING_MODULES = ("coreai.authoring.graph_builder", "coreai.authoring.func", "coreai.authoring.metal")


@contextmanager
def _seeded_names() -> Iterator[None]:
    """Core AI names generated functions with `secrets.choice` suffixes (unique within a program, different on every
    run): drawn from a seeded generator here, so that the same program gives the same bytes."""
    import importlib

    chooser = random.Random(_SEED).choice
    modules = [importlib.import_module(name) for name in _NAMING_MODULES]
    saved = [module.choice for module in modules]
    for module in modules:
        module.choice = chooser  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.choice = original  # type: ignore[attr-defined]


def to_program(module: nn.Module, inputs: tuple[torch.Tensor, ...], component: Component) -> Any:
    """The Core AI program of `module` (coreai-torch over torch.export with Core AI's decompositions)."""
    import coreai_torch

    _, input_names, output_names = ASSETS[component]

    def export(wrapped: nn.Module) -> Any:
        with torch.no_grad():
            exported = torch.export.export(wrapped, args=inputs)
        return exported.run_decompositions(coreai_torch.get_decomp_table())

    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    converter.add_pytorch_module(module, export_fn=export, input_names=input_names, output_names=output_names)
    return converter.to_coreai()


class _Skips(logging.Handler):
    """coreai-opt's warnings: it skips a weight it fails to compress with a warning only."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip().splitlines()[0])


def compress_program(program: Any, compression: CoreAICompression) -> Any:
    """Core AI's own weight compression (coreai-opt), in place; float16 leaves the program as it is. A weight it
    skips (it only logs that) is an error here."""
    if compression.kind == "float16":
        return program
    from coreai_opt.coreai_utils import CompressionGranularity, DType, palettize_weights, quantize_weights
    from coreai_opt.coreai_utils.common import QScheme

    skips = _Skips()
    logger = logging.getLogger("coreai_opt")
    logger.addHandler(skips)
    try:
        if compression.kind == "int4":
            program = quantize_weights(program, dtype=DType.INT4, qscheme=QScheme.SYMMETRIC,
                                       granularity=CompressionGranularity.PER_BLOCK, block_size=INT4_BLOCK,
                                       weight_num_threshold=MIN_ELEMENTS["int4"], in_place=True)
        else:
            program = palettize_weights(program, lut_dtype=None, n_bits=compression.nbits,
                                        granularity=CompressionGranularity.PER_TENSOR,
                                        weight_num_threshold=MIN_ELEMENTS["palettize"], in_place=True,
                                        num_kmeans_workers=1)  # its worker pool hangs when forked after torch
    finally:
        logger.removeHandler(skips)
    failed = [m for m in skips.messages if "skip" in m.lower() or "fail" in m.lower()]
    if failed:
        raise ToolchainError(f"the {compression.label} compression left {len(failed)} weight(s) uncompressed: "
                             f"{failed[0]}")
    return program


def storage_types(asset: Path) -> dict[str, int]:
    """How many stored values of each type the saved asset holds (the summary Core AI reads from it)."""
    from coreai.authoring import AIModelAsset

    summary = AIModelAsset.load(asset).summary()
    if summary is None:
        raise ToolchainError(f"{asset}: Core AI cannot read the saved asset's summary")
    return {str(kind): int(count) for kind, count in summary.storage_types}


def compressible_elements(module: nn.Module, compression: CoreAICompression) -> int:
    """How many weight values a compression should store packed, about: the convolution and linear weights of at
    least its threshold (coreai-opt picks the constants of the ops it compresses by its own rule); 0 for float16."""
    if compression.kind == "float16":
        return 0
    least = MIN_ELEMENTS[compression.kind]
    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() >= least)


def check_compressed(asset: Path, compression: CoreAICompression, expected: int) -> dict[str, int]:
    """The saved asset stores the compressed type for (nearly) every weight that should be (`expected` values):
    the check on what was written, beside the skip warnings `compress_program` turns into errors. Returns the
    stored value counts by type."""
    types_ = storage_types(asset)
    if compression.kind == "float16" or expected == 0:
        return types_
    packed = sum(count for kind, count in types_.items() if kind in _PACKED[compression.kind](compression.nbits))
    if packed < COMPRESSED_SHARE * expected:
        raise ToolchainError(f"{asset.name}: the {compression.label} compression did not happen ({packed} of about "
                             f"{expected} weight values stored compressed; stored values by type: "
                             f"{json.dumps(types_, sort_keys=True)})")
    return types_


# coreai-opt leaves the odd weight whose consumer it does not compress (a time-embedding linear): a few percent
COMPRESSED_SHARE = 0.9
_PACKED = {"int4": lambda _: ("Int4", "UInt4"), "palettize": lambda n: (f"UInt{n}", f"Int{n}")}


def save_asset(program: Any, output: Path, author: str, license_name: str, description: str, created: float
               ) -> None:
    """The program as `output` (an `.aimodel` folder) with its metadata; the creation date given, not now."""
    from coreai.runtime import AIModelAssetMetadata

    metadata = AIModelAssetMetadata()
    metadata.author, metadata.license, metadata.model_description = author, license_name, description
    asset = program.save_asset(Path(output), metadata)

    def dated(fields: Any) -> None:
        fields.creation_date = created

    asset.update_metadata(updates=dated)
    # written again with its keys in order: Core AI writes them in no fixed order
    path = Path(output) / "metadata.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True) + "\n")


def export_asset(source: Path, component: Component, resolution: int, compression: CoreAICompression,
                 output: Path, author: str, license_name: str, description: str, created: float) -> dict[str, Any]:
    """Convert, compress (text encoder and UNet), save and check one component's asset (its stored value types; a
    float16 asset's weights against the source's); returns what build-info records of it."""
    dtype = torch.float16
    module = load_wrapper(source, component, dtype)
    applied = compression if component in COMPRESSIBLE else CoreAICompression()
    expected = compressible_elements(module, applied)
    # a float16 asset is checked for the weights of the very module converted (no second load of the source)
    digests = weight_digests(module, component) if applied.kind == "float16" else None
    with _seeded_names():  # the generated names are drawn as late as the save
        program = to_program(module, example_inputs(module, component, resolution, dtype), component)
        del module
        program = compress_program(program, applied)
        save_asset(program, output, author, license_name, description, created)
    del program  # the checks below load what was saved
    types_ = check_compressed(output, applied, expected)
    # the files' sha256 are in build-info's file list (the bytes are reproducible: no digest of the meaning needed)
    record: dict[str, Any] = {"asset": output.name, "compression": applied.label, "storage_types": types_}
    if digests is not None:  # a compressed asset's weights are not the source's bytes
        record.update(check_weights(output, source, component, digests))
    return record


def reference_io(source: Path, component: Component, resolution: int, seed: int = 0
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seeded inputs of an asset's interface (the values its float16 and int32 inputs hold, by Apple's names) and
    the PyTorch float32 outputs on them: what `publisher verify --runtime coreai` holds the asset to."""
    module = load_wrapper(source, component, torch.float32)
    inputs = example_inputs(module, component, resolution, torch.float16, seed)
    _, input_names, output_names = ASSETS[component]
    with torch.no_grad():
        output = module(*(t if t.dtype == torch.int32 else t.to(torch.float32) for t in inputs))
    return ({name: t.numpy() for name, t in zip(input_names, inputs, strict=True)},
            {output_names[0]: output.numpy()})


# the parameters of the wrapped model a component's program holds (the VAE wrapper holds the whole AutoencoderKL)
_PARAMETERS = {Component.VAE_DECODER: ("model.decoder.", "model.post_quant_conv."),
               Component.VAE_ENCODER: ("model.encoder.", "model.quant_conv.")}


def _float16_constants(program: Any) -> Iterator[bytes]:
    """The bytes of each float16 constant of a loaded program (dense resources included)."""
    # coreai-opt's reader of a constant's values; pinned with the coreai extra (the program has no public walk)
    from coreai_opt.coreai_utils._coreai_imports import _get_constant_value_as_np_array

    pending = [program._module._mlir_module.operation]
    while pending:
        operation = pending.pop()
        # float16 tensors only: the reader sizes its buffer from the bit width, which overflows for i1 masks
        if operation.name == "coreai.constant" and str(operation.result.type).endswith("xf16>"):
            yield _get_constant_value_as_np_array(operation).tobytes()
        pending.extend(inner.operation for region in operation.regions for block in region.blocks
                       for inner in block.operations)


def _weight_forms(module: nn.Module, component: Component) -> Iterator[tuple[str, list[bytes]]]:
    """Each of the component's weights of a float16 wrapper, one at a time, as the asset may hold it: as it is, or
    transposed (a VAE attention's projections are stored for a batched matmul); weights whose values are all equal
    are left out (Core AI may store them as one value)."""
    for name, tensor in module.state_dict().items():
        if name.startswith(_PARAMETERS.get(component, ("",))) and tensor.numel() > 1 \
                and not bool((tensor.reshape(-1) == tensor.reshape(-1)[0]).all()):
            yield name.removeprefix("model."), [tensor.detach().contiguous().numpy().tobytes()] + (
                [tensor.detach().T.contiguous().numpy().tobytes()] if tensor.dim() == 2 else [])


def weight_digests(module: nn.Module, component: Component) -> dict[str, set[str]]:
    """The sha256 of each form of each weight (`_weight_forms`): what `check_weights` looks for in the asset."""
    import hashlib

    return {name: {hashlib.sha256(data).hexdigest() for data in forms}
            for name, forms in _weight_forms(module, component)}


def check_weights(asset: Path, source: Path, component: Component,
                  digests: dict[str, set[str]] | None = None) -> dict[str, int]:
    """A float16 asset's weights against the source's: every source weight of the component, in float16 (what the
    Core ML package holds too), must be one of the program's constants byte for byte, or lie whole inside one (a
    joined projection). A check that needs no runtime: it runs at full size on Linux, where a UNet call through Core
    AI's CPU runtime takes minutes. `digests` (`weight_digests`, the export takes them from the module it converts)
    or the source's, then the program: the source and the program are never in memory together (a full-size UNet is
    1.7 GB of each)."""
    import hashlib

    from coreai.authoring import AIModelAsset

    if digests is None:
        digests = weight_digests(load_wrapper(source, component, torch.float16), component)
    loaded = AIModelAsset.load(asset)
    program = loaded.program  # held while its constants are read: they live in its context
    stored = {hashlib.sha256(blob).hexdigest() for blob in _float16_constants(program)}
    missing = [name for name, forms in digests.items() if not forms & stored]
    if missing:  # joined weights: a second pass looks inside each constant for the rest
        forms = {name: data for name, data in _weight_forms(load_wrapper(source, component, torch.float16),
                                                            component) if name in missing}
        for blob in _float16_constants(program):
            for name in [n for n, datas in forms.items()
                         if any(len(data) < len(blob) and blob.find(data) >= 0 for data in datas)]:
                del forms[name]
        missing = sorted(forms)
    del program, loaded
    if missing or not digests:
        raise ToolchainError(f"{asset.name}: {len(missing)} of {len(digests)} source weights are not in the asset as "
                             f"float16 ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    return {"weights_checked": len(digests)}


def asset_interface(asset: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The `main` function's inputs and outputs as Core AI describes them: (name, "NDArray (Float16, 2 × 4 × 32 ×
    32)") pairs, in order."""
    from coreai.authoring import AIModelAsset

    summary = AIModelAsset.load(asset).summary()
    if summary is None:
        raise ToolchainError(f"{asset}: Core AI cannot read the saved asset's summary")
    return list(summary.function_inputs("main")), list(summary.function_outputs("main"))


def run_asset(asset: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """One call of an asset's `main` through Core AI's runtime (the CPU reference runtime on Linux): numpy arrays
    in, numpy arrays out."""
    import asyncio

    from coreai.authoring import AIModelAsset
    from coreai.runtime import NDArray

    async def call() -> dict[str, Any]:
        async with AIModelAsset.load(asset).executable() as model:
            function = model.load_function("main")
            outputs = await function({name: NDArray(value) for name, value in inputs.items()})
            return {name: value.numpy() for name, value in outputs.items() if isinstance(value, NDArray)}

    return asyncio.run(call())
