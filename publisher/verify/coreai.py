"""Core AI bundles held to PyTorch: each asset run once through Core AI's runtime on the seeded inputs its build
stored, against the PyTorch float32 outputs stored with them.

The runtime is the OS framework on macOS 27 (coreai's wheel uses it there), its CPU reference runtime elsewhere (a
full-size UNet call takes minutes there: the scheduled workflow's optional macOS 27 job runs the check,
`runners.coreai_check`). A float16 asset is held to the 35 dB bar; a compressed one (INT4, palettized) has no
decoded-weights reference to be held to (Core AI's compressed layout is not read here): its outputs must be finite
and of the reference's shapes, and their PSNR against the float model is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from publisher.build_info import find_build_infos, read_build_info, write_build_info
from publisher.errors import PublisherError
from publisher.metrics import psnr
from publisher.verify.build_dir import stored_reference
from publisher.verify.fidelity import PSNR_BAR_DB, Reference
from publisher.vocabulary import Component


@dataclass
class AssetCheck:
    component: str
    runtime: str
    psnr_db: dict[str, float]  # per output, against PyTorch float32 on the source's weights
    held_to_bar: bool  # float16: the 35 dB bar applies; compressed: recorded only
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and (not self.held_to_bar or min(self.psnr_db.values()) >= PSNR_BAR_DB)

    def line(self) -> str:
        figures = ", ".join(f"{name} {value:.1f} dB" for name, value in self.psnr_db.items())
        verdict = "ok" if self.passed else "; ".join(self.problems) or "UNDER THE BAR"
        held = f"bar {PSNR_BAR_DB:.0f} dB" if self.held_to_bar else "compressed: recorded, no bar"
        return f"{self.component}: {figures} on {self.runtime} ({held}) {verdict}"


def write_coreai_reference(source: Path, component: Component, resolution: int, path: Path) -> None:
    """The seeded inputs and PyTorch float32 outputs an asset is held to, stored beside it by its build step."""
    from publisher.convert.coreai import reference_io

    inputs, outputs = reference_io(source, component, resolution)
    Reference(component.value, inputs, outputs).save(path)


def runtime_name() -> str:
    """Which runtime coreai's `executable()` runs on here."""
    import coreai.runtime

    return "Core AI (OS framework)" if getattr(coreai.runtime, "_use_os_coreai", False) else \
        "Core AI (CPU reference runtime)"


def check_asset(asset: Path, reference: Reference, compressed: bool, runtime: str) -> AssetCheck:
    from publisher.convert.coreai import run_asset

    got: dict[str, Any] = run_asset(asset, reference.inputs)
    check = AssetCheck(reference.submodule, runtime, {}, held_to_bar=not compressed)
    for name, expected in reference.outputs.items():
        if name not in got:
            check.problems.append(f"no output {name}")
            continue
        output = np.asarray(got[name], dtype=np.float32)
        if output.shape != expected.shape:
            check.problems.append(f"{name} has shape {output.shape}, the reference {expected.shape}")
        elif not np.isfinite(output).all():
            check.problems.append(f"{name} is not finite")
        else:
            check.psnr_db[name] = psnr(expected, output)
    if not check.psnr_db:
        check.psnr_db = {"-": float("nan")}
    return check


def verify_bundles(build_dir: Path, store: Path, components: Iterable[str] = (),
                   say: Callable[[str], None] = lambda _: None) -> list[tuple[str, AssetCheck]]:
    """Every Core AI bundle in a build folder (or only `components` of each), its figures written into its
    build-info."""
    wanted = set(components)
    runtime = runtime_name()
    results = []
    for path in find_build_infos(build_dir):
        info = read_build_info(path)
        for component, record in sorted(info.coreai.items()):
            if wanted and component not in wanted:
                continue
            key = record.get("reference", "")
            reference_path = stored_reference(store, key)
            if not key or not reference_path.is_file():
                raise PublisherError(f"{info.variant['id']} {component}: no stored reference outputs in {store} "
                                     "(bring the build store's objects along)")
            check = check_asset(path.parent / record["asset"], Reference.load(reference_path),
                                record["compression"] != "float16", runtime)
            say(f"{info.variant['id']} {check.line()}")
            info.fidelity.setdefault(f"coreai_{component}", {})["coreai_psnr_db"] = {
                name: round(value, 2) for name, value in check.psnr_db.items()}
            results.append((info.variant["id"], check))
        write_build_info(path, info)
    return results
