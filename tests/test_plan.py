"""Plan expansion over the repo's four manifests: variants, shared conversions, the GitHub matrix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from publisher.manifest import load_manifests
from publisher.plan import build_plan

MANIFESTS = Path(__file__).parent.parent / "manifests"
SD_MANIFESTS = sorted(MANIFESTS.glob("sd-[v2]*.yaml"))  # SD 1.4, 1.5, 2 base, 2.1 base
PACKS = ("", "_512x768", "_768x512")  # their sizes: 512, and the 512x768 and 768x512 packs


def test_every_variant_of_the_base_models() -> None:
    plan = build_plan(load_manifests([MANIFESTS]), "me")
    ids = sorted(v.id for v in plan.variants)
    expected = []
    for model in ("stable-diffusion-v1-4", "stable-diffusion-v1-5", "stable-diffusion-2-base",
                  "stable-diffusion-2-1-base"):
        for pack in PACKS:  # the default size, then the portrait and the landscape pack
            expected += [f"me/coreml-{model}/original{pack}", f"me/coreml-{model}/split_einsum{pack}",
                         f"me/coreml-{model}-palettized/original{pack}",
                         f"me/coreml-{model}-palettized/split_einsum_v2{pack}"]
    expected += [f"me/coreml-stable-diffusion-v1-5-mixed-bit/split_einsum_v2{pack}" for pack in PACKS]
    expected += [f"me/coreml-stable-diffusion-xl-base-1-0{suffix}/{folder}" for suffix in ("", "-palettized")
                 for folder in ("original", "split_einsum")]
    expected.append("me/coreml-stable-diffusion-xl-base-with-refiner-1-0/original")
    # a community fine-tune: one single-file checkpoint with a LoRA
    expected += ["me/coreml-dreamshaper-8-lcm/original", "me/coreml-dreamshaper-8-lcm/split_einsum"]
    # SD 1.5's Core AI bundles (iOS/macOS 27), one per repo that asks
    expected += ["me/coreml-stable-diffusion-v1-5/coreai", "me/coreml-stable-diffusion-v1-5-palettized/coreai"]
    assert ids == sorted(expected)


def test_float16_conversion_is_shared_with_the_palettized_repo() -> None:
    plan = build_plan(load_manifests(SD_MANIFESTS), "me")  # SDXL's sharing: tests/test_sdxl.py
    counts = plan.counts()
    sizes = len(PACKS)
    # per model and size: the UNet once per attention (the float16 SPLIT_EINSUM UNet also as two chunks, for iOS)
    # and the two VAE parts (diffusers' own, as Apple converts them) for every attention; per model the text encoder
    # (no size changes it) and the safety checker (SD 1.x, at 512 only) once
    # SD 1.5's ControlledUnet (float16 ORIGINAL, 6-bit ORIGINAL and SPLIT_EINSUM_V2): per size ORIGINAL (shared by the
    # two repos) and SPLIT_EINSUM_V2, and so for each of its two ControlNets (canny and depth, fetched once each)
    assert counts["convert"] == 2 * (sizes * (3 + 2) + 2) + 2 * (sizes * (3 + 2) + 1) + 2 * sizes + 2 * 2 * sizes
    assert counts["chunk"] == 4 * 2 * sizes
    assert counts["fetch"] == 4 + 2
    # only text encoder and UNet are palettized: the UNet per palettized variant, the text encoder once per model;
    # the mixed-bit repo's UNet (its V2 conversion shared with the 6-bit repo) after one analysis of the source
    # + SD 1.5's 6-bit ControlledUnets and ControlNets (each per size and attention)
    assert counts["compress"] == (8 + 1 + 2) * sizes + 4 + 2 * 2 * sizes
    assert counts["analyze"] == 1
    # and SD 1.5's two Core AI bundles: their own text encoders and UNets, one VAE decoder and encoder for both
    assert counts["assemble"] == counts["zip"] + 2 == 17 * sizes + 2
    assert counts["coreai"] == 2 * 2 + 2
    shared = [s for s in plan.steps_of("convert") if s.params.attention in ("ORIGINAL", None)]
    assert len(shared) == 4 * 3 * sizes + 4 + 2 + sizes + 2 * sizes
    for step in shared:
        repos = {variant.rsplit("/", 1)[0] for variant in step.variants}
        assert {r.removesuffix("-palettized") for r in repos if not r.endswith("-mixed-bit")} == {
            min(repos, key=len)}, step.id  # the float16 and the palettized repo (and the mixed-bit one of SD 1.5)
        assert len(repos) == (3 if "v1-5" in step.id and step.params.attention is None else 2), step.id
        assert step.params.deployment_target == "iOS16"
    text = [s for s in plan.steps_of("convert") if s.params.component == "text_encoder"]  # every variant of a model
    assert sorted(len(s.variants) for s in text) == [4 * sizes] * 3 + [5 * sizes]
    for component in ("vae_decoder", "vae_encoder"):  # every attention of a model, per size
        steps = [s for s in plan.steps_of("convert") if s.params.component == component]
        assert sorted(len(s.variants) for s in steps) == [4] * 3 * sizes + [5] * sizes, component


def test_steps_come_after_their_inputs() -> None:
    plan = build_plan(load_manifests([MANIFESTS]), "me")
    seen: set[str] = set()
    for step in plan.steps.values():
        assert set(step.inputs) <= seen, step.id
        seen.add(step.id)


def test_github_matrix_has_each_variant_once() -> None:
    plan = build_plan(load_manifests([MANIFESTS]), "me")
    matrix = plan.github_matrix()
    variants = Counter(v for job in matrix["include"] for v in job["variants"].split())
    assert set(variants) == {v.id for v in plan.variants}
    assert set(variants.values()) == {1}
    assert plan.github_matrix(only=[]) == {"include": []}


def test_palettized_without_float16_sibling_converts_at_its_own_target(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "name: t\nsource: {repo: o/t}\nlicense: mit\npublish:\n"
        "  - repo: o/p\n    precision: {type: palettize, nbits: 4}\n    attention: [SPLIT_EINSUM_V2]\n")
    plan = build_plan(load_manifests([tmp_path]), "me")
    targets = {s.params.deployment_target for s in plan.steps_of("convert")}
    assert targets == {"iOS17"}


def test_chunked_variant_keeps_the_whole_unet_in_packages_only() -> None:
    """Swift loads UnetChunk1 + UnetChunk2 from the compiled Resources; Apple's Python pipeline opens `unet` from
    the packages folder: both are there, and the compiled Resources hold the chunks alone."""
    plan = build_plan(load_manifests([MANIFESTS]), "me")
    variant = "me/coreml-stable-diffusion-v1-5/split_einsum"
    verified = sorted(s.params.submodule for s in plan.steps_of("verify") if variant in s.variants)
    compiled = sorted(s.params.submodule for s in plan.steps_of("compile") if variant in s.variants)
    assert verified == ["safety_checker", "text_encoder", "unet", "unet_chunk1", "unet_chunk2", "vae_decoder",
                        "vae_encoder"]
    assert compiled == ["safety_checker", "text_encoder", "unet_chunk1", "unet_chunk2", "vae_decoder",
                        "vae_encoder"]
