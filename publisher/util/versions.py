"""The versions of the libraries a build's output depends on (part of every stored step's key and of build-info)."""

from __future__ import annotations

import functools
import platform

# what converts, compresses, verifies and writes the packages
LIBRARIES = ("coremltools", "torch", "diffusers", "transformers", "numpy", "safetensors", "numba")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return dict(versions)
