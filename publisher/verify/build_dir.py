"""`publisher verify BUILD_DIR`: hold every built package to the PyTorch outputs its build stored.

No PyTorch model is loaded here: the seeded inputs and reference outputs were computed once by the build's verify
step (on Linux, where memory is plentiful) and kept in the build store; this runs each package on them in the
chosen runtime (the executor on Linux, Core ML on macOS), one model at a time, and writes the figures into the
variant's build-info.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from publisher.build_info import find_build_infos, read_build_info, write_build_info
from publisher.errors import PublisherError
from publisher.family import DEFAULT_FAMILY, family_named
from publisher.verify.fidelity import REFERENCE, Fidelity, Reference, compare
from publisher.verify.runtime import Runtime


def submodule_of(package: Path, model_version: str, family: str = DEFAULT_FAMILY) -> str:
    name = family_named(family).submodule_of_package(package.name, model_version)
    if name is None:
        raise PublisherError(f"{package}: cannot tell which model this is from its name")
    return name


def stored_reference(store: Path, key: str) -> Path:
    return Path(store) / "objects" / key[:2] / key / REFERENCE


def verify_build_dir(build_dir: Path, runtime: Runtime, store: Path,
                     say: Callable[[str], None] = lambda _: None) -> list[tuple[str, Fidelity]]:
    results = []
    for path in find_build_infos(build_dir):
        info = read_build_info(path)
        variant = info.variant
        references = info.references
        for package in sorted((path.parent / "packages").glob("*.mlpackage")):
            submodule = submodule_of(package, info.source.repo.replace("/", "_"), variant.get("family", DEFAULT_FAMILY))
            key = references.get(submodule)
            reference_path = stored_reference(store, key) if key else None
            if reference_path is None or not reference_path.is_file():
                raise PublisherError(f"{variant['id']} {submodule}: no stored reference outputs in {store} (build "
                                     "it with verification on, and bring the store's objects along)")
            result = compare(package, Reference.load(reference_path), runtime)
            say(f"{variant['id']} {submodule}: min PSNR {result.min_psnr_db:.1f} dB on {runtime.name} "
                f"({'ok' if result.passed else 'UNDER THE BAR'})")
            info.fidelity.setdefault(submodule, {})[f"{runtime.name}_psnr_db"] = round(result.min_psnr_db, 2)
            results.append((variant["id"], result))
        write_build_info(path, info)
    return results
