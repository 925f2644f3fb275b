"""The versions of the libraries a build's output depends on (part of every stored step's key and of build-info)."""

from __future__ import annotations

import functools
import platform

# what converts, compresses, verifies and writes the packages
LIBRARIES = ("coremltools", "torch", "diffusers", "transformers", "numpy", "safetensors", "numba")
# what exports and compresses a Core AI bundle (the `coreai` extra): part of the keys of its steps only, so that the
# Core ML steps' keys do not depend on whether it is installed
COREAI_LIBRARIES = ("coreai-core", "coreai-torch", "coreai-opt")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **_versions(LIBRARIES)}


@functools.lru_cache(maxsize=1)
def coreai_versions() -> dict[str, str]:
    return _versions(COREAI_LIBRARIES)


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions
