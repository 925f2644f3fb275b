"""Output fidelity of a package: the same seeded inputs through the package's program and through PyTorch.

float16 packages are compared with the float32 diffusers module (Apple's bar: PSNR >= 35 dB). Palettized packages
are compared with the module running the very weights the package decodes to (>= 35 dB: the graph is right), and
their PSNR against the float model is reported alongside.

The PyTorch side is computed once, where memory is plentiful (the build's verify step on Linux), and kept as a
`Reference` (the inputs and the outputs the bar applies to, a few MB) in the build store. Any runtime is then
compared against those stored numbers without loading a PyTorch model: the executor on Linux, Core ML on the
macOS runner.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from publisher.errors import ToolchainError
from publisher.family import DEFAULT_FAMILY, family_named
from publisher.metrics import psnr
from publisher.util.atomic import atomic_write_bytes
from publisher.util.memory import return_large_blocks
from publisher.verify.runtime import Runtime, runtime_named
from publisher.vocabulary import Attention, Resolution

PSNR_BAR_DB = 35.0
REFERENCE = "reference.npz"  # a verify step's stored seeded inputs and PyTorch outputs


@dataclass
class Fidelity:
    submodule: str
    runtime: str
    psnr_db: dict[str, float]  # per output, against the reference the bar applies to
    psnr_vs_float_db: dict[str, float] | None = None  # palettized packages: against the float model
    notes: list[str] = field(default_factory=list)

    @property
    def min_psnr_db(self) -> float:
        return min(self.psnr_db.values())

    @property
    def passed(self) -> bool:
        return self.min_psnr_db >= PSNR_BAR_DB

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"submodule": self.submodule, "runtime": self.runtime, "bar_db": PSNR_BAR_DB,
                                "psnr_db": {k: round(v, 2) for k, v in self.psnr_db.items()},
                                "min_psnr_db": round(self.min_psnr_db, 2), "passed": self.passed}
        if self.psnr_vs_float_db is not None:
            data["psnr_vs_float_db"] = {k: round(v, 2) for k, v in self.psnr_vs_float_db.items()}
        return data


def _cut(loaded: Any, example: tuple) -> tuple[Any, tuple, tuple]:
    """Where a chunked component is cut, what chunk 1 gives for `example`, and what chunk 2 is fed for it (the text
    embeddings, then the tensors crossing the cut)."""
    from publisher.convert.chunk import chunk_specs

    specs, intermediates = chunk_specs(loaded.module, loaded.spec.inputs, loaded.spec.outputs, example)
    return specs, intermediates, specs.chunk2_example(example, intermediates)


def _reference(source: Path, submodule: str, attention: Attention, resolution: Resolution, family: str
               ) -> tuple[Any, tuple, list[str]]:
    """(PyTorch module, inputs, output names) for a submodule, chunks included."""
    from publisher.convert.components import example_inputs, load_component

    model_family = family_named(family)
    loaded = load_component(source, model_family.component_of(submodule), attention, resolution, family=family)
    example = example_inputs(loaded.spec)
    chunk = model_family.chunk_index(submodule)
    if chunk == 0:
        specs, _, _ = _cut(loaded, example)
        return specs.modules(_unet(loaded.module))[0], specs.chunk1_example(example), \
            [t.name for t in specs.chunk1_outputs]
    if chunk == 1:
        specs, _, inputs = _cut(loaded, example)
        return specs.modules(_unet(loaded.module))[1], inputs, [t.name for t in specs.chunk2_outputs]
    return loaded.module, example, [t.name for t in loaded.spec.outputs]


def _unet(module: Any) -> Any:
    """A chunked component's loaded module: the UNet wrapper (convert/components.Unet) the chunks cut in two."""
    return module


def _float32_arrays(names: Iterable[str], tensors: Iterable[Any]) -> dict[str, np.ndarray]:
    """Named float32 arrays of the tensors fed to a module (the reference's inputs, as the executor gets them)."""
    return {name: np.asarray(x.numpy(), dtype=np.float32) for name, x in zip(names, tensors, strict=True)}


def _torch_outputs(module: Any, inputs: tuple, names: list[str]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = module(*inputs)
    result = result if isinstance(result, tuple) else (result,)
    return {name: r.float().numpy() for name, r in zip(names, result, strict=True)}


def _declared_inputs(package: Path) -> list[tuple[str, str]]:
    from publisher.mlpackage import package_info

    return [(t.name, t.dtype) for t in package_info(package).inputs]


@dataclass
class Reference:
    """Seeded inputs and the PyTorch outputs one package is held to (and, palettized, the float model's)."""

    submodule: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    float_outputs: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)
    weights_digest: str | None = None  # compressed: what the PyTorch side ran (`decoded_weights_digest`)

    def save(self, path: Path) -> None:
        arrays = {f"in/{k}": v for k, v in self.inputs.items()}
        arrays |= {f"out/{k}": v for k, v in self.outputs.items()}
        arrays |= {f"float/{k}": v for k, v in (self.float_outputs or {}).items()}
        meta = json.dumps({"submodule": self.submodule, "notes": self.notes, "inputs": list(self.inputs),
                           "outputs": list(self.outputs), "float": self.float_outputs is not None,
                           "weights_digest": self.weights_digest})
        buffer = io.BytesIO()  # a few MB
        arrays["__meta__"] = np.frombuffer(meta.encode(), dtype=np.uint8)
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **arrays reach its allow_pickle flag
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            return cls(submodule=meta["submodule"], notes=list(meta["notes"]),
                       inputs={k: data[f"in/{k}"] for k in meta["inputs"]},
                       outputs={k: data[f"out/{k}"] for k in meta["outputs"]},
                       float_outputs={k: data[f"float/{k}"] for k in meta["outputs"]} if meta["float"] else None,
                       weights_digest=meta.get("weights_digest"))


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def _digest_entry(name: str, values: np.ndarray, originals: Mapping[str, str]) -> str:
    return f"{originals.get(name, 'op:' + name)} {values.dtype} {list(values.shape)} {_digest(values)}"


def _digest_of(entries: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


def decoded_weights_digest(decoded: Mapping[str, np.ndarray], originals: Mapping[str, str]) -> str:
    """One digest of what the PyTorch side of a compressed package runs: each decoded weight (dtype, shape, bytes)
    with the float16 weight it replaces (`originals`: op name -> sha256 in the float16 package; the op's name where
    there is none). Packages of the same source component with equal digests (a palettized ORIGINAL and
    SPLIT_EINSUM_V2 UNet: same weights, other attention ops) are held to the same outputs."""
    return _digest_of(_digest_entry(name, values, originals) for name, values in decoded.items())


def _noting_digest_entries(decoded: Mapping[str, np.ndarray], originals: Mapping[str, str], entries: list[str]
                           ) -> Iterator[tuple[str, np.ndarray]]:
    """The decoded weights, each one's digest entry noted as it goes by: one decoding pass serves the module and
    the digest."""
    for name, values in decoded.items():
        entries.append(_digest_entry(name, values, originals))
        yield name, values


def _dequantized_module(module: Any, decoded: Iterable[tuple[str, np.ndarray]], originals: Mapping[str, str]
                        ) -> int:
    """Load the weights a compressed package decodes to (name, dense value) into `module`. Each decoded weight is
    matched to its parameter through the float16 package's weights (`originals`: op name -> sha256), byte for byte
    (neither side's bytes are kept); without them, to the parameter of the same size whose values are nearest. The
    decoded weights are taken one at a time. Returns how many parameters were replaced."""
    import torch

    params = list(module.parameters())
    by_digest: dict[str, list[Any]] = {}
    by_size: dict[int, list[Any]] = {}
    for param in params:
        if originals:
            by_digest.setdefault(_digest(param.detach().half().numpy()), []).append(param)
        by_size.setdefault(param.numel(), []).append(param)
    replaced = 0
    for name, dense in decoded:
        values = np.asarray(dense, dtype=np.float32)
        if name in originals:
            targets = by_digest.get(originals[name], [])
        else:
            candidates = by_size.get(values.size, [])
            flat = values.reshape(-1)
            targets = [min(candidates, key=lambda p: float(np.mean((p.detach().numpy().reshape(-1) - flat) ** 2)))] \
                if candidates else []
        for param in targets:
            with torch.no_grad():
                param.copy_(torch.from_numpy(values.reshape(param.shape)))
            replaced += 1
    return replaced


def _same_inputs(known: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray]) -> bool:
    return known.keys() == feed.keys() and all(np.array_equal(known[name], value) for name, value in feed.items())


def compute_reference(package: Path, source: Path, submodule: str, attention: Attention, resolution: Resolution,
                      float16_package: Path | None = None, scheme: str | None = None,
                      family: str = DEFAULT_FAMILY, float_reference: Reference | None = None,
                      decoded_references: Mapping[str, Path] | None = None) -> Reference:
    """Run PyTorch on the seeded inputs (on Linux, in the build): the outputs the package is held to. A package
    compressed by `scheme` is held to PyTorch running the weights it decodes to (and compared with the float
    model as well); `scheme` None: whichever registered scheme recognises the package. `float_reference`: the float
    model's outputs on the same inputs, already computed (one forward fewer). `decoded_references`: references of
    other compressed packages of the same component and inputs, by `weights_digest`: one whose decoded weights are
    this package's serves as its reference (no PyTorch model is loaded)."""
    from publisher.compress.scheme import schemes
    from publisher.milfile import const_digests

    decoded: Mapping[str, np.ndarray] = {}
    for name, candidate in schemes().items():  # not told: the scheme whose ops the package holds, if any
        if scheme in (None, name):
            decoded = candidate.decoded_weights(package)
            if decoded:
                scheme = name
                break
    originals: dict[str, str] = {}
    digest = None
    if decoded:
        originals = const_digests(float16_package) if float16_package is not None else {}
    if decoded and decoded_references and float_reference is not None:
        digest = decoded_weights_digest(decoded, originals)
        known = decoded_references.get(digest)
        if known is not None:
            shared = Reference.load(known)
            declared = [name for name, _ in _declared_inputs(package)]
            if shared.weights_digest == digest and list(shared.inputs) == declared and \
                    _same_inputs(float_reference.inputs, shared.inputs):
                return Reference(submodule, shared.inputs, shared.outputs, float_outputs=float_reference.outputs,
                                 notes=[*shared.notes, "the same decoded weights as an earlier package's: its "
                                        "PyTorch outputs"], weights_digest=digest)
    module, inputs, names = _reference(source, submodule, attention, resolution, family)
    feed = _float32_arrays((name for name, _ in _declared_inputs(package)), inputs)
    reusable = float_reference is not None and _same_inputs(float_reference.inputs, feed)
    expected = float_reference.outputs if reusable and float_reference is not None else _torch_outputs(
        module, inputs, names)
    if not decoded:
        return Reference(submodule, feed, expected)
    entries: list[str] = []  # the digest's, unless it was made above
    replaced = _dequantized_module(module, decoded.items() if digest else
                                   _noting_digest_entries(decoded, originals, entries), originals)
    digest = digest or _digest_of(entries)
    dequantized = _torch_outputs(module, inputs, names)
    return Reference(submodule, feed, dequantized, float_outputs=expected,
                     notes=[f"{replaced} parameters replaced by their {scheme} values"], weights_digest=digest)


def compare(package: Path, reference: Reference, runtime: Runtime) -> Fidelity:
    """Run `package` on the reference's inputs in `runtime` and hold its outputs to the reference's."""
    got = runtime.run(package, reference.inputs)
    missing = sorted(set(reference.outputs) - set(got))
    if missing:
        raise ToolchainError(f"{reference.submodule}: the package has no output {', '.join(missing)}")
    result = Fidelity(reference.submodule, runtime.name,
                      {name: psnr(expected, got[name]) for name, expected in reference.outputs.items()},
                      notes=list(reference.notes))
    if reference.float_outputs is not None:
        result.psnr_vs_float_db = {name: psnr(expected, got[name])
                                   for name, expected in reference.float_outputs.items()}
    return result


def verify_package(package: Path, source: Path, submodule: str, attention: Attention, resolution: Resolution,
                   runtime: str = "reference", float16_package: Path | None = None,
                   scheme: str | None = None, family: str = DEFAULT_FAMILY) -> Fidelity:
    return compare(package, compute_reference(package, source, submodule, attention, resolution, float16_package,
                                              scheme, family), runtime_named(runtime))


def chunk_references(source: Path, component: str, resolution: Resolution, family: str = DEFAULT_FAMILY
                     ) -> dict[str, Reference]:
    """The float model's references for a component and for each of its chunks, from one forward through the
    chunks (ORIGINAL attention): chunk 1 on the component's seeded inputs, chunk 2 on the tensors crossing the cut,
    whose outputs are the whole component's. Keyed by submodule."""
    from publisher.convert.components import example_inputs, load_component

    model_family = family_named(family)
    spec = model_family.component(model_family.component_of(component))
    loaded = load_component(source, spec.component, Attention.ORIGINAL, resolution, family=family)
    example = example_inputs(loaded.spec)
    specs, intermediates, second = _cut(loaded, example)
    outputs = _torch_outputs(specs.modules(_unet(loaded.module))[1], second, [t.name for t in specs.chunk2_outputs])
    first, last = (name for name, _ in spec.chunks)
    whole_inputs = _float32_arrays((t.name for t in loaded.spec.inputs), example)
    chunk1_inputs = _float32_arrays((t.name for t in specs.chunk1_inputs), specs.chunk1_example(example))
    return {component: Reference(component, whole_inputs, outputs),
            first: Reference(first, chunk1_inputs, _float32_arrays((t.name for t in specs.chunk1_outputs),
                                                                   intermediates)),
            last: Reference(last, _float32_arrays((t.name for t in specs.chunk2_inputs), second), outputs)}


def reference_and_check(package: Path, source: Path, submodule: str, attention: Attention, resolution: Resolution,
                        float16_package: Path | None, scheme: str | None, path: Path, family: str = DEFAULT_FAMILY,
                        float_reference: Path | None = None, save_float_reference: Path | None = None,
                        save_chunk_references: Mapping[str, Path] | None = None,
                        decoded_references: Mapping[str, Path] | None = None) -> Fidelity:
    """A verify step's work in one process (one interpreter start instead of two; each PyTorch model is dropped
    before the next part starts): the float model's reference (read from `float_reference`; else computed with
    ORIGINAL attention and saved to `save_float_reference`, when given, together with its chunks' references
    when `save_chunk_references` names them: the same forward, cut in two), the package's own reference saved to
    `path` (the float one itself for a float package or a chunk; for a compressed one PyTorch on the weights it
    decodes to, with ORIGINAL attention as well: the attention implementation does not change the function, only
    how fast PyTorch computes it; or an earlier package's among `decoded_references` that ran the same decoded
    weights), and the package on the executor against it."""
    import gc

    return_large_blocks()
    known = Reference.load(float_reference) if float_reference is not None else None
    if known is None and save_float_reference is not None:
        if save_chunk_references:
            computed = chunk_references(source, submodule, resolution, family)
            for chunk, chunk_path in save_chunk_references.items():
                computed[chunk].save(chunk_path)
            known = computed[submodule]
            del computed
        else:
            known = compute_reference(float16_package or package, source, submodule, Attention.ORIGINAL,
                                      resolution, family=family)
        known.save(save_float_reference)
        gc.collect()
    if float16_package is None and known is not None:
        reference = known
    else:
        chunked = family_named(family).chunk_index(submodule) is not None
        reference = compute_reference(package, source, submodule, attention if chunked else Attention.ORIGINAL,
                                      resolution, float16_package, scheme, family, known, decoded_references)
    reference.save(path)
    gc.collect()
    return check_stored_reference(package, path)


def check_stored_reference(package: Path, path: Path) -> Fidelity:
    """The package on the executor against the reference saved at `path` (in a process of its own, too)."""
    from publisher.verify.runtime import ExecutorRuntime

    return_large_blocks()
    return compare(package, Reference.load(path), ExecutorRuntime())
