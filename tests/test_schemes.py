"""The compression-scheme plug-in point: a scheme defined only here (an identity "compression") is validated in
manifests, planned, run by the engine and shown on record without any other module knowing it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from publisher.compress.scheme import (
    CompressContext,
    CompressionScheme,
    CompressionSettings,
    register_scheme,
    scheme_named,
    schemes,
    unregister_scheme,
)
from publisher.deployment import DeploymentTarget
from publisher.errors import ManifestError, PublisherError
from publisher.manifest import load_manifest, load_manifests
from publisher.plan import CompressParams, build_plan
from tests.helpers import MANIFEST_HEAD, write_manifest


class IdentitySettings(CompressionSettings):
    type: Literal["identity"]
    tag: str = Field(default="same", pattern="^[a-z]+$")


class Identity(CompressionScheme):
    """Copies the package: every hook of the protocol, nothing compressed."""

    name = "identity"
    settings_model = IdentitySettings
    applied: list[str] = []  # noqa: RUF012 - what apply() saw, for the tests

    def compresses(self, settings: CompressionSettings, component: str) -> bool:
        return component == "unet"

    def label(self, settings: CompressionSettings) -> str:
        assert isinstance(settings, IdentitySettings)
        return f"identity-{settings.tag}"

    def minimum_target(self, settings: CompressionSettings) -> DeploymentTarget:
        return DeploymentTarget.iOS17

    def apply(self, source: Path, output: Path, settings: CompressionSettings, context: CompressContext
              ) -> dict[str, Any]:
        assert isinstance(settings, IdentitySettings)
        if settings.tag == "boom":
            _rewrite_the_weights(source)
        shutil.copytree(source, output)
        self.applied.append(context.component)
        return {"bytes": sum(p.stat().st_size for p in output.rglob("*") if p.is_file())}

    def figures(self, report: dict[str, Any]) -> dict[str, Any]:
        return {"scheme": self.name, "bits": 16, "compressed_ops": 0, "package_bytes": report["bytes"]}


def _rewrite_the_weights(source: Path) -> None:
    raise RuntimeError(f"cannot rewrite {source.name}")


@pytest.fixture
def identity() -> Iterator[Identity]:
    scheme = Identity()
    register_scheme(scheme)
    yield scheme
    unregister_scheme(scheme.name)


IDENTITY_MANIFEST = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-identity"
    precision: {{type: identity, tag: copy}}
    attention: [ORIGINAL]
    components: [text_encoder, unet]
    layouts: [packages]
"""


def test_a_registered_scheme_is_validated_planned_and_labelled(identity: Identity, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, text=IDENTITY_MANIFEST)
    loaded = load_manifest(manifest)
    target = loaded.manifest.publish[0]
    assert isinstance(target.precision, IdentitySettings)
    assert target.deployment_target is DeploymentTarget.iOS17  # the scheme's minimum is the default target
    plan = build_plan([loaded], "me")
    compress = plan.steps_of("compress")
    assert [s.id.split(":")[0] for s in compress] == ["identity"]  # the UNet only: compresses() said so
    assert isinstance(compress[0].params, CompressParams) and compress[0].params.settings == {"type": "identity",
                                                                                             "tag": "copy"}
    assert plan.variants[0].precision.label == "identity-copy"


def test_a_scheme_validates_its_own_fields(identity: Identity, tmp_path: Path) -> None:
    bad = write_manifest(tmp_path, text=IDENTITY_MANIFEST.replace("tag: copy", "tag: Copy1"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(bad)
    assert caught.value.args[0] == f"{bad}:10: publish[0].precision.tag: does not match ^[a-z]+$"
    # a field of another scheme is named as such
    other = write_manifest(tmp_path, text=IDENTITY_MANIFEST.replace("tag: copy", "nbits: 6"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(other)
    assert caught.value.args[0].endswith("publish[0].precision.nbits: only allowed when type is 'palettize'")


def test_unknown_types_list_the_registered_schemes(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, text=IDENTITY_MANIFEST)
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert caught.value.args[0] == f"{manifest}:10: publish[0].precision.type: must be one of float16, palettize"
    assert set(schemes()) == {"float16", "palettize"}
    with pytest.raises(PublisherError, match="unknown compression scheme 'identity'"):
        scheme_named("identity")


@pytest.mark.slow
def test_the_engine_runs_a_registered_scheme(identity: Identity, tmp_path: Path, staging_hub, tiny_source_repo
                                             ) -> None:  # type: ignore[no-untyped-def]
    from publisher.engine.build import BuildOptions, build

    identity.applied.clear()
    manifest = write_manifest(tmp_path / "manifests", text=IDENTITY_MANIFEST)
    result = build(load_manifests([manifest]), BuildOptions(
        out=tmp_path / "out", store=tmp_path / "store", namespace="tester", compile=False, endpoint=staging_hub.url,
        token=staging_hub.token, isolate=False, progress=False))
    assert result.ok, [v.error for v in result.variants]
    assert identity.applied == ["unet"]
    info = json.loads((tmp_path / "out/tester/coreml-tiny-sd-identity/original/build-info.json").read_text())
    assert info["variant"]["precision"] == {"type": "identity", "tag": "copy"}
    assert info["variant"]["precision_label"] == "identity-copy"
    unet = info["fidelity"]["unet"]
    assert unet["scheme"] == "identity" and unet["package_bytes"] > 0  # the scheme's own figures, on record
    assert unet["output_psnr_db"] >= 35  # verified like any package
    assert "scheme" not in info["fidelity"]["text_encoder"]  # not compressed: no figures
    # a scheme that fails: one line for the table, the step's whole traceback kept for --debug
    (tmp_path / "manifests" / "tiny-sd.yaml").write_text(
        (tmp_path / "manifests" / "tiny-sd.yaml").read_text().replace("tag: copy", "tag: boom"))
    failed = build(load_manifests([manifest]), BuildOptions(
        out=tmp_path / "out", store=tmp_path / "store", namespace="tester", compile=False, endpoint=staging_hub.url,
        token=staging_hub.token, isolate=False, progress=False))
    variant = failed.variants[0]
    assert variant.status == "failed" and "\n" not in (variant.error or "")
    assert variant.error is not None and "RuntimeError: cannot rewrite model.mlpackage" in variant.error
    assert variant.traceback is not None and "_rewrite_the_weights" in variant.traceback
