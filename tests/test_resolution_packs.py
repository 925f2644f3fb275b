"""Resolution packs: a list of sizes builds one complete folder per size and attention (`original`,
`original_256x384`, ...), each with the contract's shapes at its size, the same weight files across the sizes,
and a repo that gains a size publishes only that size's program files."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from publisher.compress.scheme import REPORT
from publisher.contract import zip_file_name
from publisher.engine.build import BuildOptions, build
from publisher.manifest import load_manifests, parse_manifest
from publisher.mlpackage import package_info
from publisher.plan import build_plan
from publisher.publish import PublishOptions, publish
from tests.helpers import TINY_SOURCE_REPO

MANIFEST = """\
name: tiny-packs
source:
  repo: {source}
license: mit
resolution: {sizes}
publish:
  - repo: "{{namespace}}/coreml-tiny-packs"
    precision: {{type: float16}}
    attention: [ORIGINAL]
    components: [text_encoder, unet, vae_decoder]
    layouts: [packages]
"""


def _write(folder: Path, sizes: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-packs.yaml"
    path.write_text(MANIFEST.format(source=TINY_SOURCE_REPO, sizes=sizes))
    return path


def test_sizes_in_the_manifest(tmp_path: Path) -> None:
    manifest, errors = parse_manifest(MANIFEST.format(source="a/b", sizes='[512, "512x768", 768x512]'),
                                      tmp_path / "m.yaml")
    assert errors == [] and manifest is not None
    assert manifest.sizes == [512, "512x768", "768x512"]
    plan = build_plan([type("L", (), {"manifest": manifest, "path": tmp_path / "m.yaml", "inputs_of":
                                      lambda self, i: {}})()], "ns")  # type: ignore[list-item]
    assert [v.id for v in plan.variants] == ["ns/coreml-tiny-packs/original", "ns/coreml-tiny-packs/original_512x768",
                                             "ns/coreml-tiny-packs/original_768x512"]
    assert plan.variants[1].zip_name == "coreml-tiny-packs_original_512x768_compiled.zip" == \
        zip_file_name("coreml-tiny-packs", "original_512x768")
    # the text encoder is one conversion for every size; the UNet and the VAE decoder one per size
    converts = [s.params.component for s in plan.steps_of("convert")]  # type: ignore[union-attr]
    assert sorted(converts) == ["text_encoder"] + ["unet"] * 3 + ["vae_decoder"] * 3
    bad, errors = parse_manifest(MANIFEST.format(source="a/b", sizes='[512, 512x512, 500x512, "4096x512"]'),
                                 tmp_path / "m.yaml")
    assert bad is None and errors == [
        f"{tmp_path / 'm.yaml'}:5: resolution[1]: '512x512': the size 512x512 is listed twice",
        f"{tmp_path / 'm.yaml'}:5: resolution[2]: '500x512': each side must be a multiple of 64 from 256 to 2048",
        f"{tmp_path / 'm.yaml'}:5: resolution[3]: '4096x512': each side must be a multiple of 64 from 256 to 2048"]


def _stats(hub) -> dict:  # type: ignore[no-untyped-def]
    request = urllib.request.Request(f"{hub.url}/api/staging/stats", headers={"Authorization": f"Bearer {hub.token}"})
    with urllib.request.urlopen(request) as response:
        return dict(json.loads(response.read()))


def _submodule(package: Path) -> str:
    return next(name for name in ("text_encoder", "unet", "vae_decoder") if package.name.endswith(f"_{name}.mlpackage"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_three_sizes_three_complete_sets_sharing_their_weights(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    # the contract's shapes are checked by every build; the outputs against PyTorch at a pack's size: below
    build_options = BuildOptions(out=tmp_path / "out", store=tmp_path / "store", namespace="packs", compile=False,
                                 endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False,
                                 verify=False)
    publish_options = PublishOptions(out=tmp_path / "out", namespace="packs", target="staging",
                                     endpoint=staging_hub.url, token=staging_hub.token)
    manifest = _write(tmp_path / "manifests", '[256, "256x384"]')
    first = build(load_manifests([manifest]), build_options)
    assert first.ok, [v.error for v in first.variants]
    publish(load_manifests([manifest]), publish_options)

    manifest = _write(tmp_path / "manifests", '[256, "256x384", "384x256"]')
    loaded = load_manifests([manifest])
    result = build(loaded, build_options)
    assert result.ok, [v.error for v in result.variants]
    converted = [result.plan.steps[s].params for s in result.built if result.plan.steps[s].kind == "convert"]
    assert sorted((p.component, p.resolution) for p in converted) == [  # type: ignore[union-attr]
        ("unet", "384x256"), ("vae_decoder", "384x256")]  # only what the new size changes
    repo = tmp_path / "out" / "packs" / "coreml-tiny-packs"
    assert sorted(p.name for p in repo.iterdir()) == ["original", "original_256x384", "original_384x256"]
    weights: dict[str, set[str]] = {}
    for folder, (width, height) in (("original", (256, 256)), ("original_256x384", (256, 384)),
                                    ("original_384x256", (384, 256))):
        packages = sorted((repo / folder / "packages").iterdir())
        assert [p.name.rsplit("_", 1)[-1] for p in packages] == ["encoder.mlpackage", "unet.mlpackage",
                                                                 "decoder.mlpackage"]
        shapes = {_submodule(p): {t.name: t.shape for t in (*package_info(p).inputs, *package_info(p).outputs)}
                  for p in packages}
        assert shapes["unet"]["sample"] == shapes["unet"]["noise_pred"] == (2, 4, height // 8, width // 8)
        assert shapes["vae_decoder"]["z"] == (1, 4, height // 8, width // 8)
        assert shapes["vae_decoder"]["image"] == (1, 3, height, width)
        info = json.loads((repo / folder / "build-info.json").read_text())
        assert info["variant"]["resolution"] == (256 if width == height else f"{width}x{height}")
        for package in packages:
            weights.setdefault(_submodule(package), set()).add(
                _sha(package / "Data/com.apple.CoreML/weights/weight.bin"))
    assert all(len(digests) == 1 for digests in weights.values()), weights  # one weight file per component

    before = _stats(staging_hub)
    publish(loaded, publish_options)
    after = _stats(staging_hub)
    received = sum(after["bytes_received"].values()) - sum(before["bytes_received"].values())
    new = repo / "original_384x256"
    weight_bytes = sum(p.stat().st_size for p in new.rglob("weight.bin"))
    programs = sum(p.stat().st_size for p in new.rglob("*") if p.is_file() and p.name != "weight.bin")
    # the new folder's program files, build-info and the card went up; its weight files were on the Hub already
    assert weight_bytes > 1_000_000 and received < programs + 32 * 1024


@pytest.mark.slow
def test_a_pack_reuses_the_default_sizes_palettized_weights(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    """The 6-bit UNet of the 256x384 pack is the 256x256 one's weight file on its own program (no k-means run
    again), and it passes verification at its own size."""
    manifest = _write(tmp_path / "manifests", '[256, "256x384"]')
    manifest.write_text(manifest.read_text().replace("{type: float16}", "{type: palettize, nbits: 6}")
                        .replace("[text_encoder, unet, vae_decoder]", "[unet]"))
    options = BuildOptions(out=tmp_path / "out", store=tmp_path / "store", namespace="packs", compile=False,
                           endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False)
    said: list[str] = []
    result = build(load_manifests([manifest]), options, report=said.append)
    assert result.ok, [v.error for v in result.variants]
    compress = result.plan.steps_of("compress")
    assert sorted(s.params.rebase for s in compress) == [False, True]  # type: ignore[union-attr]
    assert all(s.id in result.built for s in compress)
    assert not any("compressed anew" in line for line in said), said
    (pack,) = [s.id for s in compress if s.params.rebase]  # type: ignore[union-attr]
    (stored,) = [r.parent for r in (tmp_path / "store" / "objects").glob("*/*/record.json")
                 if json.loads(r.read_text()).get("step") == pack]
    assert "rebased_from" in json.loads((stored / REPORT).read_text())  # no k-means run for the pack
    repo = tmp_path / "out" / "packs" / "coreml-tiny-packs"
    digests = {folder: _sha(next((repo / folder / "packages").glob("*_unet.mlpackage"))
                            / "Data/com.apple.CoreML/weights/weight.bin") for folder in ("original", "original_256x384")}
    assert len(set(digests.values())) == 1, digests
    info = json.loads((repo / "original_256x384" / "build-info.json").read_text())
    assert info["fidelity"]["unet"]["bits"] == 6 and info["fidelity"]["unet"]["output_psnr_db"] >= 35
