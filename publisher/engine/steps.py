"""The step table: what each stored step kind runs (fetch and assemble are handled apart: they are not stored).
Each action reads its inputs' stored outputs and writes into `work`, the store's temp folder for the step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from publisher.compile import compile_package
from publisher.compress.scheme import REPORT, CompressContext, scheme_named
from publisher.contract import zip_folder_name
from publisher.deployment import DeploymentTarget
from publisher.engine.references import References
from publisher.engine.state import EVALUATE_AUTO_BYTES, PACKAGE, BuildError, BuildState, fetched_weight_bytes
from publisher.family import family_named, read_config
from publisher.layout import link_tree, write_zip
from publisher.plan import (
    AnalyzeParams,
    ChunkParams,
    CompressParams,
    ConvertParams,
    CoreAIParams,
    EvaluateParams,
    Step,
    VerifyParams,
    ZipParams,
    step_tools,
)
from publisher.util.atomic import atomic_write_bytes, atomic_write_text
from publisher.verify.fidelity import REFERENCE, Reference
from publisher.vocabulary import Attention, Component, Resolution, size_of


class StepActions:
    def __init__(self, state: BuildState, references: References) -> None:
        self.state = state
        self.references = references

    def table(self) -> dict[str, Callable[[Step, Path], None]]:
        return {"convert": self.convert, "chunk": self.chunk, "analyze": self.analyze, "compress": self.compress,
                "verify": self.verify, "evaluate": self.evaluate, "compile": self.compile, "coreai": self.coreai,
                "zip": self.zip}

    def convert(self, step: Step, work: Path) -> None:
        from publisher.convert.coreml import convert_component

        p = step.params
        assert isinstance(p, ConvertParams)
        # a component no attention implementation changes is converted as it is (the stock modules)
        attention = Attention(p.attention or Attention.ORIGINAL)
        self.state.run(convert_component, self.state.source_path(step), Component(p.component), attention, p.resolution,
                  DeploymentTarget(p.deployment_target), work / PACKAGE, self.state.metadata(step), family=p.family)

    def chunk(self, step: Step, work: Path) -> None:
        from publisher.convert.chunk import convert_unet_chunks

        p = step.params
        assert isinstance(p, ChunkParams) and p.attention is not None
        outputs = (work / PACKAGE, None) if family_named(p.family).chunk_index(p.chunk) == 0 else (None, work / PACKAGE)
        args = (self.state.source_path(step), Attention(p.attention), p.resolution, DeploymentTarget(p.deployment_target),
                outputs, self.state.metadata(step), p.family, Component(p.component))
        self.state.run(convert_unet_chunks, *args)

    def analyze(self, step: Step, work: Path) -> None:
        from publisher.compress.sensitivity import analyze_to_folder

        p = step.params
        assert isinstance(p, AnalyzeParams)
        self.state.run(analyze_to_folder, self.state.source_path(step), Component(p.component), p.resolution, p.settings,
                  self.state.variant_of(step).source_repo, work, self.state.options.progress, p.family)

    def compress(self, step: Step, work: Path) -> None:
        p = step.params
        assert isinstance(p, CompressParams)
        scheme = scheme_named(p.scheme)
        settings = scheme.settings_model.model_validate(p.settings)
        inputs = list(step.inputs[:-1] if p.rebase else step.inputs)
        analysis = self.state.outputs[inputs[1]].path if len(inputs) > 1 else None
        source = self.state.outputs[inputs[0]].path / PACKAGE
        if p.rebase:  # a resolution pack: the default size's compressed weights on this size's program
            from publisher.compress.rebase import rebase_compressed

            base = self.state.plan.steps[step.inputs[-1]]
            base_float = self.state.outputs[base.inputs[0]].path / PACKAGE
            why = rebase_compressed(base_float, self.state.outputs[base.id].path / PACKAGE, source, work / PACKAGE)
            if why is None:
                report = json.loads((self.state.outputs[base.id].path / REPORT).read_text())
                report["rebased_from"] = self.state.keys[base.id]
                atomic_write_text(work / REPORT, json.dumps(report, indent=2, sort_keys=True) + "\n")
                return
            self.state.report(f"warning: {step.label}: compressed anew: {why}")
        context = CompressContext(deployment_target=DeploymentTarget(p.deployment_target), component=p.component,
                                  inputs=p.inputs, analysis=analysis, progress=self.state.options.progress)
        report = scheme.apply(source, work / PACKAGE, settings, context)
        report["scheme"] = scheme.name
        atomic_write_text(work / REPORT, json.dumps(report, indent=2, sort_keys=True) + "\n")

    def verify(self, step: Step, work: Path) -> None:
        from publisher.convert.components import source_dims
        from publisher.verify.contract import contract_problems

        variant = self.state.variant_of(step)
        source = self.state.source_path(step)
        assert isinstance(step.params, VerifyParams)
        size = variant.size_of_component(Component(step.params.component))  # a pack's own for the UNet and VAE
        dims = source_dims(source, size, variant.family)
        package = self.state.outputs[step.inputs[0]].path / PACKAGE
        submodule = step.params.submodule
        problems = contract_problems(package, submodule, dims, variant.family)
        if problems:
            raise BuildError(f"{submodule} breaks the apps' contract: {'; '.join(problems)}")
        report: dict[str, Any] = {"contract": "ok"}
        if self.state.options.verify:
            from publisher.verify.fidelity import PSNR_BAR_DB, reference_and_check

            package_step = self.state.plan.steps[step.inputs[0]]
            compressed = package_step.kind == "compress"
            float16 = self.state.outputs[package_step.inputs[0]].path / PACKAGE if compressed else None
            scheme = package_step.params.scheme if isinstance(package_step.params, CompressParams) else None
            # the PyTorch side once, here: stored with the step for every later check (the macOS runner's Core ML
            # run included), so that no other machine loads a PyTorch model to verify this package. It runs in a
            # process of its own (isolate), the PyTorch model dropped before the executor starts: the build's own
            # process never holds a model.
            # The float model's outputs depend on the weights and the seeded inputs, not on the attention
            # implementation or the compression: computed once per build (ORIGINAL attention) and shared by every
            # package of that submodule. The first verify step of a component computes them (run_steps orders the
            # rest after it), cut in two where the plan also verifies the component's chunks: the same forward
            # gives each chunk its inputs and outputs.
            def key(name: str) -> tuple[str, str, Resolution, str]:
                return (str(source), name, size, variant.family)

            floats = work / "float-reference.npz"
            known = fresh = None
            chunks: dict[str, Path] = {}
            if key(submodule) in self.references.floats:
                atomic_write_bytes(floats, self.references.floats[key(submodule)])
                known = floats
            elif not self.state.is_chunk(step):
                fresh = floats
                group = self.references.group(step)
                chunks = {s.params.submodule: work / f"float-reference-{s.params.submodule}.npz"
                          for s in self.state.plan.steps.values() if isinstance(s.params, VerifyParams)
                          and self.state.is_chunk(s) and self.references.group(s) == group}
            # a compressed package whose decoded weights equal an earlier one's (the same weights under another
            # attention implementation) is held to that one's PyTorch outputs
            decoded: dict[str, Path] = {}
            if compressed:
                for digest, data in self.references.decoded.get(key(submodule), {}).items():
                    decoded[digest] = work / f"decoded-reference-{digest[:16]}.npz"
                    atomic_write_bytes(decoded[digest], data)
            fidelity = self.state.run(reference_and_check, package, source, submodule, variant.attention,
                                 size, float16, scheme, work / REFERENCE, variant.family, known, fresh,
                                 chunks or None, decoded or None)
            if fresh is not None:
                self.references.floats[key(submodule)] = fresh.read_bytes()
            for name, path in chunks.items():
                self.references.floats[key(name)] = path.read_bytes()
                path.unlink()
            for path in decoded.values():
                path.unlink()
            floats.unlink(missing_ok=True)
            if compressed:
                weights_digest = Reference.load(work / REFERENCE).weights_digest
                if weights_digest is not None:
                    self.references.decoded.setdefault(key(submodule), {})[weights_digest] = \
                        (work / REFERENCE).read_bytes()
            report["fidelity"] = fidelity.to_json()
            if not fidelity.passed:
                raise BuildError(f"{submodule}: output PSNR {fidelity.min_psnr_db:.1f} dB is under the "
                                 f"{PSNR_BAR_DB:.0f} dB bar: not published")
        link_tree(package, work / PACKAGE)
        atomic_write_text(work / "verify.json", json.dumps(report, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def evaluation_runtime() -> str:
        """Core ML where it runs (macOS), else the project's executor."""
        import platform

        return "coreml" if platform.system() == "Darwin" else "reference"

    def evaluates(self, step: Step) -> bool:
        """Whether the build runs this end-to-end check: asked for, and cheap here where the build decides."""
        mode = self.state.options.evaluate
        if mode != "auto":
            return mode == "on"
        if self.evaluation_runtime() == "coreml":
            return True
        fetched = self.state.fetched.get(step.inputs[0])
        return fetched is not None and fetched_weight_bytes(fetched, "unet") < EVALUATE_AUTO_BYTES

    def evaluate(self, step: Step, work: Path) -> None:
        from publisher.evaluate import evaluate_to_folder
        from publisher.gate import EvaluationSettings

        p = step.params
        assert isinstance(p, EvaluateParams)
        count, first = len(p.submodules), p.sources
        packages = {name: self.state.outputs[i].path / PACKAGE
                    for name, i in zip(p.submodules, step.inputs[first:first + count], strict=True)}
        float16 = {name: self.state.outputs[i].path / PACKAGE
                   for name, i in zip(p.submodules, step.inputs[first + count:], strict=True)} if p.float16 else None
        source = self.state.fetched[step.inputs[0]].path
        if first > 1:  # a custom VAE, a refiner: laid over the source as the conversions read them
            from publisher.engine.source import compose_sources

            source = compose_sources([self.state.fetched[i].path for i in step.inputs[:first]],
                                     self.state.options.store / "hub-cache")
        vae = read_config(source, "vae") or {}
        scale = float(vae.get("scaling_factor", 0.18215))  # type: ignore[arg-type]
        fetched = [self.state.fetched[i] for i in step.inputs[:first]]
        provenance = {"sources": [{"repo": f.repo, "commit": f.commit} for f in fetched],
                      "tools": {**self.state.versions, "code": step_tools(step).get("code", "")}}
        self.state.run(evaluate_to_folder, packages, float16, source, scale, EvaluationSettings.from_json(p.settings),
                       self.evaluation_runtime(), work, p.family, provenance)

    def compile(self, step: Step, work: Path) -> None:
        compiled = compile_package(self.state.outputs[step.inputs[0]].path / PACKAGE, work)
        if compiled.name != "model.mlmodelc":
            compiled.rename(work / "model.mlmodelc")

    def coreai(self, step: Step, work: Path) -> None:
        """One Core AI asset: exported, compressed, saved with the source's metadata, its compression checked on
        what was written; its record (`coreai.json`: storage types) beside it, and the seeded inputs and PyTorch
        outputs it is held to (`publisher verify --runtime coreai`)."""
        from publisher.convert.coreai import export_asset
        from publisher.coreai_bundle import CoreAICompression, asset_file
        from publisher.verify.coreai import write_coreai_reference

        p = step.params
        assert isinstance(p, CoreAIParams)
        source = self.state.source(step)
        component = Component(p.component)
        description = (f"{family_named(p.family).description} {p.component.replace('_', ' ')} from "
                       f"https://huggingface.co/{source.repo} at commit {source.commit}, for Core AI")
        record = self.state.run(export_asset, self.state.source_path(step), component, size_of(p.resolution)[0],
                                CoreAICompression(p.compression, p.nbits), work / asset_file(component), p.author,
                                p.license, description, 0.0)
        atomic_write_text(work / "coreai.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
        self.state.run(write_coreai_reference, self.state.source_path(step), component, size_of(p.resolution)[0],
                       work / REFERENCE)

    def zip(self, step: Step, work: Path) -> None:
        assert isinstance(step.params, ZipParams)
        variant = self.state.variant_of(step)
        resources = self.state.options.out / variant.repo_id / variant.folder / "compiled"
        write_zip(resources, work / "archive.zip", zip_folder_name(variant.repo_name, variant.folder))
