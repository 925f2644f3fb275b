"""A tiny Stable-Diffusion-shaped pipeline (random weights) in diffusers layout, for tests and the demo.

Every component has the real architecture (UNet2DConditionModel with cross-attention, CLIPTextModel,
AutoencoderKL with the 8x down-sampling, StableDiffusionSafetyChecker) at toy widths, so conversion, the
contract's names and shapes, palettization and publishing all run on it in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from publisher.families.sd import FAMILY as SD
from publisher.vocabulary import Component

TINY_TEXT_HIDDEN = 32
TINY_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (every byte gets a visible stand-in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(folder: Path) -> int:
    """A small but real CLIP BPE vocabulary: every byte (alone and word-final) plus a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges = [("a", "n</w>"), ("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for left, right in merges:
        vocab.append(left + right)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TINY_MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "do_lower_case": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return len(vocab)


def build_tiny_pipeline(folder: Path, seed: int = 0, components: tuple[Component, ...] = SD.component_names,
                        sample_size: int = 32, cross_attention_dim: int = TINY_TEXT_HIDDEN) -> Path:
    """Write a tiny SD pipeline with random weights to `folder` (diffusers layout) and return it.

    `sample_size` is the latent size (resolution / 8): 32 -> 256x256 images, 1024 tokens at the first
    attention level, more than SPLIT_EINSUM_V2's 512-query chunk.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    model_index: dict[str, object] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                                      "tokenizer": ["transformers", "CLIPTokenizer"]}
    if Component.TEXT_ENCODER in components:
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=cross_attention_dim, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TINY_MAX_LENGTH, eos_token_id=vocab_size - 1,
            bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1, projection_dim=cross_attention_dim))
        text.eval().save_pretrained(folder / "text_encoder")
        model_index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if Component.UNET in components:
        unet: Any = UNet2DConditionModel(  # diffusers' models are typed without torch's methods
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=2, norm_num_groups=8)
        unet.eval().save_pretrained(folder / "unet")
        model_index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if Component.VAE_DECODER in components or Component.VAE_ENCODER in components:
        vae: Any = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8)
        vae.eval().save_pretrained(folder / "vae")
        model_index["vae"] = ["diffusers", "AutoencoderKL"]
    if Component.SAFETY_CHECKER in components:
        config = CLIPConfig(
            text_config=CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=1, num_attention_heads=2, eos_token_id=vocab_size - 1,
                                       bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1).to_dict(),
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=224, patch_size=32).to_dict(),
            projection_dim=16)
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():  # concept thresholds in a range where some random images are flagged
            checker.concept_embeds_weights.uniform_(0.0, 0.3)
            checker.special_care_embeds_weights.uniform_(0.0, 0.3)
        checker.eval().save_pretrained(folder / "safety_checker")
        model_index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    model_index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "skip_prk_steps": True}))
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


TINY_XL_TEXT_HIDDEN = (32, 48)  # CLIP ViT-L and OpenCLIP bigG stand-ins: different widths, as in SDXL
TINY_XL_POOLED = 24  # the second encoder's projection
TINY_XL_TIME_EMBED = 8


def build_tiny_sdxl_pipeline(folder: Path, seed: int = 0, sample_size: int = 32, refiner: bool = False) -> Path:
    """Write a tiny SDXL pipeline with random weights (diffusers layout) and return it: two text encoders (the
    second with a projection), a UNet with SDXL's add-embedding ("text_time") and transformer depth 2 in its
    second level and middle, a VAE whose config asks to be upcast (as the SDXL VAE's does). `refiner`: the
    refiner's shape instead (the second text encoder only, 5 geometry values with the aesthetic score)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer_2")
    config_2 = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config_2 | {"pad_token": "!"}))
    model_index: dict[str, object] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.30.0", "force_zeros_for_empty_prompt": not refiner,
        "requires_aesthetics_score": refiner, "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    if refiner:
        model_index |= {"tokenizer": [None, None], "text_encoder": [None, None]}
    else:
        model_index |= {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers",
                                                                                          "CLIPTextModel"]}

    def text_config(hidden: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=TINY_MAX_LENGTH,
                              eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
                              projection_dim=projection, hidden_act="gelu")

    if not refiner:
        CLIPTextModel(text_config(TINY_XL_TEXT_HIDDEN[0], TINY_XL_TEXT_HIDDEN[0])).eval().save_pretrained(
            folder / "text_encoder")
    CLIPTextModelWithProjection(text_config(TINY_XL_TEXT_HIDDEN[1], TINY_XL_POOLED)).eval().save_pretrained(
        folder / "text_encoder_2")
    cross = TINY_XL_TEXT_HIDDEN[1] if refiner else sum(TINY_XL_TEXT_HIDDEN)
    time_ids = 5 if refiner else 6
    unet: Any = UNet2DConditionModel(  # diffusers' models are typed without torch's methods
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross, addition_embed_type="text_time", addition_time_embed_dim=TINY_XL_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * TINY_XL_TIME_EMBED + TINY_XL_POOLED, norm_num_groups=8)
    unet.eval().save_pretrained(folder / "unet")
    model_index["unet"] = ["diffusers", "UNet2DConditionModel"]
    build_tiny_sdxl_vae(folder / "vae", sample_size, force_upcast=True, seed=seed + 100)
    model_index["vae"] = ["diffusers", "AutoencoderKL"]
    model_index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "timestep_spacing": "leading"}))
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def build_tiny_sdxl_vae(folder: Path, sample_size: int = 32, force_upcast: bool = False, seed: int = 1) -> Path:
    """A tiny SDXL-shaped VAE alone, its config.json at `folder`'s root (the layout of a custom VAE repo such as
    madebyollin/sdxl-vae-fp16-fix, whose config says it need not be upcast)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(  # diffusers' models are typed without torch's methods
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8, scaling_factor=0.13025,
        force_upcast=force_upcast)
    vae.eval().save_pretrained(folder)
    return Path(folder)


def add_hub_copies(folder: Path, fp16: bool = True, decoys: bool = True) -> list[str]:
    """Give a tiny pipeline the extra weight copies real Hub repos carry: an `fp16` safetensors variant per
    component (the float32 weights cast to float16), and decoys of random bytes that no build may download
    (`.bin` and `non_ema` copies, a single-file checkpoint at the root). Returns the decoys' paths."""
    import os

    from safetensors.torch import load_file, save_file

    written = []
    for weights in sorted(Path(folder).glob("*/*.safetensors")):
        if fp16 and ".fp16." not in weights.name:
            tensors = {k: v.half().contiguous() for k, v in load_file(weights).items()}
            save_file(tensors, weights.with_name(weights.stem + ".fp16.safetensors"), metadata={"format": "pt"})
        if decoys:
            stem = weights.name.split(".")[0]
            decoy_names = [f"{stem}.non_ema.safetensors", "pytorch_model.bin" if stem == "model" else f"{stem}.bin"]
            if fp16:
                decoy_names.append(f"{stem}.fp16.bin" if stem != "model" else "pytorch_model.fp16.bin")
            for name in decoy_names:
                (weights.parent / name).write_bytes(os.urandom(4096))
                written.append(f"{weights.parent.name}/{name}")
    if decoys:
        (Path(folder) / "v1-5-pruned-emaonly.safetensors").write_bytes(os.urandom(8192))
        written.append("v1-5-pruned-emaonly.safetensors")
    return written


def push_tiny_source(folder: Path, repo_id: str, endpoint: str, token: str | None) -> str:
    """Upload a tiny pipeline folder as a source repo; returns the commit it landed as."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="tiny SD-shaped source model")
    return str(info.oid)


# --- community sources: a pipeline as one checkpoint in the original (LDM) key layout, and a LoRA for it -------

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet_name(name: str, blocks_with_attention: set[int], layers: int) -> str:
    """A diffusers SD UNet weight's name in the original layout (`input_blocks`, `middle_block`, `output_blocks`)."""
    parts = name.split(".")
    rest = ".".join(parts[4:])

    def resnet(tail: str) -> str:
        head, _, end = tail.partition(".")
        return f"{_LDM_RESNET[head]}.{end}"

    if parts[0] == "time_embedding":
        return f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
    if parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
        return {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[parts[0]] + \
            f".{parts[1]}"
    if parts[0] == "mid_block":
        tail = ".".join(parts[3:])
        return f"middle_block.{2 * int(parts[2])}.{resnet(tail)}" if parts[1] == "resnets" else \
            f"middle_block.1.{tail}"
    block = int(parts[1])
    if parts[0] == "down_blocks":
        first = 1 + block * (layers + 1)
        if parts[2] == "downsamplers":
            return f"input_blocks.{first + layers}.0.op.{parts[-1]}"
        return f"input_blocks.{first + int(parts[3])}." + (f"0.{resnet(rest)}" if parts[2] == "resnets" else f"1.{rest}")
    first = block * (layers + 1)  # up_blocks: one more layer per block
    if parts[2] == "upsamplers":
        return f"output_blocks.{first + layers}.{2 if block in blocks_with_attention else 1}.conv.{parts[-1]}"
    return f"output_blocks.{first + int(parts[3])}." + (f"0.{resnet(rest)}" if parts[2] == "resnets" else f"1.{rest}")


def _ldm_vae_name(name: str, blocks: int) -> tuple[str, bool]:
    """A diffusers VAE weight's name in the original layout; and whether it is an attention projection (a 1x1
    convolution there)."""
    parts = name.split(".")
    side = parts[0]
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if parts[1] == "down_blocks" else blocks - 1 - int(parts[2])
        kind = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] == "resnets":
            return f"{side}.{kind}.{level}.block.{parts[4]}.{'nin_shortcut' if parts[5] == 'conv_shortcut' else parts[5]}" \
                f".{parts[-1]}", False
        return f"{side}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.conv.{parts[-1]}", False
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            layer = "nin_shortcut" if parts[4] == "conv_shortcut" else parts[4]
            return f"{side}.mid.block_{int(parts[3]) + 1}.{layer}.{parts[-1]}", False
        return f"{side}.mid.attn_1.{_LDM_VAE_ATTENTION['.'.join(parts[4:-1])]}.{parts[-1]}", \
            parts[4] != "group_norm"
    if parts[1] == "conv_norm_out":
        return f"{side}.norm_out.{parts[-1]}", False
    return name, False


def write_single_file(folder: Path, path: Path, dtype: str = "float32") -> Path:
    """Write an SD 1.x pipeline folder's UNet, VAE and text encoder as one checkpoint in the original key layout
    (what trainers and model sites publish): `.safetensors`, or a `.ckpt` pickle of `{"state_dict": ...}`."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    attention_blocks = {int(n.split(".")[1]) for n in unet if n.startswith("up_blocks.") and ".attentions." in n}
    tensors = {f"model.diffusion_model.{_ldm_unet_name(n, attention_blocks, unet_config['layers_per_block'])}": v
               for n, v in unet.items()}
    for name, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        new, conv = _ldm_vae_name(name, len(vae_config["block_out_channels"]))
        tensors[f"first_stage_model.{new}"] = value[:, :, None, None] if conv and value.ndim == 2 else value
    for name, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        # the original layout keeps transformers' `text_model.` level, which newer transformers flatten
        tensors["cond_stage_model.transformer." + ("" if name.startswith("text_model.") else "text_model.") + name] = \
            value
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        torch.save({"state_dict": tensors, "global_step": 1}, path)
    return path


def write_tiny_lora(folder: Path, path: Path, seed: int = 1, text_encoder: bool = True, rank: int = 4) -> Path:
    """A LoRA for a tiny SD pipeline in diffusers' format (peft layers on the UNet's attention projections, and on
    the text encoder's q/v projections unless `text_encoder` is false), random non-zero weights."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(unet_config)
    layers: dict[str, Any] = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text_encoder:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    path = Path(path)
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


def write_tiny_controlnet(source: Path, folder: Path, seed: int = 2, **config: Any) -> Path:
    """A ControlNet for a tiny SD or SDXL pipeline: diffusers' ControlNetModel with the UNet's encoder layout (its
    weights copied from the UNet, as ControlNets are trained), random non-zero "zero" convolutions so that its
    residuals are not all 0, the repo's layout (config.json and weights at the root). `config`: keys changed (new
    random weights), e.g. another `cross_attention_dim` (a ControlNet trained for another base)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet: Any = UNet2DConditionModel.from_pretrained(Path(source) / "unet")
    torch.manual_seed(seed)
    controlnet: Any = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    if config:
        controlnet = ControlNetModel(**{**dict(controlnet.config), **config})
    with torch.no_grad():
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out):
            for parameter in block.parameters():
                parameter.normal_(0, 0.2)
    controlnet.eval().save_pretrained(folder)
    return Path(folder)
