"""huggingface_hub's own tests, unmodified, against the staging Hub: the share of a curated core that passes.

Run by hand (not in CI; needs `pip install pytest-mock==3.17.0` and the package registry):
    python bench/hf_hub_suite.py [--work DIR] [--list]     (-- PYTEST-ARGS after it go to pytest)

The installed huggingface_hub's sdist (its `tests/` folder) is downloaded from the package index and its tests run
as they are, with a conftest of this project in place of theirs (the sdist has none): the fixtures they use (`api`,
`repo_factory`, cache folders under a temp dir) and their constants pointed at a staging Hub started here (their
`ENDPOINT_STAGING` and `USER`, set before the test modules import them). The core is the test classes that talk to
a Hub over its API and need nothing but a repo owner's token: no second user, no Xet, no production repo, no Spaces,
inference or payment API (`EXCLUDED` names the tests of those classes that need such a thing, with the reason).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import staging_client_env  # noqa: E402

# test_hf_api.py's classes that exercise the Hub's repo API (create, commit, LFS, tree, refs, history, delete)
CORE_CLASSES = (
    "TestHfApiRepoFileExists", "TestHfApiEndpoints", "TestCommitApi", "TestHfApiUploadEmptyFile",
    "TestHfApiDeleteFolder", "TestHfApiListRepoTree", "TestHfApiTagEndpoint", "TestHfApiBranchEndpoint",
    "TestHfApiDeleteFiles", "TestHfApiPrivate", "TestListGitRefs", "TestListGitCommits", "TestSquashHistory",
    "TestHfApiPublicStaging",
)
# the download side: snapshots, revisions, local folders, odd file names
DOWNLOAD_CLASSES = (
    "test_snapshot_download.py::TestSnapshotDownload", "test_snapshot_download.py::TestResolveRevision",
    "test_file_download.py::TestStagingDownload", "test_file_download.py::TestHfHubDownloadToLocalDir",
    "test_file_download.py::TestStagingCachedDownloadOnAwfulFilenames",
    "test_file_download.py::TestHfHubDownloadRelativePaths",
)
# tests of those classes that need what a staging Hub of one user cannot be: (test name prefix, reason)
EXCLUDED = (
    ("test_hf_api.py::TestHfApiRepoFileExists::test_file_exists", "points the client at hub-ci.huggingface.co itself"),
    ("test_hf_api.py::TestHfApiEndpoints::test_whoami_with_passing_token", "the CI user's organisation on the Hub"),
    ("test_hf_api.py::TestCommitApi::test_create_repo_private_by_default", "an Enterprise organisation's settings"),
    ("test_file_download.py::TestStagingDownload::test_download_from_a_gated_repo_with_hf_hub_download",
     "a second user (OTHER_TOKEN) outside the gate"),
)

CONFTEST = '''
"""coreml-publisher's harness for huggingface_hub's tests against its staging Hub (not huggingface_hub's file)."""
import os
from typing import Protocol

import pytest

from huggingface_hub import HfApi, RepoUrl, constants
from huggingface_hub.utils import SoftTemporaryDirectory

from . import testing_constants

testing_constants.ENDPOINT_STAGING = os.environ["HF_ENDPOINT"]
testing_constants.USER = "staging"
testing_constants.FULL_NAME = "Staging Hub user"

from .testing_utils import repo_name  # noqa: E402


def pytest_configure(config):
    for marker in ("production", "xet", "no_xet", "deprecated", "git_lfs", "vcr"):
        config.addinivalue_line("markers", marker)


@pytest.fixture(autouse=True)
def patch_constants(monkeypatch):
    with SoftTemporaryDirectory() as cache_dir:
        for name, sub in (("HF_HOME", ""), ("HF_HUB_CACHE", "hub"), ("HUGGINGFACE_HUB_CACHE", "hub"),
                          ("HF_XET_CACHE", "xet"), ("HF_ASSETS_CACHE", "assets"), ("HF_TOKEN_PATH", "token"),
                          ("HF_STORED_TOKENS_PATH", "stored_tokens")):
            monkeypatch.setattr(constants, name, os.path.join(cache_dir, sub) if sub else cache_dir)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_EXPERIMENTAL_WARNING", True)
        yield


@pytest.fixture(autouse=True)
def skip_what_needs_the_real_hub(request):
    for marker in ("production", "xet", "git_lfs"):
        if request.node.get_closest_marker(marker) is not None:
            pytest.skip(f"marked {marker}: needs the real Hub")


@pytest.fixture(scope="session")
def api():
    return HfApi(endpoint=testing_constants.ENDPOINT_STAGING, token=testing_constants.TOKEN)


class RepoFactory(Protocol):
    def __call__(self, repo_type: str = "model", **kwargs) -> RepoUrl: ...


@pytest.fixture
def repo_factory(api):
    created = []

    def factory(repo_type="model", **kwargs):
        kwargs.setdefault("repo_id", repo_name(prefix=repo_type))
        url = api.create_repo(repo_type=repo_type, **kwargs)
        created.append((url.repo_id, repo_type))
        return url

    yield factory
    for repo_id, repo_type in created:
        try:
            api.delete_repo(repo_id=repo_id, repo_type=repo_type)
        except Exception:
            pass
'''


def tests_folder(work: Path) -> Path:
    """The installed huggingface_hub's tests, from its sdist (downloaded once into `work`), with the harness."""
    version = importlib.metadata.version("huggingface_hub")
    unpacked = work / f"huggingface_hub-{version}"
    if not unpacked.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
                        f"huggingface_hub=={version}"], check=True, capture_output=True)
        with tarfile.open(work / f"huggingface_hub-{version}.tar.gz") as archive:
            archive.extractall(work, filter="data")
    tests = unpacked / "tests"
    (tests / "__init__.py").write_text("")
    (tests / "conftest.py").write_text(CONFTEST)
    return tests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--list", action="store_true", help="print the core's test ids and stop")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [arg for arg in pytest_args if arg != "--"]
    work = args.work or Path(tempfile.mkdtemp(prefix="hf-hub-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    port = staging_client_env(work)
    tests = tests_folder(work)
    from publisher.staging.process import start_staging_hub

    selection = [f"tests/test_hf_api.py::{name}" for name in CORE_CLASSES] + [f"tests/{c}" for c in DOWNLOAD_CLASSES]
    deselect = [arg for test, _ in EXCLUDED for arg in ("--deselect", f"tests/{test}")]
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
            "--rootdir", str(tests.parent), *selection, *deselect]
    if args.list:
        subprocess.run([*base, "--collect-only", "-q"], cwd=tests.parent, check=False)
        return
    with start_staging_hub(work / "hub", port=port) as hub:
        print(f"staging Hub at {hub.url}; huggingface_hub {importlib.metadata.version('huggingface_hub')}",
              flush=True)
        run = subprocess.run([*base, "-q", "-rfE", *pytest_args], cwd=tests.parent, text=True, capture_output=True)
    print(run.stdout[-20000:], run.stderr[-3000:], sep="\n")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", run.stdout)}
    passed = counts.get("passed", 0)
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    total = passed + failed
    print(f"core: {passed}/{total} passed ({100 * passed / max(total, 1):.1f}%), {counts.get('skipped', 0)} skipped "
          f"(marked production/xet), {len(EXCLUDED)} deselected (need the real Hub)")


if __name__ == "__main__":
    main()
