"""`<attention>/build-info.json`: what a variant folder was built from and holds, read and written here only.

Versioned: a file of another version is refused in one line instead of being half understood. The engine writes it,
verification adds its runtime's PSNR, publishing diffs and cards from it, status compares it with the Hub's copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from publisher.errors import PublisherError
from publisher.util.atomic import atomic_write_text

BUILD_INFO = "build-info.json"
VERSION: Literal[1] = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Model):
    sha256: str
    size: int


class SourceInfo(_Model):
    repo: str
    revision: str
    commit: str
    files: dict[str, dict[str, Any]] = {}  # source file -> size, sha256 (what was downloaded and loaded)
    scale: float | None = None  # a LoRA's: the scale it was fused at
    architecture: str | None = None  # a single-file checkpoint's config repo: what the checkpoint was found to be


class ManifestRef(_Model):
    name: str
    variant_sha256: str  # this variant's settings, hashed


class BuildInfo(_Model):
    version: Literal[1] = VERSION
    variant: dict[str, Any]  # publisher.plan.Variant.to_json()
    source: SourceInfo
    # the other repos components were read from, by role (a custom VAE: "vae"; SDXL's refiner: "refiner"; a
    # single-file checkpoint's config repo: "config"; the LoRAs fused in, in order: "lora01", "lora02", ...)
    extra_sources: dict[str, SourceInfo] = {}
    manifest: ManifestRef
    tools: dict[str, str]
    compiled: bool
    files: dict[str, FileEntry]  # relative to the variant folder; the zip as ../<name>.zip
    fidelity: dict[str, dict[str, Any]] = {}  # submodule -> figures (output PSNR, the compression scheme's own)
    references: dict[str, str] = {}  # submodule -> store key of its stored reference outputs
    build_seconds: float = 0.0
    # what an app must configure for this model (the card says it): the VAE's scaling factor, whether the VAE
    # packages are float32 (its config asks to be upcast)
    app: dict[str, Any] = {}
    # the end-to-end check (publisher.evaluate), where the build ran it: figures, settings, runtime
    evaluation: dict[str, Any] = {}
    # a Core AI bundle's assets (`coreai/`): component -> asset, compression, stored value types
    coreai: dict[str, Any] = {}

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if not data["evaluation"]:
            del data["evaluation"]
        if not data["extra_sources"]:  # absent when there are none: such a file reads as it always did
            del data["extra_sources"]
        if not data["app"]:
            del data["app"]
        if not data["coreai"]:
            del data["coreai"]
        for source in (data["source"], *data.get("extra_sources", {}).values()):
            for name in ("scale", "architecture"):  # only where they apply (a LoRA, a checkpoint's config)
                if source[name] is None:
                    del source[name]
        return data


def read_build_info(path: Path) -> BuildInfo:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PublisherError(f"{path}: cannot read build-info: {exc}") from exc
    if isinstance(data, dict) and data.get("version", VERSION) != VERSION:
        raise PublisherError(f"{path}: build-info version {data.get('version')!r}; this publisher reads version "
                             f"{VERSION} (rebuild the variant)")
    try:
        return BuildInfo.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise PublisherError(f"{path}: not a build-info file: {where}: {first['msg']}") from exc


def write_build_info(path: Path, info: BuildInfo) -> None:
    atomic_write_text(Path(path), json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")


def find_build_infos(build_dir: Path) -> list[Path]:
    """Every variant's build-info under a build output folder (`<org>/<repo>/<attention>/build-info.json`)."""
    infos = sorted(Path(build_dir).glob(f"*/*/*/{BUILD_INFO}"))
    if not infos:
        raise PublisherError(f"{build_dir}: no {BUILD_INFO} found (run `publisher build` first)")
    return infos
