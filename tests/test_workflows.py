"""The scheduled workflow is correct before it ever runs: timeouts, token scope, pull-request guard, matrix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


@pytest.mark.parametrize("name", ["ci.yml", "publish.yml"])
def test_every_job_has_a_timeout_and_least_permissions(name: str) -> None:
    workflow = load(name)
    assert workflow["permissions"] == {}
    for job_name, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{name}:{job_name} has no timeout"
        assert job.get("permissions") == {"contents": "read"}, f"{name}:{job_name} asks for more than it needs"
        for step in job["steps"]:
            uses = step.get("uses")
            if uses:
                ref = uses.split("@", 1)[1]
                assert len(ref) == 40 and all(c in "0123456789abcdef" for c in ref), f"{uses} is not pinned by SHA"


def test_only_the_publish_job_sees_the_token_and_never_on_pull_requests() -> None:
    workflow = load("publish.yml")
    text = (WORKFLOWS / "publish.yml").read_text()
    assert text.count("secrets.") == 1
    for job_name, job in workflow["jobs"].items():
        dumped = json.dumps(job)
        if job_name == "publish":
            assert "secrets.HF_TOKEN" in dumped
            condition = job["if"].split(" && ")
            assert "github.event_name != 'pull_request'" in condition and "needs.compile.result == 'success'" in condition
            # the optional Core AI check gates publishing where it ran; skipped, it does not block
            assert "coreai-check" in job["needs"] and "needs.coreai-check.result == 'skipped'" in job["if"]
            assert job["environment"] == "hub-publish"
            assert job["concurrency"]["group"] == "publish-${{ matrix.repo }}"
        else:
            assert "secrets." not in dumped, job_name
    dry = workflow["jobs"]["publish-dry-run"]
    assert dry["if"] == "github.event_name == 'pull_request'"
    assert "--dry-run" in json.dumps(dry)


def test_matrix_comes_from_the_plan_and_never_fails_fast() -> None:
    workflow = load("publish.yml")
    for job_name in ("convert", "compile"):
        strategy = workflow["jobs"][job_name]["strategy"]
        assert strategy["fail-fast"] is False
        assert strategy["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert workflow["jobs"]["convert"]["if"] == "needs.plan.outputs.count != '0'"
    assert "--no-compile" in json.dumps(workflow["jobs"]["convert"])
    # the runners come from the manifests through the matrix: macOS for compiling, by default the standard sizes
    assert workflow["jobs"]["compile"]["runs-on"] == "${{ matrix.compile_runner }}"
    assert workflow["jobs"]["convert"]["runs-on"] == "${{ matrix.runner }}"
    from publisher.manifest import load_manifests
    from publisher.plan import build_plan

    jobs = build_plan(load_manifests([ROOT / "manifests"]), "ns").github_matrix()["include"]
    assert all(job["compile_runner"].startswith("macos") for job in jobs)
    assert {job["runner"] for job in jobs if "xl" not in job["manifest"]} == {"ubuntu-24.04"}


def test_plan_emits_the_matrix_the_workflow_reads() -> None:
    result = subprocess.run([sys.executable, "-m", "publisher", "plan", "manifests/", "--namespace", "ns",
                             "--github-matrix"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    matrix = json.loads(result.stdout)
    assert {"job", "variants", "manifest", "repos"} <= set(matrix["include"][0])
    jobs = [job["variants"].split() for job in matrix["include"]]
    assert sorted(v for job in jobs for v in job) == sorted({v for job in jobs for v in job})  # each variant once
    # the SD models' packs at two more sizes; SD 1.5's two Core AI bundles
    assert len({v for job in jobs for v in job}) == 24 + 17 * 2 + 2
    # per SD model: ORIGINAL of both repos at every size together (a 6-bit pack is made from the default size's
    # 6-bit weights, each size's float16 conversion is shared with the 6-bit repo), the float16 SPLIT_EINSUM variant
    # per size, the 6-bit SPLIT_EINSUM_V2 variants at every size (and SD 1.5's mixed-bit ones) together; SDXL:
    # ORIGINAL and SPLIT_EINSUM of both repos (the 6-bit repo reuses the float16 conversions); the community model's
    # two attentions apart; SD 1.5's two Core AI bundles a job each (they share only the VAE assets, cheap like the
    # VAE conversions, which each job that needs them makes)
    assert len(jobs) == 4 * (1 + 3 + 1) + 2 + 2 + 2


def test_each_shared_conversion_runs_in_one_job_only() -> None:
    from publisher.manifest import load_manifests
    from publisher.plan import build_plan

    plan = build_plan(load_manifests([ROOT / "manifests"]), "ns")
    job_of = {v: i for i, job in enumerate(plan.github_matrix()["include"]) for v in job["variants"].split()}
    heavy = [s for s in plan.steps.values() if s.kind in ("convert", "chunk") and s.params.attention]
    assert any(len(s.variants) > 1 for s in heavy)
    for step in heavy:  # the UNet and VAE conversions: one job each
        assert len({job_of[v] for v in step.variants}) == 1, step.id
    # the text encoder (every attention shares it) is converted in each job that needs it, not one job per model
    assert len({job_of[v] for s in plan.steps_of("convert") if s.params.component == "text_encoder"
                for v in s.variants}) == 24


@pytest.mark.skipif(shutil.which("actionlint") is None and not (Path(sys.executable).parent / "actionlint").exists(),
                    reason="actionlint is installed by .ci/run")
def test_actionlint_and_zizmor_pass() -> None:
    bin_dir = Path(sys.executable).parent
    for command in ([str(bin_dir / "actionlint")], [str(bin_dir / "zizmor"), "--offline", "--quiet"]):
        files = [str(WORKFLOWS / "ci.yml"), str(WORKFLOWS / "publish.yml")]
        result = subprocess.run(command + files, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_core_ai_check_runs_where_a_manifest_names_its_runner(tmp_path: Path) -> None:
    """`runners.coreai_check` puts a group with a Core AI bundle on the optional macOS 27 job (its packages artifact
    by index), which loads the bundles through the OS framework; groups without a bundle or a runner are not in it."""
    from publisher.manifest import load_manifests
    from publisher.plan import build_plan

    job = load("publish.yml")["jobs"]["coreai-check"]
    assert job["runs-on"] == "${{ matrix.coreai_runner }}" and job["needs"] == ["plan", "convert"]
    steps = json.dumps(job["steps"])
    assert "packages-${{ matrix.index }}" in steps and "--runtime coreai --require-os-framework" in steps
    assert "USE_OS_COREAI" in steps
    text = (ROOT / "manifests" / "sd-v1-5.yaml").read_text()
    assert "coreai_check" not in text  # optional: no manifest of the project asks for it yet
    manifest = tmp_path / "sd.yaml"
    manifest.write_text(text.replace("runners:", "runners:\n  coreai_check: macos-27", 1) if "runners:" in text
                        else text + "runners:\n  coreai_check: macos-27\n")
    matrix = build_plan(load_manifests([manifest]), namespace="ns").github_matrix()
    runners = {entry["coreai_runner"] for entry in matrix["include"]}
    assert runners == {"", "macos-27"}
    for entry in matrix["include"]:
        bundles = [variant for variant in entry["variants"].split() if variant.endswith("/coreai")]
        assert (entry["coreai_runner"] == "macos-27") == bool(bundles), entry
