"""Does a saved package have exactly the inputs and outputs the apps use?"""

from __future__ import annotations

from pathlib import Path

from publisher.contract import FLOAT32, RESIDUAL_PREFIX, ModelDims, ModelSpec
from publisher.family import DEFAULT_FAMILY, family_named
from publisher.mlpackage import package_info


def contract_problems(package: Path, submodule: str, dims: ModelDims, family: str = DEFAULT_FAMILY) -> list[str]:
    """Differences between the package's interface and the contract, one line each (empty: conforms)."""
    info = package_info(package)
    problems = []
    if not info.is_mlprogram:
        problems.append("not an ML Program")
    model_family = family_named(family)
    spec = model_family.model_spec(model_family.component_of(submodule), dims)
    chunk = model_family.chunk_index(submodule)
    got_in = [(t.name, t.shape, t.dtype) for t in info.inputs]
    got_out = [(t.name, t.shape, t.dtype) for t in info.outputs]
    want_in: list[tuple[str, tuple[int, ...], str]] | None = [(t.name, t.shape, t.dtype) for t in spec.inputs]
    want_out: list[tuple[str, tuple[int, ...], str]] | None = [(t.name, t.shape, t.dtype) for t in spec.outputs]
    if chunk == 0:
        # a ControlledUnet's residual inputs are in the chunk that adds them (publisher.convert.chunk): chunk 1
        # has them all or none
        names = {name for name, _, _ in got_in}
        want_in = [t for t in want_in or [] if not t[0].startswith(RESIDUAL_PREFIX) or names & residual_names(spec)]
        # intermediates (chunk 2's inputs are checked against them by the chunk tests): float32 like every output
        want_out = None
        problems += [f"output {name} is {dtype}, not float32" for name, _, dtype in got_out if dtype != FLOAT32]
    elif chunk == 1:
        want_in = None
        by_name = {t.name: t for t in spec.inputs}
        for name, _shape, dtype in got_in:
            expected = by_name[name].dtype if name in by_name else FLOAT32  # an intermediate: chunk 1's output
            if dtype != expected:
                problems.append(f"input {name} is {dtype}, not {expected}")
    if want_in is not None and got_in != want_in:
        problems.append(f"inputs {got_in} != contract {want_in}")
    if want_out is not None and got_out != want_out:
        problems.append(f"outputs {got_out} != contract {want_out}")
    return problems


def residual_names(spec: ModelSpec) -> set[str]:
    return {t.name for t in spec.inputs if t.name.startswith(RESIDUAL_PREFIX)}
