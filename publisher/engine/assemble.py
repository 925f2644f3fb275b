"""Assembly: a variant's folder laid out from its steps' stored outputs (packages, compiled Resources, the analysis
JSON, the zip) and its build-info written, replaced into place in one step."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.build_info import BUILD_INFO, BuildInfo, write_build_info
from publisher.compress.recipe import APPLE_PRE_ANALYSIS, pre_analysis_name
from publisher.compress.scheme import REPORT, scheme_named
from publisher.engine.state import PACKAGE, BuildState, VariantResult
from publisher.gate import EVALUATION, SAMPLE
from publisher.layout import link_or_copy, link_tree, replace_folder
from publisher.plan import CompressParams, CoreAIParams, FetchParams, Step, Variant, VerifyParams
from publisher.store import Stamp, sha256_file, stamp_of, step_key, tree_files
from publisher.util.atomic import atomic_write_text
from publisher.util.hashing import json_sha256
from publisher.verify.fidelity import REFERENCE
from publisher.vocabulary import Component, Layout, size_of


@dataclass
class _Laid:
    """What laying a variant's folder out gives build-info."""

    compiled: bool = False
    verify_steps: list[Step] = field(default_factory=list)
    fidelity: dict[str, Any] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    coreai: dict[str, Any] = field(default_factory=dict)


class Assembler:
    def __init__(self, state: BuildState, run_step: Callable[[Step], None]) -> None:
        self.state = state
        self.run_step = run_step  # the zip is a stored step, run once the Resources are laid out

    def assemble(self, variant: Variant, result: VariantResult) -> None:
        steps = self.state.variant_steps(variant)
        failures = [self.state.failed[s.id] for s in steps if s.id in self.state.failed]
        unmatched = self._unmatched_recipe_names(steps)
        if unmatched:
            failures.append(f"{variant.id}: the recipe names {len(unmatched)} op(s) that match no weight of the "
                            f"variant's packages: {', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''}")
        if failures:
            result.status, result.error = "failed", failures[0]
            return
        # by role: "" the manifest's source, the rest its extra sources
        extra_sources = {s.params.role: self.state.fetched[s.id] for s in steps if isinstance(s.params, FetchParams)}
        source = extra_sources.pop("")
        extra_sources.update(source.parts)  # a community source's config repo and LoRAs
        repo_dir = self.state.options.out / variant.repo_id
        folder = repo_dir / variant.folder
        staged = Path(tempfile.mkdtemp(prefix=f".{variant.folder}.", dir=repo_dir if repo_dir.exists()
                                       else _mkdir(repo_dir)))
        try:
            laid = self._lay_out_coreai(variant, steps, source, staged) if variant.coreai \
                else self._lay_out_coreml(variant, steps, source, staged)
            replace_folder(staged, folder)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        zip_path = repo_dir / variant.zip_name
        zip_step = next((s for s in steps if s.kind == "zip"), None)
        known = self._vouched(steps)  # the folder holds hard links of stored files: their hashes are on record
        if zip_step is not None and laid.compiled:
            # the zip is keyed by the content of the Resources it holds
            assemble_step = next(s for s in steps if s.kind == "assemble")
            resources = tree_files(folder / "compiled", known)
            self.state.keys[assemble_step.id] = step_key("assemble", {"resources": resources}, [], {})
            self.run_step(zip_step)
            if zip_step.id in self.state.failed:
                result.status, result.error = "failed", self.state.failed[zip_step.id]
                return
            zip_path.unlink(missing_ok=True)
            link_or_copy(self.state.outputs[zip_step.id].path / "archive.zip", zip_path)
        files = tree_files(folder, known)
        if zip_path.exists() and zip_step is not None and laid.compiled:
            zipped = zip_path.stat()  # a hard link of the zip step's output: its hash is on that record
            digest = self.state.outputs[zip_step.id].vouched().get(stamp_of(zipped)) or sha256_file(zip_path)
            files[f"../{variant.zip_name}"] = (digest, zipped.st_size)
        seconds = sum(self.state.outputs[s.id].seconds for s in steps if s.id in self.state.outputs)
        info = BuildInfo.model_validate({
            "variant": variant.to_json(),
            "source": {"repo": source.repo, "revision": source.revision, "commit": source.commit,
                       # a single-file source: the checkpoint; else the files of the variant's components
                       "files": {name: entry for name, entry in sorted(source.files.items())
                                 if "config" in source.parts or name.split("/")[0] in self._folders_of(variant)}},
            "extra_sources": {role: {"repo": f.repo, "revision": f.revision, "commit": f.commit,
                                     "files": dict(sorted(f.files.items())), "scale": f.scale,
                                     "architecture": f.architecture}
                              for role, f in sorted(extra_sources.items())},
            # this variant's settings, hashed: editing another variant of the manifest leaves this file alone
            "manifest": {"name": variant.manifest_name, "variant_sha256": json_sha256(variant.to_json())},
            "tools": self.state.versions,
            "compiled": laid.compiled,
            "files": {name: {"sha256": sha, "size": size} for name, (sha, size) in sorted(files.items())},
            "fidelity": laid.fidelity,
            "references": laid.references,
            "build_seconds": round(seconds, 1),
            "app": self._app_settings(variant, laid.verify_steps),
            "evaluation": laid.evaluation,
            "coreai": laid.coreai,
        })
        write_build_info(folder / BUILD_INFO, info)
        built_here = any(s.id in self.state.built for s in steps)
        result.status = "built" if built_here else "cached"
        result.files = len(files) + 1
        result.size = sum(size for _, size in files.values())
        result.seconds = round(seconds, 1)
        result.path = folder

    def _lay_out_coreml(self, variant: Variant, steps: Sequence[Step], source: Any, staged: Path) -> _Laid:
        """Packages, compiled Resources, the analysis JSON, the end-to-end check's record."""
        laid = _Laid(compiled=Layout.COMPILED in variant.layouts and self.state.options.compile)
        laid.verify_steps = [s for s in steps if s.kind == "verify"]
        for verify in laid.verify_steps:
            assert isinstance(verify.params, VerifyParams)
            submodule = verify.params.submodule
            stored = self.state.outputs[verify.id]
            if Layout.PACKAGES in variant.layouts:
                link_tree(stored.path / PACKAGE, staged / "packages" / variant.package_file(submodule))
            figures = self._compression_figures(verify)
            if (stored.path / REFERENCE).exists():
                laid.references[submodule] = stored.key  # where `publisher verify` finds it in the store
            checked = json.loads((stored.path / "verify.json").read_text()).get("fidelity")
            if checked:
                figures["output_psnr_db"] = checked["min_psnr_db"]
                if "psnr_vs_float_db" in checked:
                    figures["output_psnr_vs_float_db"] = min(checked["psnr_vs_float_db"].values())
            if figures:
                laid.fidelity[submodule] = figures
            compile_step = next((s for s in steps if s.kind == "compile" and s.inputs[0] == verify.id), None)
            if laid.compiled and compile_step is not None:  # a chunked variant's whole UNet: packages only
                link_tree(self.state.outputs[compile_step.id].path / "model.mlmodelc",
                          staged / "compiled" / variant.model_family.compiled_name(submodule))
        for analyze in (s for s in steps if s.kind == "analyze"):
            # the analysis behind the variant's recipe, in the layout of Apple's pre-analysis script (its apply
            # script takes it with --selected-recipe)
            link_or_copy(self.state.outputs[analyze.id].path / APPLE_PRE_ANALYSIS,
                         staged / pre_analysis_name(variant.source_repo))
        laid.evaluation = self._link_evaluation(steps, staged)
        if laid.compiled:
            for name in variant.model_family.tokenizer_files:
                link_or_copy(source.path / "tokenizer" / name, staged / "compiled" / name)
        return laid

    def _lay_out_coreai(self, variant: Variant, steps: Sequence[Step], source: Any, staged: Path) -> _Laid:
        """A Core AI bundle as Apple's Swift pipeline loads it: each component's stored asset, the tokenizer,
        metadata.json from the source's configs (a custom VAE's for the scale factor)."""
        from publisher.coreai_bundle import METADATA, asset_file, bundle_metadata, tokenizer_paths
        from publisher.family import read_config

        laid = _Laid()
        assets: dict[str, str] = {}
        vae: dict[str, Any] = dict(read_config(source.path, "vae") or {})
        for step in (s for s in steps if s.kind == "coreai"):
            assert isinstance(step.params, CoreAIParams)
            component = Component(step.params.component)
            stored = self.state.outputs[step.id].path
            link_tree(stored / asset_file(component), staged / asset_file(component))
            # the record, and where the stored PyTorch outputs it is held to are (`publisher verify --runtime coreai`)
            laid.coreai[component.value] = {**json.loads((stored / "coreai.json").read_text()),
                                            "reference": self.state.outputs[step.id].key}
            assets[component.value] = asset_file(component)
            if variant.role_of(component) == "vae":  # the custom VAE's fetch lays it out under vae/
                vae = dict(read_config(self.state.source(step).path, "vae") or vae)
        for name, target in zip(("vocab.json", "merges.txt"), tokenizer_paths(staged), strict=True):
            link_or_copy(source.path / "tokenizer" / name, target)
        scheduler = dict(read_config(source.path, "scheduler", "scheduler_config.json") or {})
        metadata = bundle_metadata(variant.repo_name, assets, size_of(variant.resolution)[0], vae, scheduler,
                                   {"hf_model_id": source.repo, "commit": source.commit}, variant.coreai_compression)
        atomic_write_text(staged / METADATA, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        return laid

    def _unmatched_recipe_names(self, steps: Sequence[Step]) -> list[str]:
        """The names of a variant's recipe that no compressed package of it answers to (each compress step reports
        those it did not match; a name counts once every component has missed it)."""
        missed: set[str] | None = None
        for step in steps:
            if step.kind == "compress" and step.id in self.state.outputs:
                report = json.loads((self.state.outputs[step.id].path / REPORT).read_text())
                if "recipe_unmatched" in report:
                    names = set(report["recipe_unmatched"])
                    missed = names if missed is None else missed & names
        return sorted(missed or ())

    def _link_evaluation(self, steps: Sequence[Step], staged: Path) -> dict[str, Any]:
        """The end-to-end check's record and sample image into the variant folder (where the build ran it); its
        figures and settings for build-info."""
        evaluate = next((s for s in steps if s.kind == "evaluate" and s.id in self.state.outputs), None)
        if evaluate is None:
            return {}
        stored = self.state.outputs[evaluate.id].path
        for name in (EVALUATION, SAMPLE):
            link_or_copy(stored / name, staged / name)
        record = json.loads((stored / EVALUATION).read_text())
        return {key: record[key] for key in ("figures", "settings", "runtime")}

    def _vouched(self, steps: Sequence[Step]) -> dict[Stamp, str]:
        known: dict[Stamp, str] = {}
        for step in steps:
            if step.id in self.state.outputs:
                known.update(self.state.outputs[step.id].vouched())
        return known

    def _app_settings(self, variant: Variant, verify_steps: Sequence[Step]) -> dict[str, Any]:
        """What an app must set for this model, from the VAE config its VAE packages were converted from."""
        from publisher.family import read_config

        vae = next((s for s in verify_steps if isinstance(s.params, VerifyParams) and variant.model_family.component(
            Component(s.params.component)).folder == "vae"), None)
        if vae is None:
            return {}
        source = self.state.source_path(vae)
        config = read_config(source, "vae") or {}
        scale = config.get("scaling_factor")
        if not isinstance(scale, (int, float)):
            return {}
        # the family's contract says whether its VAE packages compute in float32 (SDXL's, where the VAE asks to be)
        float32 = dict(variant.model_family.dims(source, variant.resolution).extra).get("vae.float32", 0) == 1
        return {"vae_scale_factor": float(scale), "vae_float32": float32}

    @staticmethod
    def _folders_of(variant: Variant) -> set[str]:
        """The source's top-level entries a variant's packages come from."""
        return {"model_index.json", "tokenizer", *variant.model_family.source_folders(variant.components)}

    def _compression_figures(self, verify: Step) -> dict[str, Any]:
        """What the scheme that compressed this package puts on record (nothing for an uncompressed one)."""
        package_step = self.state.plan.steps[verify.inputs[0]]
        if not isinstance(package_step.params, CompressParams):
            return {}
        report = json.loads((self.state.outputs[package_step.id].path / REPORT).read_text())
        return {k: v for k, v in scheme_named(package_step.params.scheme).figures(report).items() if v is not None}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
