"""Publishing end to end through the unmodified client: build tiny -> publish -> download -> card -> republish."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download

from publisher.engine.build import BuildOptions, build
from publisher.manifest import load_manifests
from publisher.publish import PublishOptions, publish, status
from tests.helpers import seed_store, write_manifest

pytestmark = pytest.mark.slow  # converts, builds or publishes models


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache" not in p.parts}


def _stats(hub) -> dict:  # type: ignore[no-untyped-def]
    import urllib.request

    request = urllib.request.Request(f"{hub.url}/api/staging/stats", headers={"Authorization": f"Bearer {hub.token}"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, staging_hub, two_repo_build):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("publish")
    manifest = write_manifest(work / "manifests")
    seed_store(two_repo_build, work / "store")  # the conversions are the build tests' (only the assembly runs here)
    loaded = load_manifests([manifest])
    build_options = BuildOptions(out=work / "out", store=work / "store", namespace="pub", compile=False,
                                 endpoint=staging_hub.url, token=staging_hub.token, isolate=False, progress=False)
    result = build(loaded, build_options)
    assert result.ok
    options = PublishOptions(out=work / "out", namespace="pub", target="staging", endpoint=staging_hub.url,
                             token=staging_hub.token)
    outcomes = publish(loaded, options)
    return work, manifest, build_options, options, outcomes


def test_download_returns_exactly_the_built_files(published, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, *_ = published
    for repo in ("pub/coreml-tiny-sd", "pub/coreml-tiny-sd-palettized"):
        for folder in ("original", "split_einsum_v2"):
            local = tmp_path / repo / folder
            snapshot_download(repo, allow_patterns=f"{folder}/packages/*", local_dir=local, endpoint=staging_hub.url,
                              token=staging_hub.token)
            built = _files(work / "out" / repo / folder / "packages")
            got = _files(local / folder / "packages")
            assert got == built and len(built) >= 12  # 4 packages (no safety checker at 256) x 3 files


def test_one_commit_per_variant_and_card(published, hf_api: HfApi, staging_hub) -> None:  # type: ignore[no-untyped-def]
    *_, outcomes = published
    for outcome in outcomes:
        assert len(outcome.commits) == 2  # original, split_einsum_v2 (the card rode with the last)
        titles = [c.title for c in hf_api.list_repo_commits(outcome.repo_id)]
        assert titles[:2] == ["Publish split_einsum_v2", "Publish original"]
        files = hf_api.list_repo_files(outcome.repo_id, revision=outcome.commits[0])
        assert "README.md" not in files and not any(f.startswith("split_einsum_v2/") for f in files)
    card_path = hf_hub_download("pub/coreml-tiny-sd-palettized", "README.md", endpoint=staging_hub.url,
                                token=staging_hub.token)
    card = ModelCard.load(card_path)
    card.validate()  # the staging Hub's validate-yaml, as on huggingface.co
    assert card.data.license == "mit"
    assert set(card.data.tags) == {"coreml", "core-ml", "stable-diffusion", "text-to-image"}
    assert card.data.base_model == "tiny/sd"
    assert card.data.pipeline_tag == "text-to-image"
    assert '| `split_einsum_v2/` | 256x256 | SPLIT_EINSUM_V2 | ALL | 6-bit | iOS17 |' in card.text
    assert 'snapshot_download("pub/coreml-tiny-sd-palettized", allow_patterns="original/packages/*"' in card.text
    assert "| `original` | unet | 6 |" in card.text
    float16_card = ModelCard.load(hf_hub_download("pub/coreml-tiny-sd", "README.md", endpoint=staging_hub.url,
                                                  token=staging_hub.token))
    assert "None" not in float16_card.text and "None" not in card.text
    assert "| `original` | unet | 16 (float) | 0 | n/a | n/a |" in float16_card.text
    assert "| `original/` | 256x256 | ORIGINAL | CPU_AND_GPU | float16 | iOS16 | macOS (GPU) |" in float16_card.text


def test_republish_sends_nothing(published, staging_hub, hf_api: HfApi) -> None:  # type: ignore[no-untyped-def]
    _work, manifest, _, options, _ = published
    heads = {r: hf_api.repo_info(r).sha for r in ("pub/coreml-tiny-sd", "pub/coreml-tiny-sd-palettized")}
    before = _stats(staging_hub)["bytes_received"]
    outcomes = publish(load_manifests([manifest]), options)
    assert [o.commits for o in outcomes] == [[], []]
    assert _stats(staging_hub)["bytes_received"] == before
    assert {r: hf_api.repo_info(r).sha for r in heads} == heads


def test_changed_variant_republishes_alone(published, staging_hub, hf_api: HfApi, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _work, manifest, build_options, options, _ = published
    # SPLIT_EINSUM_V2 of the float16 repo runs on CPU_AND_NE now: only that variant's build-info and card change
    text = manifest.read_text().replace(
        "    attention: [ORIGINAL, SPLIT_EINSUM_V2]\n    layouts: [packages]\n  - repo",
        "    attention: [ORIGINAL, SPLIT_EINSUM_V2]\n    compute_units: {SPLIT_EINSUM_V2: CPU_AND_NE}\n"
        "    layouts: [packages]\n  - repo", 1)
    assert text != manifest.read_text()
    changed = tmp_path / "tiny-sd.yaml"
    changed.write_text(text)
    loaded = load_manifests([changed])
    assert build(loaded, build_options).ok
    before = hf_api.repo_info("pub/coreml-tiny-sd").sha
    other = hf_api.repo_info("pub/coreml-tiny-sd-palettized").sha
    outcomes = publish(loaded, options)
    by_repo = {o.repo_id: o for o in outcomes}
    assert len(by_repo["pub/coreml-tiny-sd"].commits) == 1
    assert by_repo["pub/coreml-tiny-sd-palettized"].commits == []
    assert hf_api.repo_info("pub/coreml-tiny-sd-palettized").sha == other
    commit = hf_api.list_repo_commits("pub/coreml-tiny-sd")[0]
    assert commit.title == "Publish split_einsum_v2"
    diff = [d for d in by_repo["pub/coreml-tiny-sd"].diffs if not d.empty]
    assert [d.folder for d in diff] == ["split_einsum_v2"]
    assert {c.path for c in diff[0].changed} == {"split_einsum_v2/build-info.json"}
    assert hf_api.repo_info("pub/coreml-tiny-sd").sha != before
    rows = {r.variant.id: r for r in status(loaded, "pub", staging_hub.url, staging_hub.token)}
    assert all(r.published for r in rows.values())
    assert rows["pub/coreml-tiny-sd/split_einsum_v2"].current
    stale = {r.variant.id: r for r in status(load_manifests([manifest]), "pub", staging_hub.url, staging_hub.token)}
    assert stale["pub/coreml-tiny-sd/split_einsum_v2"].reason == "manifest settings changed"
    assert stale["pub/coreml-tiny-sd/original"].current


def test_dry_run_and_create_pr(published, staging_hub, hf_api: HfApi, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _work, manifest, build_options, options, _ = published
    text = manifest.read_text().replace("description: tiny SD-shaped model for tests", "description: changed")
    text = text.replace("nbits: 6", "nbits: 4")
    changed = tmp_path / "tiny-sd.yaml"
    changed.write_text(text)
    loaded = load_manifests([changed])
    assert build(loaded, build_options).ok
    head = hf_api.repo_info("pub/coreml-tiny-sd-palettized").sha
    dry = publish(loaded, PublishOptions(**{**options.__dict__, "dry_run": True}))
    palettized = next(o for o in dry if o.repo_id.endswith("palettized"))
    assert palettized.commits == [] and all(not d.empty for d in palettized.diffs)
    assert hf_api.repo_info("pub/coreml-tiny-sd-palettized").sha == head
    outcomes = publish(loaded, PublishOptions(**{**options.__dict__, "create_pr": True}))
    palettized = next(o for o in outcomes if o.repo_id.endswith("palettized"))
    assert palettized.pr_url and palettized.pr_url.endswith("/discussions/1")
    assert len(palettized.commits) == 2
    assert hf_api.repo_info("pub/coreml-tiny-sd-palettized").sha == head  # main untouched
    pr_files = hf_api.list_repo_files("pub/coreml-tiny-sd-palettized", revision="refs/pr/1")
    assert "README.md" in pr_files


def test_publish_cli_dry_run(published, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work, manifest, *_ = published
    result = subprocess.run([sys.executable, "-m", "publisher", "publish", str(manifest), "--out", str(work / "out"),
                             "--namespace", "pub", "--endpoint", staging_hub.url, "--dry-run"],
                            capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "STAGING_HUB_TOKEN": staging_hub.token})
    assert result.returncode == 0, result.stderr
    assert staging_hub.token not in result.stdout + result.stderr
    assert "dry run: nothing sent" in result.stdout


def test_current_repos_give_an_empty_matrix(published, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work, manifest, build_options, *_ = published
    env = {**__import__("os").environ, "STAGING_HUB_TOKEN": staging_hub.token}
    command = [sys.executable, "-m", "publisher", "status", str(manifest), "--namespace", "pub", "--endpoint",
               staging_hub.url]
    # the tests above built and published edited manifests: rebuild (all cached) and publish this one again
    assert build(load_manifests([manifest]), build_options).built == []
    publish(load_manifests([manifest]), PublishOptions(out=work / "out", namespace="pub", target="staging",
                                                       endpoint=staging_hub.url, token=staging_hub.token))
    table = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert table.returncode == 0, table.stderr
    matrix = subprocess.run(command + ["--github-matrix"], capture_output=True, text=True, timeout=300, env=env)
    assert json.loads(matrix.stdout) == {"include": []}, table.stdout


def test_retry_after_a_pr_was_opened_continues_on_that_pr(published, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The first variant's commit opens a PR, the second one fails (500): the retry diffs against the PR and
    commits the rest there, instead of opening a second PR against main."""
    import shutil

    from publisher.plan import build_plan
    from publisher.publish.hub import publish_repo
    from publisher.staging.process import start_staging_hub

    work, manifest, *_ = published
    repo_id = "pub/coreml-tiny-sd-palettized"
    variants = [v for v in build_plan(load_manifests([manifest]), "pub").variants if v.repo_id == repo_id]
    assert len(variants) == 2
    repo_dir = tmp_path / "repo"
    shutil.copytree(work / "out" / repo_id, repo_dir)
    # commits 1 and 2 publish both variants to main; commit 3 opens the PR; commit 4 (the second variant) fails
    with start_staging_hub(tmp_path / "hub", token="t", env={"PUBLISHER_STAGING_FAULTS": '{"commit": [[4, 500]]}'}) \
            as hub:
        api = HfApi(endpoint=hub.url, token="t")
        first = publish_repo(api, repo_id, repo_dir, variants, hub.url, backoff_s=0.1)
        assert len(first.commits) == 2 and first.pr_url is None
        head = api.repo_info(repo_id).sha
        for info_path in sorted(repo_dir.glob("*/build-info.json")):
            info = json.loads(info_path.read_text())
            info["build_seconds"] = 12345.6  # a rebuild
            info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        messages: list[str] = []
        outcome = publish_repo(api, repo_id, repo_dir, variants, hub.url, create_pr=True, say=messages.append,
                               backoff_s=0.1)
        assert any("attempt 1 failed" in m for m in messages)
        assert outcome.pr_url and outcome.pr_url.endswith("/discussions/1")
        assert len(outcome.commits) == 2
        assert [d.num for d in api.get_repo_discussions(repo_id)] == [1]  # no second PR
        assert api.repo_info(repo_id).sha == head  # main untouched
        on_pr = {p: json.loads(Path(hf_hub_download(repo_id, p, revision="refs/pr/1", endpoint=hub.url,
                                                    cache_dir=tmp_path / "dl")).read_text())
                 for p in api.list_repo_files(repo_id, revision="refs/pr/1") if p.endswith("build-info.json")}
        assert len(on_pr) == 2 and all(info["build_seconds"] == 12345.6 for info in on_pr.values())
