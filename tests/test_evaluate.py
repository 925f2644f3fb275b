"""The end-to-end check in the build (figures, sample image, card) and the publish gate over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from publisher.gate import gate_problem
from tests.helpers import MANIFEST_HEAD, TINY_SOURCE_REPO, write_manifest

EVALUATED = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    components: [text_encoder, unet, vae_decoder]
    layouts: [packages]
    evaluate: {{steps: 2}}
  - repo: "{{namespace}}/coreml-tiny-sd-palettized"
    precision: {{type: palettize, nbits: 6}}
    attention: [ORIGINAL]
    components: [text_encoder, unet, vae_decoder]
    layouts: [packages]
    evaluate: {{steps: 2, floor_db: 0}}
"""


def test_the_gate_holds_a_variant_to_its_floor_and_to_the_published_figure() -> None:
    settings = {"steps": 3}
    ours = {"figures": {"image_psnr_db": 31.0}, "settings": settings}
    assert gate_problem("me/r/original", ours, 30, None) is None
    assert gate_problem("me/r/original", ours, 32, None) == \
        "me/r/original: end-to-end image PSNR 31.0 dB is under its floor of 32 dB"
    published = {"figures": {"image_psnr_db": 33.5}, "settings": settings}
    assert gate_problem("me/r/original", ours, 30, published) == \
        "me/r/original: end-to-end image PSNR 31.0 dB regressed from the published 33.5 dB (more than 1 dB)"
    assert gate_problem("me/r/original", ours, 30, published, margin_db=3) is None
    # figures made otherwise (other steps) do not compare; a published file that is not a record is not trusted
    assert gate_problem("me/r/original", ours, 30, {**published, "settings": {"steps": 4}}) is None
    assert gate_problem("me/r/original", ours, 30, {"figures": [1], "settings": settings}) is None
    assert gate_problem("me/r/original", {}, 30, published) is None  # not evaluated: nothing to hold


def test_the_end_to_end_check_reads_only_the_sources_it_generates_from() -> None:
    """SD 1.5's ControlNet-ready variants fetch two ControlNets: their end-to-end check reads neither (a new
    ControlNet commit does not re-run it)."""
    from publisher.manifest import load_manifests
    from publisher.plan import FetchParams, build_plan

    plan = build_plan(load_manifests([Path(__file__).parent.parent / "manifests" / "sd-v1-5.yaml"]), "me")
    with_controlnets = {v.id for v in plan.variants if any(c.startswith("controlnet-") for c in v.components)}
    checks = [s for s in plan.steps_of("evaluate") if with_controlnets & set(s.variants)]
    assert checks  # such variants are evaluated
    for step in checks:
        fetches = [plan.steps[i].params for i in step.inputs if plan.steps[i].kind == "fetch"]
        assert [f.role for f in fetches if isinstance(f, FetchParams)] == [""], step.id


def test_a_community_source_is_sized_by_what_it_prepared() -> None:
    """A single-file source's fetch lists the checkpoint, not `unet/`: `--evaluate auto` sizes the UNet by the
    folders the prepare step wrote (a full-size fine-tune is not evaluated on Linux by default)."""
    from publisher.engine.state import EVALUATE_AUTO_BYTES, Fetched, fetched_weight_bytes

    fetched = Fetched("k", Path("x"), "c" * 40, "a/b", "main",
                      files={"model.safetensors": {"size": 2_132_625_894}},
                      loaded_bytes={"unet/diffusion_pytorch_model.safetensors": 3_438_167_536,
                                    "vae/diffusion_pytorch_model.safetensors": 334_643_268})
    assert fetched_weight_bytes(fetched, "unet") == 3_438_167_536 > EVALUATE_AUTO_BYTES
    plain = Fetched("k", Path("x"), "c" * 40, "a/b", "main", files={
        "unet/diffusion_pytorch_model.fp16.safetensors": {"size": 1000}, "unet/config.json": {"size": 10}})
    assert fetched_weight_bytes(plain, "unet") == 2000  # an fp16 copy loads at twice its size


@pytest.mark.slow
def test_evaluated_variants_and_the_publish_gate(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import HfApi

    from publisher.build_info import read_build_info
    from publisher.engine.build import BuildOptions, build
    from publisher.errors import PublisherError
    from publisher.manifest import load_manifests
    from publisher.publish import PublishOptions, publish

    manifest = write_manifest(tmp_path / "manifests", TINY_SOURCE_REPO, EVALUATED)
    options = BuildOptions(out=tmp_path / "out", store=tmp_path / "store", namespace="ev", compile=False,
                           endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False,
                           evaluate="on")
    result = build(load_manifests([manifest]), options)
    assert result.ok, [v.error for v in result.variants]
    float16 = tmp_path / "out" / "ev" / "coreml-tiny-sd" / "original"
    palettized = tmp_path / "out" / "ev" / "coreml-tiny-sd-palettized" / "original"
    figures = read_build_info(float16 / "build-info.json").evaluation["figures"]
    assert figures["image_psnr_db"] >= 30 and "image_psnr_vs_float16_db" not in figures
    six_bit = read_build_info(palettized / "build-info.json").evaluation["figures"]
    assert six_bit["image_psnr_vs_float16_db"] < 100 and six_bit["image_psnr_db"] < figures["image_psnr_db"]
    record = json.loads((palettized / "evaluation.json").read_text())
    assert [p["seed"] for p in record["settings"]["prompts"]] == [0, 1] and record["runtime"] == "reference"
    source_commit = read_build_info(palettized / "build-info.json").source.commit
    assert record["sources"] == [{"repo": TINY_SOURCE_REPO, "commit": source_commit}]
    assert record["tools"]["coremltools"] and len(record["tools"]["code"]) == 64
    assert {"evaluation.json", "sample.png"} <= set(read_build_info(palettized / "build-info.json").files)

    publish_options = PublishOptions(out=tmp_path / "out", namespace="ev", target="staging", endpoint=staging_hub.url,
                                     token=staging_hub.token)
    loaded = load_manifests([manifest])
    publish(loaded, publish_options)
    api = HfApi(endpoint=staging_hub.url, token=staging_hub.token)
    card = Path(api.hf_hub_download("ev/coreml-tiny-sd-palettized", "README.md")).read_text()
    assert "## End to end" in card and "![original](original/sample.png)" in card

    # 2-bit weights in the 6-bit repo's place: a real regression, held to the published figure (its floor is 0)
    manifest.write_text(EVALUATED.format(source=TINY_SOURCE_REPO).replace("nbits: 6", "nbits: 2"))
    loaded = load_manifests([manifest])
    assert build(loaded, options).ok
    worse = read_build_info(palettized / "build-info.json").evaluation["figures"]["image_psnr_db"]
    assert worse < six_bit["image_psnr_db"] - 1
    with pytest.raises(PublisherError) as refused:
        publish(loaded, publish_options)
    assert refused.value.lines == [
        f"ev/coreml-tiny-sd-palettized/original: end-to-end image PSNR {worse:.1f} dB regressed from the published "
        f"{six_bit['image_psnr_db']:.1f} dB (more than 1 dB): not published (--allow-regression REASON publishes it "
        "anyway)"]
    head = api.repo_info("ev/coreml-tiny-sd-palettized").sha
    publish(loaded, PublishOptions(**{**publish_options.__dict__, "allow_regression": "2-bit for a smaller app"}))
    commits = api.list_repo_commits("ev/coreml-tiny-sd-palettized")
    assert commits[0].commit_id != head
    assert "Reason: 2-bit for a smaller app" in commits[0].message and "regressed" in commits[0].message
