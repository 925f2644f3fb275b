"""The README's first command: `publisher demo` runs the whole job offline and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # converts, builds or publishes models


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # its own Hub, its own cache
    result = subprocess.run([sys.executable, "-m", "publisher", "demo", "--keep", str(tmp_path / "demo")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("5. downloaded demo/coreml-tiny-sd-palettized split_einsum_v2/packages") for line in lines)
    assert "7. republished: 0 new commits (nothing had changed)" in lines
    end_to_end = next(line for line in lines if line.startswith("6. end to end"))
    assert float(end_to_end.split("coreml-tiny-sd/original image ")[1].split(" dB")[0]) >= 30, end_to_end
    assert end_to_end.count("against float16") == 2, end_to_end  # the palettized variants
    assert "Running MIL" not in result.stdout + result.stderr
