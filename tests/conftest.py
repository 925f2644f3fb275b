"""Shared fixtures. The staging Hub's address and the client's settings are fixed before huggingface_hub is
imported anywhere: the client reads HF_ENDPOINT and HF_HUB_DISABLE_XET at import time."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


STAGING_PORT = _free_port()
STAGING_TOKEN = "staging-test-token-0123456789"
_HF_HOME = tempfile.mkdtemp(prefix="publisher-hf-home-")
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{STAGING_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)

from publisher.staging.process import StagingHub, start_staging_hub  # noqa: E402
from tests.helpers import SD_COMPONENTS  # noqa: E402


@pytest.fixture(scope="session")
def staging_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StagingHub]:
    """One staging Hub for the session, on the port HF_ENDPOINT names, writes guarded by STAGING_TOKEN."""
    root = tmp_path_factory.mktemp("staging-hub")
    with start_staging_hub(root, port=STAGING_PORT, token=STAGING_TOKEN) as hub:
        yield hub


@pytest.fixture
def hf_api(staging_hub: StagingHub):  # type: ignore[no-untyped-def]
    from huggingface_hub import HfApi

    return HfApi(endpoint=staging_hub.url, token=staging_hub.token)


@pytest.fixture
def repo_id(request: pytest.FixtureRequest, hf_api) -> str:  # type: ignore[no-untyped-def]
    """A fresh repo named after the test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:80].strip("-")
    repo = f"tester/{name}"
    hf_api.create_repo(repo, exist_ok=False)
    return repo


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def tiny_source_repo(staging_hub: StagingHub, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny SD-shaped source model published on the staging Hub (diffusers layout)."""
    from publisher.tiny import build_tiny_pipeline, push_tiny_source
    from tests.helpers import TINY_SOURCE_REPO

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-source") / "sd")
    push_tiny_source(folder, TINY_SOURCE_REPO, staging_hub.url, staging_hub.token)
    return TINY_SOURCE_REPO


RESOLUTION = 256


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from publisher.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "source")


@pytest.fixture(scope="session")
def converted(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every component x attention implementation converted once (float16, iOS16); a component the attention does
    not change (all but the UNet) once for all of them, as the build does."""
    from publisher.convert.coreml import PackageMetadata, convert_component
    from publisher.deployment import DeploymentTarget
    from publisher.family import family_named
    from publisher.vocabulary import Attention, Component

    out = tmp_path_factory.mktemp("packages")
    packages = {}
    for attention in Attention:
        for component in SD_COMPONENTS:
            # the safety checker only exists at 512 (the Swift pipeline feeds it a 512x512 image)
            resolution = 512 if component == Component.SAFETY_CHECKER else RESOLUTION
            if attention is not Attention.ORIGINAL and not family_named("sd").component(component).uses_attention:
                packages[attention, component] = packages[Attention.ORIGINAL, component]
                continue
            path = out / attention.folder / f"{component.value}.mlpackage"
            convert_component(tiny_source, component, attention, resolution, DeploymentTarget.iOS16, path,
                              PackageMetadata("tiny/sd@main", "mit", attention))
            packages[attention, component] = path
            packages["resolution", component] = resolution
    return packages


@pytest.fixture(scope="session")
def two_repo_build(tmp_path_factory: pytest.TempPathFactory, staging_hub: StagingHub, tiny_source_repo: str):  # type: ignore[no-untyped-def]
    """The tiny two-repo manifest (float16 and 6-bit, ORIGINAL and SPLIT_EINSUM_V2) built once, namespace "tester":
    (work folder, build result). A copy of its store, taken right after the build, seeds the stores of the tests that
    need these outputs but not their making (`seed_store`): their builds then only assemble."""
    import shutil

    from publisher.engine.build import BuildOptions, build
    from publisher.manifest import load_manifests
    from tests.helpers import stored_copy, write_manifest

    work = tmp_path_factory.mktemp("two-repo-build")
    manifest = write_manifest(work / "manifests")
    result = build(load_manifests([manifest]), BuildOptions(
        out=work / "out", store=work / "store", namespace="tester", compile=False, endpoint=staging_hub.url,
        token=staging_hub.token, isolate=False, progress=False))
    assert result.ok, [v.error for v in result.variants]
    shutil.copytree(work / "store", stored_copy(work), symlinks=True)
    return work, result

