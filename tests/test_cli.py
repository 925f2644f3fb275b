"""CLI exit codes and one-line errors, through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "publisher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_validate_repo_manifests() -> None:
    result = run("validate", "manifests/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("6 manifests valid")


def test_plan_json_lists_every_variant() -> None:
    result = run("plan", "manifests/", "--json", "--namespace", "me")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    # the four SD models' 17 variants also at two more sizes; SD 1.5's two Core AI bundles
    assert data["counts"]["variants"] == 24 + 17 * 2 + 2
    assert {(v["repo"], v["attention"]) for v in data["variants"]} >= {
        ("me/coreml-stable-diffusion-v1-5", "ORIGINAL"), ("me/coreml-stable-diffusion-v1-5-palettized",
                                                           "SPLIT_EINSUM_V2")}
    bundles = [v for v in data["variants"] if v.get("format") == "coreai"]
    assert [(v["id"], v["coreai_compression"]) for v in bundles] == [
        ("me/coreml-stable-diffusion-v1-5/coreai", "float16"),
        ("me/coreml-stable-diffusion-v1-5-palettized/coreai", "6-bit palettized")]


def test_malformed_manifest_is_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "manifests" / "sd-v1-5.yaml").read_text().replace("nbits: 6", "nbits: 7"))
    result = run("validate", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {bad}:23: publish[1].precision.nbits: must be one of 1, 2, 4, 6, 8"]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    result = run("--debug", "validate", str(bad))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_missing_path_and_bad_namespace() -> None:
    result = run("validate", "no/such/dir")
    assert (result.returncode, result.stderr.strip()) == (1, "error: no/such/dir: no such file or directory")
    result = run("plan", "--namespace", "../x")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: namespace '../x': must be")


def test_a_usage_error_is_click_s_message_exit_2() -> None:
    """Not "internal error": typer raises its own copy of click's usage errors."""
    for args, message in ((("validate", "--bogus"), "No such option: --bogus"),
                          (("schema", "-o"), "Option '-o' requires an argument.")):
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert f"Error: {message}" in result.stderr and "internal error" not in result.stderr


def test_schema_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    result = run("schema", "--output", str(out))
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    committed = json.loads((ROOT / "manifests" / "manifest.schema.json").read_text())
    assert written == committed, "manifests/manifest.schema.json is stale: run `publisher schema -o` to refresh"
    stdout = json.loads(run("schema").stdout)
    assert stdout == written
    assert set(written["properties"]) == {"name", "family", "description", "source", "license", "resolution", "publish",
                                          "controlnets",
                                          "runners"}
    assert written["properties"]["family"]["enum"] == ["sd", "sdxl"]
    assert written["additionalProperties"] is False


def test_the_core_ai_check_refuses_a_runtime_that_is_not_the_os_framework(tmp_path: Path) -> None:
    """`--require-os-framework` (the macOS 27 job's) fails in one line where Core AI's runtime is its CPU reference
    one (Linux), before reading anything; a folder without a build says so."""
    result = run("verify", str(tmp_path), "--runtime", "coreai", "--require-os-framework")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not the OS framework" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run("verify", str(tmp_path), "--runtime", "coreai")
    assert result.returncode == 1 and "no build-info.json found" in result.stderr
