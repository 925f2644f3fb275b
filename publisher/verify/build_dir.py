"""`publisher verify BUILD_DIR`: check every built package's outputs against PyTorch (reference executor on
Linux, Core ML itself on macOS)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from publisher.errors import PublisherError
from publisher.manifest import Attention, Component
from publisher.verify.fidelity import Fidelity, verify_package

PREFIX = "Stable_Diffusion_version_"


def submodule_of(package: Path, model_version: str) -> str:
    name = package.name.removeprefix(f"{PREFIX}{model_version}_").removesuffix(".mlpackage")
    if name not in {c.value for c in Component} | {"unet_chunk1", "unet_chunk2"}:
        raise PublisherError(f"{package}: cannot tell which model this is from its name")
    return name


def verify_build_dir(build_dir: Path, runtime: str, cache_dir: Path, endpoint: str | None, token: str | None,
                     say: Callable[[str], None] = lambda _: None) -> list[tuple[str, Fidelity]]:
    from publisher.engine.source import fetch_source

    infos = sorted(Path(build_dir).glob("*/*/*/build-info.json"))
    if not infos:
        raise PublisherError(f"{build_dir}: no build-info.json found (run `publisher build` first)")
    results = []
    for path in infos:
        info = json.loads(path.read_text())
        variant, source = info["variant"], info["source"]
        packages = sorted((path.parent / "packages").glob("*.mlpackage"))
        components = sorted({Component.UNET if submodule_of(p, source["repo"].replace("/", "_")).startswith("unet")
                             else Component(submodule_of(p, source["repo"].replace("/", "_"))) for p in packages},
                            key=list(Component).index)
        fetched = fetch_source(source["repo"], source["commit"], components, cache_dir, endpoint=endpoint,
                               token=token)
        for package in packages:
            submodule = submodule_of(package, source["repo"].replace("/", "_"))
            result = verify_package(package, fetched.path, submodule, Attention(variant["attention"]),
                                    int(variant["resolution"]), runtime=runtime)
            say(f"{variant['id']} {submodule}: min PSNR {result.min_psnr_db:.1f} dB "
                f"({'ok' if result.passed else 'UNDER THE BAR'})")
            results.append((variant["id"], result))
    return results
