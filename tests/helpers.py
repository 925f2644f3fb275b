"""Test helpers shared by the build, publish and reliability tests."""

from __future__ import annotations

from pathlib import Path

from publisher.family import family_named

TINY_SOURCE_REPO = "tiny/sd"
# what the tiny SD fixture has, as a build takes them by default (the ControlledUnet, asked for: tests/test_controlnet.py)
SD_COMPONENTS = tuple(c for c in family_named("sd").component_names if not family_named("sd").component(c).optional)

MANIFEST_HEAD = """\
name: tiny-sd
description: tiny SD-shaped model for tests
source:
  repo: {source}
  revision: main
license: mit
resolution: 256
publish:
"""
TWO_REPO_MANIFEST = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd"
    precision: {{type: float16}}
    attention: [ORIGINAL, SPLIT_EINSUM_V2]
    layouts: [packages]
  - repo: "{{namespace}}/coreml-tiny-sd-palettized"
    precision: {{type: palettize, nbits: 6}}
    attention: [ORIGINAL, SPLIT_EINSUM_V2]
    layouts: [packages]
"""


def write_manifest(folder: Path, source: str = TINY_SOURCE_REPO, text: str = TWO_REPO_MANIFEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-sd.yaml"
    path.write_text(text.format(source=source))
    return path


# the float16 SPLIT_EINSUM repo for iOS: the UNet in two chunks
CHUNKED_MANIFEST = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-ios"
    precision: {{type: float16}}
    attention: [SPLIT_EINSUM]
    chunk_unet: [SPLIT_EINSUM]
    layouts: [packages]
"""


def stored_copy(work: Path) -> Path:
    """Where the two-repo build (tests/conftest.py `two_repo_build`) keeps a copy of its store as it was right after
    the build (later tests edit the original)."""
    return work.parent / f"{work.name}-store-copy"


def seed_store(two_repo_build: tuple[Path, object], store: Path) -> None:
    """A new store holding the two-repo build's outputs: a build of that manifest into it only assembles."""
    import shutil

    shutil.copytree(stored_copy(two_repo_build[0]), store, symlinks=True)


def manifest_errors(text: str, folder: Path) -> list[str]:
    """A manifest text's problems as `parse_manifest` reports them, each without the file's path
    (`line: field: message`)."""
    from publisher.manifest import parse_manifest

    path = folder / "m.yaml"
    return [error.removeprefix(f"{path}:") for error in parse_manifest(text, path)[1]]
