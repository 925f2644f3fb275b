"""The model card of a published repo, built with huggingface_hub's ModelCard / ModelCardData.

Its text is a function of the build-infos alone (no dates), so an unchanged repo gets a byte-identical card and a
republish sends nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from publisher.contract import zip_file_name
from publisher.family import DEFAULT_FAMILY, ModelFamily, family_named
from publisher.util.sizes import human_size
from publisher.vocabulary import Component, size_label

TAGS = ["coreml", "core-ml", "stable-diffusion", "text-to-image"]


def card_text(repo_id: str, infos: Sequence[dict[str, Any]], endpoint: str) -> str:
    """README.md for `repo_id` from the build-infos of its variants (sorted by folder); a Core AI bundle's
    (`coreai/`) has its own row and section."""
    from huggingface_hub import ModelCardData

    everything = sorted(infos, key=lambda info: info["variant"]["folder"])
    bundles = [info for info in everything if info["variant"].get("format") == "coreai"]
    infos = [info for info in everything if info["variant"].get("format") != "coreai"]
    first = (infos or bundles)[0]
    variant0 = first["variant"]
    source = first["source"]
    family = family_named(variant0.get("family", DEFAULT_FAMILY))
    data = ModelCardData(license=variant0.get("license", "other"), tags=TAGS + (["core-ai"] if bundles else []),
                         base_model=source["repo"], pipeline_tag="text-to-image", library_name="coreml")
    repo_name = repo_id.split("/", 1)[1]
    made = ("Core ML conversion" if infos else "") + (" and " if infos and bundles else "") + \
        ("Core AI bundle" if bundles else "")
    lines = [
        f"# {repo_name}",
        "",
        f"{made} of [{source['repo']}]({endpoint}/{source['repo']}) for Apple's "
        + ("[StableDiffusion Swift package](https://github.com/apple/ml-stable-diffusion) and Python pipeline"
           if infos else "")
        + (", and " if infos and bundles else "")
        + ("Core AI diffusion pipeline (iOS/macOS 27, [apple/coreai-models](https://github.com/apple/coreai-models))"
           if bundles else "")
        + ", built by coreml-publisher.",
        "",
        "## Variants",
        "",
        "| folder | image (W x H) | attention | compute unit | precision | minimum OS | for | size | compiled zip |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_coreai_row(info) for info in bundles]
    if not infos:
        return _finish(data, lines + _coreai_usage(bundles, repo_id) + _provenance(first, bundles))
    for info in infos:
        v = info["variant"]
        size = sum(entry["size"] for entry in info["files"].values())
        zip_name = zip_file_name(repo_name, v["folder"])
        has_zip = any(name.endswith(zip_name) for name in info["files"])
        zip_cell = f"[{zip_name}]({endpoint}/{repo_id}/resolve/main/{zip_name})" if has_zip else "not built"
        lines.append(f"| `{v['folder']}/` | {size_label(v.get('resolution', 512))} | "
                     f"{v['attention']} | {v['compute_unit']} | {v['precision_label']} | "
                     f"{v['minimum_deployment_target']} | {_meant_for(v)} | {human_size(size)} | {zip_cell} |")
    lines += _end_to_end(infos)
    folder = infos[0]["variant"]["folder"]
    chunked = [info["variant"]["folder"] for info in infos if info["variant"].get("chunk_unet")]
    lines += [
        "",
        "## Use from Python",
        "",
        "Download one variant's packages (huggingface_hub 1.x/2.x):",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "",
        f'path = snapshot_download("{repo_id}", allow_patterns="{folder}/packages/*", local_dir="models")',
        "```",
        "",
        "then run Apple's pipeline on the packages folder:",
        "",
        "```bash",
        f"python -m python_coreml_stable_diffusion.pipeline -i models/{folder}/packages "
        f"--model-version {source['repo']} --prompt \"a photo of an astronaut riding a horse\" -o out",
        "```",
        "",
        "## Use from a Swift app",
        "",
        "Download `<repo>_<attention>_compiled.zip`, unzip it next to itself and point "
        f"`{family.swift_pipeline}(resourcesAt:)` at the folder it contains ({_resources(family, variant0)} and "
        "the tokenizer's " + " and ".join(family.tokenizer_files) + ").",
        "",
    ]
    lines += _app_configuration(first.get("app", {}), family)
    lines += _controlnet_usage(infos, family)
    if chunked:
        lines += [
            "For iOS and iPadOS use " + ", ".join(f"`{name}/`" for name in chunked) + ": its UNet is in two "
            "chunks (UnetChunk1 + UnetChunk2, each under the 1 GB an iOS app can load at once), which the Swift "
            "pipeline loads whenever both are present. Its `packages/` folder also holds the whole UNet, which "
            "Apple's Python pipeline opens.",
            "",
        ]
    lines += [
        "## Compression fidelity",
        "",
    ]
    fidelity_rows = []
    mixed = []
    for info in infos:
        for submodule, figures in sorted(info.get("fidelity", {}).items()):
            cells = [_cell(figures.get(key)) for key in ("bits", "compressed_ops", "min_snr_db", "mean_snr_db",
                                                            "output_psnr_db")]
            if figures.get("bits") is None:  # a float16 model: nothing compressed
                cells[:2] = ["16 (float)", "0"]
            fidelity_rows.append(f"| `{info['variant']['folder']}` | {submodule} | " + " | ".join(cells) + " |")
            recipe = figures.get("mixed_bit")
            if recipe:
                size = human_size(figures["package_bytes"]) if figures.get("package_bytes") else "n/a"
                mixed.append(f"- `{info['variant']['folder']}` {submodule}: mixed-bit recipe for "
                             f"{_target(recipe.get('target', {}))}: {figures['bits']} bits per weight on average, "
                             f"{size}; output PSNR against float16 {_cell(figures.get('output_psnr_vs_float_db'))} dB "
                             f"measured (analysis: {_cell(recipe.get('predicted_psnr_db'))} dB); the per-layer "
                             "bit-widths are in `build-info.json`, the analysis in Apple's pre-analysis format next "
                             "to it")
    if fidelity_rows:
        lines += ["| folder | model | bits | compressed weights | min weight SNR (dB) | mean weight SNR (dB) | "
                  "output PSNR (dB) |", "|---|---|---|---|---|---|---|", *fidelity_rows]
        if mixed:
            lines += ["", *mixed]
    else:
        lines.append("float16 weights: no compression.")
    lines += _coreai_usage(bundles, repo_id)
    return _finish(data, lines + _provenance(first, infos + bundles))


def _finish(data: Any, lines: list[str]) -> str:
    from huggingface_hub import ModelCard

    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    return str(card)


def _provenance(first: dict[str, Any], infos: Sequence[dict[str, Any]]) -> list[str]:
    source = first["source"]
    return [
        "",
        "## Provenance",
        "",
        f"- source: `{source['repo']}` at revision `{source['revision']}` (commit `{source['commit']}`)",
        *_source_files(infos),
        *_community_lines(first.get("extra_sources", {})),
        *(f"- {role} from `{extra['repo']}` at revision `{extra['revision']}` (commit `{extra['commit']}`): "
          + ", ".join(f"`{name}`" for name in sorted(extra.get("files", {})))
          for role, extra in sorted(first.get("extra_sources", {}).items())
          if role != "config" and not role.startswith("lora")),
        "- tools: " + ", ".join(f"{name} {version}" for name, version in sorted(first["tools"].items())),
        "- every file's sha256 is listed in `<folder>/build-info.json`",
        "",
    ]


def _coreai_row(info: dict[str, Any]) -> str:
    v = info["variant"]
    size = sum(entry["size"] for entry in info["files"].values())
    return (f"| `{v['folder']}/` | {size_label(v.get('resolution', 512))} | n/a | GPU | "
            f"{v.get('coreai_compression', 'float16')} | iOS27, macOS27 | Core AI (iOS/macOS 27) | {human_size(size)} "
            "| n/a |")


def _coreai_usage(bundles: Sequence[dict[str, Any]], repo_id: str) -> list[str]:
    """How an iOS/macOS 27 app loads the Core AI bundle, and what was checked of it."""
    if not bundles:
        return []
    info = bundles[0]
    folder = info["variant"]["folder"]
    assets = info.get("coreai", {})
    stored = "; ".join(f"{record['asset']}: {record['compression']}" for _, record in sorted(assets.items()))
    return [
        "",
        "## Use with Core AI (iOS/macOS 27)",
        "",
        f"`{folder}/` is a bundle for Apple's Core AI diffusion pipeline: `metadata.json` (its assets, image size, "
        "scale factors, scheduler), `tokenizer/` and one `.aimodel` per component, each with a function `main` "
        "(TextEncoder: `input_ids` int32 (1, 77); Unet: `sample`, `timestep`, `encoder_hidden_states` (2, 77, C); "
        "VAEDecoder: `z`; VAEEncoder: `image`).",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "",
        f'path = snapshot_download("{repo_id}", allow_patterns="{folder}/*", local_dir="models")',
        "```",
        "",
        "```swift",
        "import CoreAIDiffusionPipeline",
        "",
        f'let pipeline = try await StableDiffusionPipeline.load(from: modelsURL.appendingPathComponent("{folder}"))',
        "```",
        "",
        f"Stored weights: {stored}. Each compression is checked on the saved asset's stored value types (a weight "
        "Core AI's tools skip fails the build); the assets are exported with Core AI's own converter "
        "(coreai-torch). A float16 asset's weights are checked at build time, at full size, to be the source's "
        "float16 weights (what the Core ML packages hold) byte for byte. Each asset's build stores seeded inputs "
        "and the PyTorch float32 outputs on them; "
        "`publisher verify --runtime coreai` runs the asset through Core AI's runtime on those inputs and holds a "
        "float16 asset to 35 dB PSNR (a compressed one: finite outputs of the right shapes, PSNR recorded). The "
        "publishing workflow runs that check on macOS 27 through the OS framework, before publishing, for "
        "manifests that name such a runner (`runners.coreai_check`); full-size bundles are not run on the Linux "
        f"build machine (a UNet call takes minutes on Core AI's CPU runtime).{_coreai_figures(info)}",
        "",
    ]


def _coreai_figures(info: dict[str, Any]) -> str:
    """The check's figures where this build ran it."""
    figures = [f"{component.removeprefix('coreai_')} {min(record['coreai_psnr_db'].values()):.1f} dB"
               for component, record in sorted(info.get("fidelity", {}).items())
               if component.startswith("coreai_") and record.get("coreai_psnr_db")]
    return f" Checked for this build: {', '.join(figures)} (lowest output PSNR)." if figures else ""


def _resources(family: ModelFamily, variant: dict[str, Any]) -> str:
    """The compiled models of the family's components the variant has, chunks as the alternative they are."""
    names = []
    for component in (Component(c) for c in variant.get("components", [])):
        if not family.has(component):
            continue
        spec = family.component(component)
        whole = f"{spec.resource}.mlmodelc"
        names.append(f"{whole} or " + " + ".join(f"{r}.mlmodelc" for _, r in spec.chunks) if spec.chunks
                     else whole)
    return ", ".join(names)


def _source_files(infos: Sequence[dict[str, Any]]) -> list[str]:
    """The source files the packages were built from (the union over the variants), with sizes and sha256."""
    files: dict[str, dict[str, Any]] = {}
    for info in infos:
        files.update(info["source"].get("files", {}))
    if not files:
        return []
    lines = ["- source files downloaded and loaded:"]
    for name, entry in sorted(files.items()):
        digest = f", sha256 `{entry['sha256']}`" if entry.get("sha256") else ""
        lines.append(f"  - `{name}` ({human_size(entry['size'])}{digest})")
    return lines


# what Apple's Swift pipeline assumes when an app sets nothing (`Configuration.encoderScaleFactor` and
# `decoderScaleFactor`: SD 1.x/2.x's VAE)
SWIFT_DEFAULT_VAE_SCALE = 0.18215


def _app_configuration(app: dict[str, Any], family: ModelFamily) -> list[str]:
    """What an app must set for this model beyond loading the Resources (from build-info's `app`)."""
    lines = []
    scale = app.get("vae_scale_factor")
    if isinstance(scale, (int, float)) and abs(scale - SWIFT_DEFAULT_VAE_SCALE) > 1e-6:
        lines.append(f"Set the pipeline configuration's `encoderScaleFactor` and `decoderScaleFactor` to {scale:g} "
                     f"(this model's VAE `scaling_factor`): the Swift package defaults to {SWIFT_DEFAULT_VAE_SCALE}, "
                     "SD 1.x/2.x's, and decodes washed-out images with it.")
    if family.swift_pipeline == "StableDiffusionXLPipeline":
        lines.append("Set `originalSize` and `targetSize` to the image size the folder was built for (the UNet's "
                     "`time_ids`).")
    if app.get("vae_float32"):
        lines.append("The VAE decoder and encoder are float32 packages, because the VAE's config asks to be upcast "
                     "(`force_upcast`: float16 overflows in it); they run on CPU and GPU whatever the compute unit "
                     "the app picks for the UNet. Apple's converter decides float32 by whether a custom VAE is "
                     "given; here the VAE's own config decides, so a VAE that needs no upcast "
                     "(madebyollin/sdxl-vae-fp16-fix) ships float16.")
    return [*lines, ""] if lines else []


def _community_lines(extras: dict[str, Any]) -> list[str]:
    """A community source's provenance: the base architecture a single-file checkpoint was read with, the LoRAs
    fused into it with their scales."""
    lines = []
    config = extras.get("config")
    if config is not None:
        found = f" ({config['architecture']})" if config.get("architecture") else ""
        lines.append(f"- a single-file checkpoint{found}, read as the architecture of `{config['repo']}` at revision "
                     f"`{config['revision']}` (commit `{config['commit']}`; its configs and tokenizer only)")
    loras = [extras[role] for role in sorted(extras) if role.startswith("lora")]
    if loras:
        lines.append("- LoRAs fused into the UNet and text encoder(s) before conversion, in this order:")
        for lora in loras:
            for name, entry in sorted(lora.get("files", {}).items()):
                digest = f", sha256 `{entry['sha256']}`" if entry.get("sha256") else ""
                lines.append(f"  - `{lora['repo']}/{name}` at scale {lora.get('scale', 1.0):g} (commit "
                             f"`{lora['commit']}`{digest})")
    return lines


def _target(target: dict[str, Any]) -> str:
    if "target_bits" in target:
        return f"{target['target_bits']} bits"
    if "target_psnr_db" in target:
        return f"{target['target_psnr_db']} dB"
    if "recipe" in target:
        return f"Apple's recipe `{target['recipe']}` (given in Apple's pre-analysis format, not measured here)"
    return "its target"


def _cell(value: Any) -> str:
    return "n/a" if value is None else str(value)


def _meant_for(variant: dict[str, Any]) -> str:
    if variant.get("chunk_unet"):
        return "iOS, iPadOS (UNet in 2 chunks)"
    if variant["attention"] == "ORIGINAL":
        return "macOS (GPU)"
    return "macOS, iOS (Neural Engine)"


def validate_card_text(text: str, endpoint: str, token: str | None) -> None:
    """The Hub's own metadata validation (raises ValueError with the Hub's message)."""
    from huggingface_hub import HfApi

    HfApi(endpoint=endpoint, token=token)._validate_yaml(text, repo_type="model", token=token)


def _controlnet_usage(infos: list[dict[str, Any]], family: Any) -> list[str]:
    """How the apps use the ControlledUnet and the ControlNets published beside it."""
    controlled = [info["variant"]["folder"] for info in infos
                  if Component.CONTROL_UNET in info["variant"].get("components", [])]
    if not controlled:
        return []
    nets = sorted({c for info in infos for c in info["variant"].get("components", []) if family.is_controlnet(c)})
    names = [family.resource_name(c).split("/", 1)[1] for c in nets]
    repos = sorted({info["extra_sources"][c]["repo"] for info in infos for c in nets if c in info.get("extra_sources", {})})
    lines = ["## ControlNet", "",
             ", ".join(f"`{name}/`" for name in controlled) + " also hold the ControlNet-ready UNet "
             "(`ControlledUnet.mlmodelc`, package `..._control-unet.mlpackage`" + (
                 "; in two chunks, `ControlledUnetChunk1` + `ControlledUnetChunk2`, where the UNet is chunked"
                 if any(info["variant"].get("chunk_unet") for info in infos
                        if info["variant"]["folder"] in controlled) else "")
             + "); without ControlNets the Swift pipeline loads `Unet` as before."]
    swift = family.name == "sd"  # Apple's Swift package loads ControlNets into StableDiffusionPipeline only
    if nets:
        lines += ["", "ControlNets, converted from " + ", ".join(f"[{r}](https://huggingface.co/{r})" for r in repos)
                  + f": in `compiled/controlnet/` ({', '.join(f'`{n}.mlmodelc`' for n in names)}) and in `packages/` "
                  "(`ControlNet_<org>_<name>.mlpackage`, as Apple's converter names them)" + (". In Swift:" if swift
                                                                                             else ".")]
    if nets and swift:
        lines += ["", "```swift",
                  f"let pipeline = try StableDiffusionPipeline(resourcesAt: url, controlNet: {json.dumps(names)}, "
                  "configuration: config)",
                  "var configuration = StableDiffusionPipeline.Configuration(prompt: prompt)",
                  "configuration.controlNetInputs = [conditionImage]  // one CGImage per ControlNet, at the image size",
                  "```"]
    elif swift:
        lines += ["", "Put ControlNet models (Apple's converter: `--convert-controlnet`) in the Resources' "
                  "`controlnet/` folder and name them in `StableDiffusionPipeline(resourcesAt:controlNet:)`."]
    else:
        lines += ["", f"Apple's Swift package does not load ControlNets into `{family.swift_pipeline}` today (nor "
                  "does Apple's converter make them for this family): these follow Apple's SD conventions for apps "
                  "that run them. Each step, a ControlNet takes the UNet's inputs (`sample`, `timestep`, "
                  "`encoder_hidden_states`, `time_ids`, `text_embeds`) and `controlnet_cond` (the condition image in "
                  "[0, 1], RGB, at the image size, batch 2 as the UNet's); the ControlledUnet takes the UNet's inputs "
                  "and the sum of the ControlNets' `additional_residual_<i>` outputs under the same names."]
    return lines + [""]


def _end_to_end(infos: Sequence[dict[str, Any]]) -> list[str]:
    """The build's end-to-end check: a row per evaluated variant and its sample image (the same prompt and seed)."""
    evaluated = [info for info in infos if info.get("evaluation")]
    if not evaluated:
        return []
    settings = evaluated[0]["evaluation"]["settings"]
    first = settings["prompts"][0]
    lines = ["", "## End to end", "",
             f"Each variant generated {len(settings['prompts'])} seeded prompts through its packages only, as Apple's "
             f"Swift pipeline runs them ({settings['steps']} {settings['scheduler'].upper()} steps, guidance "
             f"{settings['guidance']:g}), against diffusers' float32 pipeline on the source with the same noise; the "
             "worst prompt's image PSNR is shown (`<folder>/evaluation.json` has every figure). Samples: "
             f"\"{first['prompt']}\", seed {first['seed']}.", "",
             "| folder | image PSNR vs float32 (dB) | vs the float16 variant (dB) | latents PSNR (dB) | runtime | sample |",
             "|---|---|---|---|---|---|"]
    for info in evaluated:
        folder, figures = info["variant"]["folder"], info["evaluation"]["figures"]
        lines.append(f"| `{folder}/` | {_cell(figures.get('image_psnr_db'))} | "
                     f"{_cell(figures.get('image_psnr_vs_float16_db'))} | {_cell(figures.get('latents_psnr_db'))} | "
                     f"{info['evaluation'].get('runtime', '')} | ![{folder}]({folder}/sample.png) |")
    return lines
