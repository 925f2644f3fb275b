"""`.mlpackage` -> `.mlmodelc` with Apple's compiler (macOS with Xcode only). Never faked: off macOS this fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from publisher.errors import ToolchainError

COMPILER_MISSING = ("compiling to .mlmodelc needs macOS with Xcode (xcrun coremlcompiler), not found here; "
                    "build with --no-compile and run `publisher compile BUILD_DIR` on a macOS machine")


def compiler_available() -> bool:
    return shutil.which("xcrun") is not None


def require_compiler() -> None:
    if not compiler_available():
        raise ToolchainError(COMPILER_MISSING)


def compile_package(package: Path, output_dir: Path, timeout_s: int = 3600) -> Path:
    """Run `xcrun coremlcompiler compile PACKAGE OUTPUT_DIR`; return the .mlmodelc it produced."""
    require_compiler()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(output_dir)],
                                capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ToolchainError(f"coremlcompiler timed out after {timeout_s} s on {package.name}") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ToolchainError(f"coremlcompiler failed on {package.name} (exit {result.returncode}): "
                             f"{detail[-1] if detail else 'no output'}")
    compiled = output_dir / (package.stem + ".mlmodelc")
    if not compiled.is_dir() or not any(compiled.iterdir()):
        raise ToolchainError(f"coremlcompiler exited 0 but produced no {compiled.name} in {output_dir}")
    return compiled
