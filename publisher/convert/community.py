"""Community models as sources: a single-file checkpoint (the original LDM key layout trainers publish) and LoRAs,
turned into diffusers folders by diffusers' own loaders before anything is converted.

`checkpoint_shapes` and `check_fits` read only tensor shapes (a safetensors header; a pickle through
`torch.load(weights_only=True)`, never more), so a checkpoint that does not fit the family's config is refused
before any conversion starts. `prepare_source` (a heavy step, run in a process of its own) loads the checkpoint with
the family's diffusers pipeline `from_single_file` and the config folder, fuses each LoRA at its scale
(`lora_state_dict` reads diffusers' and kohya's formats; the UNet through diffusers' own loading, the text encoders
through peft with diffusers' helpers, as diffusers does), refuses a LoRA whose layers match nothing, and saves the
components it produced as diffusers folders in the checkpoint's own precision.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from publisher.errors import SourceError
from publisher.family import family_named

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
# where the original layout keeps what the fit check reads
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
SDXL_PREFIXES = ("conditioner.embedders.", UNET_PREFIX + "label_emb.")


def load_pickle(path: Path) -> dict[str, Any]:
    """A pickled checkpoint's tensors, loaded with `torch.load(weights_only=True)` only (memory-mapped where the
    file's format allows); one that needs more than that is refused in one line naming the file."""
    import pickle

    import torch

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            data = load(True)
        except RuntimeError as exc:  # a legacy (non-zip) pickle cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            data = load(False)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]
        raise SourceError(f"{path.name}: refused: not loadable with torch.load(weights_only=True), so it holds "
                          f"more than tensors ({first}); publish the weights as .safetensors") from exc
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise SourceError(f"{path.name}: not a checkpoint (a pickled {type(data).__name__}, not a dict of tensors)")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def checkpoint_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor of a checkpoint, read from the safetensors header (no tensor data)
    or from a weights-only pickle."""
    path = Path(path)
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in load_pickle(path).items()}
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            piece = handle.get_slice(name)
            shapes[name] = (tuple(piece.get_shape()), _DTYPES.get(piece.get_dtype(), piece.get_dtype().lower()))
    return shapes


_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def checkpoint_dtype(shapes: dict[str, tuple[tuple[int, ...], str]], prefix: str = UNET_PREFIX) -> str:
    """The floating dtype most of the tensors under `prefix` (the UNet's) are stored in: the precision the source
    is kept in."""
    counts = Counter(dtype for name, (_, dtype) in shapes.items() if name.startswith(prefix)
                     and dtype in ("float16", "bfloat16", "float32"))
    return counts.most_common(1)[0][0] if counts else "float32"


def describe_checkpoint(shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Any]:
    """What a checkpoint is, from its tensor shapes: the UNet's input channels, its cross-attention width, whether
    it has SDXL's conditioner; and a name for it."""
    if CONV_IN not in shapes:
        return {"name": "not a Stable Diffusion checkpoint in the original (LDM) key layout (no "
                        f"{CONV_IN})"}
    widths = sorted({shape[1] for name, (shape, _) in shapes.items()
                     if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight") and len(shape) == 2})
    cross: int | list[int] = widths[0] if len(widths) == 1 else widths
    found: dict[str, Any] = {"in_channels": shapes[CONV_IN][0][1], "cross_attention": cross,
                             "sdxl": any(name.startswith(SDXL_PREFIXES) for name in shapes)}
    kind = "an SDXL" if found["sdxl"] else \
        {768: "an SD 1.x", 1024: "an SD 2.x"}.get(cross, "a") if isinstance(cross, int) else "a"
    inpainting = " inpainting" if found["in_channels"] == 9 else ""
    found["name"] = f"{kind}{inpainting} UNet ({found['in_channels']} input channels, cross-attention width " \
        f"{found['cross_attention']})"
    return found


def check_fits(shapes: dict[str, tuple[tuple[int, ...], str]], config: Path, label: str, config_label: str) -> str:
    """Refuse (one line) a checkpoint whose UNet is not the one the config folder describes; returns its name."""
    found = describe_checkpoint(shapes)
    if "in_channels" not in found:
        raise SourceError(f"{label}: {found['name']}")
    try:
        unet = json.loads((Path(config) / "unet" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"source config {config_label} has no readable unet/config.json") from exc
    cross = unet.get("cross_attention_dim")
    expected_sdxl = unet.get("addition_embed_type") == "text_time"
    wanted = f"{unet.get('in_channels')} input channels, cross-attention width {cross}" + \
        (", SDXL's conditioning" if expected_sdxl else "")
    if (found["in_channels"] != unet.get("in_channels") or found["cross_attention"] != cross
            or found["sdxl"] != expected_sdxl):
        raise SourceError(f"{label}: found {found['name']}{', SDXL conditioner' if found['sdxl'] else ''}; the "
                          f"config {config_label} describes {wanted}: use the config of the checkpoint's base model")
    return str(found["name"])


def _pipeline_class(family: str) -> Any:
    module, _, name = family_named(family).diffusers_pipeline.partition(":")
    return getattr(importlib.import_module(module), name)


def prepare_source(checkpoint: str | None, base: str, loras: list[tuple[str, float, str]], family: str,
                   out: str) -> dict[str, Any]:
    """Write into `out` the diffusers folders (config.json + safetensors) of the components a single-file
    `checkpoint` holds (read with `base`, a folder with the config repo's files) and of those the `loras` (path,
    scale, label) change, fused in order; `base` is a diffusers source when there is no checkpoint. Returns what
    was written and which folders each LoRA changed."""
    import torch

    pipeline_class = _pipeline_class(family)
    spec = family_named(family)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    optional: dict[str, Any] = {name: None for name in ("safety_checker", "feature_extractor", "image_encoder")
                                if name in accepted}
    if "requires_safety_checker" in accepted:
        optional["requires_safety_checker"] = False
    if checkpoint is not None:
        dtype = checkpoint_dtype(checkpoint_shapes(Path(checkpoint)))
        pipe = pipeline_class.from_single_file(checkpoint, config=base, local_files_only=True,
                                               torch_dtype=getattr(torch, dtype), **optional)
        produced = {s.folder for s in spec.components if s.in_checkpoint and not s.source_role
                    and getattr(pipe, s.folder, None) is not None}
    else:
        index = json.loads((Path(base) / "model_index.json").read_text())
        absent = {name: None for name, value in index.items() if not name.startswith("_") and
                  isinstance(value, list) and value[0] is not None and not (Path(base) / name).is_dir()}
        # the precision of the UNet's weights as fetched (headers only)
        dtype = checkpoint_dtype({name: entry for path in sorted((Path(base) / "unet").glob("*.safetensors"))
                                  for name, entry in checkpoint_shapes(path).items()}, prefix="")
        pipe = pipeline_class.from_pretrained(base, local_files_only=True, torch_dtype=getattr(torch, dtype),
                                              **{**absent, **optional})
        produced = set()
    changed: list[list[str]] = []
    for number, (path, scale, label) in enumerate(loras):
        folders = fuse_lora(pipe, Path(path), scale, f"lora{number}", label)
        changed.append(folders)
        produced.update(folders)
    for folder in sorted(produced):
        getattr(pipe, folder).save_pretrained(Path(out) / folder, safe_serialization=True)
    return {"folders": sorted(produced), "lora_folders": changed, "dtype": dtype}


def fuse_lora(pipe: Any, path: Path, scale: float, name: str, label: str) -> list[str]:
    """Fuse one LoRA file into the pipeline's UNet and text encoders at `scale`; returns the folders it changed.
    Every LoRA layer must land on a layer of the model: one that matches nothing is an error, not a no-op."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    if path.name.lower().endswith(PICKLE_SUFFIXES):
        load_pickle(path)  # refused here unless weights-only (diffusers then loads it the same way)
    loaded = pipe.lora_state_dict(str(path))
    state, alphas = loaded[0], loaded[1]
    wanted = {_module(key) for key in state if ".lora" in key}
    if not wanted:
        raise SourceError(f"LoRA {label}: no LoRA weights in the file (none of its {len(state)} tensors is a "
                          "LoRA layer diffusers reads)")
    folders = []
    if any(key.startswith("unet.") for key in state):
        try:
            pipe.load_lora_into_unet(state, alphas, unet=pipe.unet, adapter_name=name, _pipeline=pipe)
        except ValueError:  # peft: none of the target modules is in the model (reported as unmatched layers)
            pass
        folders.append("unet")
    for folder in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, folder, None)
        part = {k.removeprefix(f"{folder}."): v for k, v in state.items() if k.startswith(f"{folder}.")}
        if model is None or not part:
            continue
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        part_alphas = {k.removeprefix(f"{folder}."): v for k, v in (alphas or {}).items()
                       if k.startswith(f"{folder}.")}
        _inject_text_encoder(model, part, part_alphas, name)
        folders.append(folder)
    landed = {f"{folder}.{module}" for folder in folders for module in _adapted(getattr(pipe, folder), name)}
    missed = sorted(wanted - landed - _flattened(wanted, landed))
    if missed:
        raise SourceError(f"LoRA {label}: {len(missed)} of its {len(wanted)} layers match nothing in the model "
                          f"(e.g. {missed[0]}): is it a LoRA for this base model?")
    pipe.fuse_lora(components=folders, lora_scale=scale, adapter_names=[name])
    pipe.unload_lora_weights()
    return folders


def _module(key: str) -> str:
    return key.split(".lora", 1)[0]


def _flattened(wanted: set[str], landed: set[str]) -> set[str]:
    """LoRA layer names written for an older text encoder layout (`text_model.` inside CLIPTextModel, which the
    installed transformers flattens) that landed under the flat name."""
    same = set()
    for key in wanted:
        folder, _, rest = key.partition(".")
        if rest.startswith("text_model.") and f"{folder}.{rest.removeprefix('text_model.')}" in landed:
            same.add(key)
    return same


def _adapted(model: Any, name: str) -> list[str]:
    """The modules of `model` holding the LoRA adapter `name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module_name for module_name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {})]


def _inject_text_encoder(model: Any, state: dict[str, Any], alphas: dict[str, float], name: str) -> None:
    """A text encoder's LoRA layers through peft, configured by diffusers' own helper (the installed transformers'
    adapter loading asks for a newer peft than the index has; the layers and their scales are the same)."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if not hasattr(model, "text_model"):  # an older layout's names, on the flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
        alphas = {k.removeprefix("text_model."): v for k, v in alphas.items()}
    ranks = {key: value.shape[1] for key, value in state.items() if key.endswith("lora_B.weight")}
    if not ranks:
        return
    config = LoraConfig(**get_peft_kwargs(ranks, alphas or None, state, is_unet=False))
    try:
        inject_adapter_in_model(config, model, adapter_name=name)
    except ValueError:  # peft: none of the target modules is in the model (reported as unmatched layers)
        return
    set_peft_model_state_dict(model, state, adapter_name=name)
