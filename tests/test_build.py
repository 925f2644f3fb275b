"""The build engine on a tiny model: contract layout, caching, corruption, kill and resume, zips, compile errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from publisher.engine.build import BuildOptions, build
from publisher.errors import ToolchainError
from publisher.layout import write_zip
from publisher.manifest import load_manifests
from publisher.store import BuildStore
from tests.helpers import CHUNKED_MANIFEST, MANIFEST_HEAD, write_manifest

pytestmark = pytest.mark.slow  # converts, builds or publishes models

# the tiny manifests are at resolution 256: no safety checker by default (it only exists at 512)
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def options(tmp: Path, hub, **extra) -> BuildOptions:  # type: ignore[no-untyped-def]
    return BuildOptions(out=tmp / "out", store=tmp / "store", namespace="tester", compile=False,
                        endpoint=hub.url, token=hub.token, isolate=False, progress=False, **extra)


@pytest.fixture(scope="module")
def built(two_repo_build) -> tuple[Path, object]:  # type: ignore[no-untyped-def]
    """The tiny two-repo manifest's build (tests/conftest.py; namespace "tester", as `options` builds)."""
    return two_repo_build


def test_layout_follows_the_contract(built) -> None:  # type: ignore[no-untyped-def]
    work, result = built
    out = work / "out" / "tester"
    for repo in ("coreml-tiny-sd", "coreml-tiny-sd-palettized"):
        for folder in ("original", "split_einsum_v2"):
            packages = out / repo / folder / "packages"
            names = sorted(p.name for p in packages.iterdir())
            assert names == sorted(f"Stable_Diffusion_version_tiny_sd_{c}.mlpackage" for c in COMPONENTS)
            for package in packages.iterdir():
                assert (package / "Manifest.json").is_file()
                assert (package / "Data" / "com.apple.CoreML" / "model.mlmodel").is_file()
            info = json.loads((out / repo / folder / "build-info.json").read_text())
            assert info["source"]["repo"] == "tiny/sd" and len(info["source"]["commit"]) == 40
            assert info["compiled"] is False
            listed = {name for name in info["files"]}
            on_disk = {p.relative_to(out / repo / folder).as_posix() for p in (out / repo / folder).rglob("*")
                       if p.is_file() and p.name != "build-info.json"}
            assert listed == on_disk
            for name, entry in info["files"].items():
                assert hashlib.sha256((out / repo / folder / name).read_bytes()).hexdigest() == entry["sha256"]
            assert set(info["fidelity"]) == set(COMPONENTS)  # every package's output PSNR was checked
            assert all(f["output_psnr_db"] >= 35 for f in info["fidelity"].values())
            if repo.endswith("palettized"):
                assert {c for c, f in info["fidelity"].items() if "bits" in f} == {"text_encoder", "unet"}
                assert info["fidelity"]["unet"]["bits"] == 6
                assert info["fidelity"]["unet"]["output_psnr_vs_float_db"] < info["fidelity"]["unet"]["output_psnr_db"]
            assert not (out / repo / folder / "compiled").exists()  # nothing pretends to be compiled on Linux
    assert {r.status for r in result.variants} == {"built"}
    # one float16 UNet conversion per attention serves both repos; the text encoder and the VAE, which no
    # attention implementation changes (Apple's converter keeps diffusers' VAE), are converted once for both
    converts = sorted(s.rsplit("#", 1)[0] for s in result.built if s.startswith("convert:"))
    assert converts == sorted([f"convert:tiny/sd@main:{a}:unet:256:iOS16" for a in ("ORIGINAL", "SPLIT_EINSUM_V2")]
                              + [f"convert:tiny/sd@main:any:{c}:256:iOS16" for c in COMPONENTS if c != "unet"])


def test_second_run_converts_nothing(built, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work, _ = built
    manifest = work / "manifests" / "tiny-sd.yaml"
    before = {p: p.read_bytes() for p in (work / "out").rglob("build-info.json")}
    again = build(load_manifests([manifest]), options(work, staging_hub))
    assert again.ok
    assert again.built == []
    assert {r.status for r in again.variants} == {"cached"}
    assert {p: p.read_bytes() for p in (work / "out").rglob("build-info.json")} == before  # reproducible bytes


def test_a_built_variant_generates_as_diffusers_does(built, tiny_source: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`publisher generate` through the executor: the float16 variant's latents and image against diffusers' pipeline
    (float32) at the same seed, steps and scheduler; the palettized variant reported; a variant whose tokenizer
    does not match its text encoder passes every component check and fails end to end."""
    import shutil

    from publisher.generate import GenerateSettings, generate
    from publisher.generate_reference import compare, reference_generate
    from publisher.verify.build_dir import verify_build_dir
    from publisher.verify.runtime import ExecutorRuntime

    work, _ = built
    out = work / "out" / "tester"
    runtime = ExecutorRuntime()
    tokenizer = tiny_source / "tokenizer"
    for scheduler in ("pndm", "dpm-solver++"):
        settings = GenerateSettings(prompt="a tiny red fox", seed=7, steps=3, scheduler=scheduler)
        ours = generate(out / "coreml-tiny-sd" / "original", settings, runtime, tokenizer)
        reference = reference_generate(tiny_source, settings, ours.latents.shape)
        assert ours.timesteps == reference.timesteps and ours.image.shape == (256, 256, 3)
        figures = compare(ours, reference)
        assert figures["image_psnr_db"] >= 30 and figures["latents_psnr_db"] >= 30, (scheduler, figures)
    # the command, on the palettized variant (6-bit weights: further from the float32 reference)
    png = tmp_path / "fox.png"
    command = [sys.executable, "-m", "publisher", "generate", str(out / "coreml-tiny-sd-palettized" / "original"),
               "--prompt", "a tiny red fox", "--seed", "7", "--steps", "3", "--scheduler", "dpm-solver++",
               "--tokenizer", str(tokenizer), "--reference", str(tiny_source), "-o", str(png)]
    said = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert said.returncode == 0, said.stderr
    from PIL import Image

    assert Image.open(png).size == (256, 256)
    image_db = float(said.stdout.split("image ")[1].split(" dB")[0])
    assert image_db < figures["image_psnr_db"], (said.stdout, figures)

    # miswired: the same packages with another model's tokenizer files (its ids shuffled)
    wrong = tmp_path / "wrong" / "tester" / "coreml-tiny-sd" / "original"  # a build output's layout
    shutil.copytree(out / "coreml-tiny-sd" / "original", wrong, copy_function=shutil.copy)
    vocab = json.loads((tokenizer / "vocab.json").read_text())
    ids = sorted(vocab.values())
    shuffled = dict(zip(vocab, np.random.RandomState(0).permutation(ids).tolist(), strict=True))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text(json.dumps(shuffled))
    shutil.copy(tokenizer / "merges.txt", tmp_path / "tok" / "merges.txt")
    checked = verify_build_dir(tmp_path / "wrong", runtime, work / "store")
    assert len(checked) == 4 and all(result.passed for _, result in checked)
    miswired = compare(generate(wrong, settings, runtime, tmp_path / "tok"), reference)
    assert miswired["image_psnr_db"] < 30 <= figures["image_psnr_db"], (miswired, figures)  # under the bar


def test_noop_rebuild_reads_no_stored_bytes(built, staging_hub, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Stored outputs whose files keep their recorded inode, size and mtime are trusted, and assemble takes the
    variant folders' hashes from the store's records: a no-op rebuild hashes no file at all."""
    import publisher.store as store_module

    work, _first = built
    hashed: list[Path] = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    again = build(load_manifests([work / "manifests" / "tiny-sd.yaml"]), options(work, staging_hub))
    assert again.ok and again.built == []
    assert hashed == []


def test_verify_store_catches_what_the_stamps_cannot(built, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work, first = built
    store = BuildStore(work / "store")
    step = next(s for s in first.built if s.startswith("convert:") and "vae_decoder" in s)
    key = next(k for k in (p.name for p in store.objects.glob("*/*"))
               if json.loads((store.path(k) / "record.json").read_text())["step"] == step)
    weight = next(store.path(key).rglob("weight.bin"))
    before = weight.stat()
    original = weight.read_bytes()
    data = bytearray(original)
    data[len(data) // 3] ^= 0xFF
    os.chmod(weight, 0o644)
    with open(weight, "r+b") as handle:  # same inode, same size, and the mtime put back: the stamp is unchanged
        handle.write(bytes(data))
    os.utime(weight, ns=(before.st_atime_ns, before.st_mtime_ns))
    try:
        trusting = BuildStore(work / "store").get(key)
        assert trusting is not None  # by design: the default lookup trusts unchanged stamps
        assert BuildStore(work / "store", verify=True).get(key) is None  # --verify-store re-hashes and discards
    finally:
        if weight.exists():
            with open(weight, "r+b") as handle:
                handle.write(original)
    again = build(load_manifests([work / "manifests" / "tiny-sd.yaml"]), options(work, staging_hub,
                                                                                verify_store=True))
    assert again.ok and step in again.built


def test_corrupted_store_output_is_rebuilt(built, staging_hub) -> None:  # type: ignore[no-untyped-def]
    work, first = built
    store = BuildStore(work / "store")
    step = next(s for s in first.built if s.startswith("palettize:") and "text_encoder" in s)
    key = next(k for k in (p.name for p in store.objects.glob("*/*"))
               if json.loads((store.path(k) / "record.json").read_text())["step"] == step)
    weight = next(store.path(key).rglob("weight.bin"))
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(weight, 0o644)
    weight.unlink()  # break the hard links first: the published copy keeps its bytes
    weight.write_bytes(bytes(data))
    again = build(load_manifests([work / "manifests" / "tiny-sd.yaml"]), options(work, staging_hub))
    assert again.ok
    assert step in again.built
    assert hashlib.sha256(weight.read_bytes()).hexdigest() != hashlib.sha256(bytes(data)).hexdigest()


def test_kill_during_conversion_then_resume(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    manifest = write_manifest(tmp_path / "manifests")
    env = {**os.environ, "STAGING_HUB_TOKEN": staging_hub.token, "PUBLISHER_SOURCE_ENDPOINT": staging_hub.url}
    variant = "tester/coreml-tiny-sd-palettized/original"  # one variant has steps enough to be killed inside
    command = [sys.executable, "-m", "publisher", "build", str(manifest), "--no-compile", "--namespace", "tester",
               "--variant", variant, "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    objects = tmp_path / "store" / "objects"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(objects.glob("*/*/record.json"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the build and its conversion worker
    process.wait()
    finished = {p.parent.name: p.stat().st_ino for p in objects.glob("*/*/record.json")}
    assert len(finished) >= 2
    result = build(load_manifests([manifest]), options(tmp_path, staging_hub, variants=[variant]))
    assert result.ok and [v.variant.id for v in result.variants] == [variant]
    store = BuildStore(tmp_path / "store")
    # what finished before the kill is taken as it was (a rebuilt output would be a new record file)
    assert {key: (store.path(key) / "record.json").stat().st_ino for key in finished} == finished
    assert len(result.cached) >= len(finished)
    assert not list((tmp_path / "store" / "tmp").iterdir())  # half-written work was cleaned, not reused


def test_compile_on_linux_is_a_clear_error(built, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, _ = built
    manifest = work / "manifests" / "tiny-sd.yaml"
    text = manifest.read_text().replace("layouts: [packages]", "layouts: [packages, compiled, zip]")
    compiled_manifest = tmp_path / "compiled.yaml"
    compiled_manifest.write_text(text)
    opts = options(work, staging_hub)
    opts.compile = True
    with pytest.raises(ToolchainError, match="needs macOS with Xcode"):
        build(load_manifests([compiled_manifest]), opts)
    env = {**os.environ, "PATH": os.environ["PATH"], "STAGING_HUB_TOKEN": staging_hub.token,
           "PUBLISHER_SOURCE_ENDPOINT": staging_hub.url}
    cli = subprocess.run([sys.executable, "-m", "publisher", "build", str(compiled_manifest), "--namespace", "tester",
                          "--out", str(work / "out"), "--store", str(work / "store")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines() == [
        "error: compiling to .mlmodelc needs macOS with Xcode (xcrun coremlcompiler), not found here; build with "
        "--no-compile and run `publisher compile BUILD_DIR` on a macOS machine"]


def test_failing_compiler_is_reported(built, staging_hub, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a stand-in xcrun, only to test error handling: it fails like a broken Xcode install would
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "xcrun").write_text("#!/bin/sh\necho 'coremlcompiler: error: model is invalid' >&2\nexit 3\n")
    (fake / "xcrun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    work, _ = built
    text = (work / "manifests" / "tiny-sd.yaml").read_text().replace("layouts: [packages]",
                                                                     "layouts: [packages, compiled, zip]")
    manifest = tmp_path / "compiled.yaml"
    manifest.write_text(text)
    opts = options(work, staging_hub)
    opts.compile = True
    opts.out = tmp_path / "out"
    result = build(load_manifests([manifest]), opts)
    assert not result.ok
    errors = {r.error for r in result.variants}
    assert all("coremlcompiler failed" in (e or "") and "(exit 3)" in (e or "") for e in errors)
    assert not list((tmp_path / "out").rglob("*.mlmodelc"))


def test_zip_is_deterministic_with_one_top_folder(tmp_path: Path) -> None:
    resources = tmp_path / "compiled"
    for name in ("TextEncoder.mlmodelc", "Unet.mlmodelc"):
        (resources / name / "weights").mkdir(parents=True)
        (resources / name / "weights" / "weight.bin").write_bytes(os.urandom(100_000))
        (resources / name / "model.mil").write_text("program")
    (resources / "vocab.json").write_text("{}")
    (resources / "merges.txt").write_text("#version: 0.2\n")
    write_zip(resources, tmp_path / "a.zip", "repo_original_compiled")
    os.utime(resources / "vocab.json", (1, 1))  # times on disk do not matter
    write_zip(resources, tmp_path / "b.zip", "repo_original_compiled")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        names = archive.namelist()
        assert {n.split("/")[0] for n in names} == {"repo_original_compiled"}
        assert "repo_original_compiled/vocab.json" in names
        assert "repo_original_compiled/Unet.mlmodelc/weights/weight.bin" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
        assert archive.testzip() is None


_NO_PYTORCH_MODEL = """
import importlib.abc, json, sys
from pathlib import Path

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("diffusers", "transformers"):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
from publisher.verify.build_dir import verify_build_dir
from publisher.verify.runtime import ExecutorRuntime


class StoredOutputs:
    '''A stand-in runtime: returns the reference's own outputs (the path's cost without any model).'''
    name = "stand-in"

    def run(self, package, inputs):
        return dict(self.current.outputs)

mode, out, store = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if mode == "stand-in":
    import publisher.verify.build_dir as build_dir
    runtime = StoredOutputs()
    load = build_dir.Reference.load
    def remember(path):
        runtime.current = load(path)
        return runtime.current
    build_dir.Reference.load = remember
else:
    runtime = ExecutorRuntime()
    import torch
    made = []
    original = torch.nn.Module.__init__
    def spy(self, *args, **kwargs):
        made.append(type(self).__name__)
        original(self, *args, **kwargs)
    torch.nn.Module.__init__ = spy
results = verify_build_dir(out, runtime, store)
print(json.dumps({"results": [[v, r.submodule, r.min_psnr_db] for v, r in results],
                  "torch": "torch" in sys.modules, "modules": made if mode != "stand-in" else []}))
"""


def test_verify_uses_the_stored_reference_and_no_pytorch_model(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The macOS job's path (`publisher verify build --runtime coreml`), run on Linux with the executor behind the
    same runtime interface: no diffusers/transformers import, no torch module built, and the same figures the
    build's own check got from the same stored inputs and outputs."""
    work, _ = built
    out = tmp_path / "out"
    import shutil

    shutil.copytree(work / "out", out)  # verify writes its figures into build-info.json
    script = tmp_path / "check.py"
    script.write_text(_NO_PYTORCH_MODEL)
    runs = {}
    for mode in ("executor", "stand-in"):
        proc = subprocess.run([sys.executable, str(script), mode, str(out), str(work / "store")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    executor, stand_in = runs["executor"], runs["stand-in"]
    assert executor["modules"] == []  # the executor ran torch kernels, never an nn.Module
    assert stand_in["torch"] is False  # the path itself does not even import torch
    assert len(executor["results"]) == 4 * 4  # 4 variants x 4 packages, one at a time
    for variant, submodule, value in executor["results"]:
        folder = out / variant
        info = json.loads((folder / "build-info.json").read_text())
        assert info["fidelity"][submodule]["reference_psnr_db"] == round(value, 2)
        assert abs(info["fidelity"][submodule]["output_psnr_db"] - value) < 0.01  # the build's own figure
    assert all(value > 100 for _, _, value in stand_in["results"])


def test_float_references_are_computed_once_and_shared(built) -> None:  # type: ignore[no-untyped-def]
    """The float model's outputs do not depend on the attention implementation or the compression: one PyTorch run
    per submodule serves every package of it. Both float16 attentions store the same reference; the palettized
    packages are held to their decoded weights and compared with that same float reference."""
    from publisher.verify.fidelity import Reference

    work, _ = built
    out, store = work / "out", work / "store"

    def references(repo: str, attention: str) -> dict[str, Reference]:
        info = json.loads((out / "tester" / repo / attention / "build-info.json").read_text())
        return {submodule: Reference.load(store / "objects" / key[:2] / key / "reference.npz")
                for submodule, key in info["references"].items()}

    original, v2 = references("coreml-tiny-sd", "original"), references("coreml-tiny-sd", "split_einsum_v2")
    assert set(original) == set(v2) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for submodule, reference in original.items():
        assert reference.float_outputs is None
        for name, value in reference.outputs.items():
            assert np.array_equal(value, v2[submodule].outputs[name]), (submodule, name)
    palettized = {attention: references("coreml-tiny-sd-palettized", attention)
                  for attention in ("original", "split_einsum_v2")}
    for attention in ("original", "split_einsum_v2"):
        for submodule in ("text_encoder", "unet"):
            reference = palettized[attention][submodule]
            assert reference.float_outputs is not None and "replaced" in reference.notes[0]
            for name, value in reference.float_outputs.items():
                assert np.array_equal(value, original[submodule].outputs[name]), (attention, submodule, name)
                # held to the decoded weights, which differ from the float model's
                assert not np.array_equal(reference.outputs[name], value)
    # the palettized UNets of both attentions decode to the same weights: the second is held to the first's
    # PyTorch outputs (computed once), and both pass on the executor
    first, second = palettized["original"]["unet"], palettized["split_einsum_v2"]["unet"]
    assert first.weights_digest is not None and first.weights_digest == second.weights_digest
    assert "same decoded weights" in second.notes[-1] and len(first.notes) == 1
    assert all(np.array_equal(first.outputs[name], value) for name, value in second.outputs.items())


def test_verify_without_stored_reference_says_so(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work, _ = built
    result = subprocess.run([sys.executable, "-m", "publisher", "verify", str(work / "out"), "--store",
                             str(tmp_path / "empty-store")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "no stored reference outputs in" in result.stderr and len(result.stderr.strip().splitlines()) == 1




def test_chunked_variant_publishes_chunks_and_the_whole_unet(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    manifest = write_manifest(tmp_path / "manifests", text=CHUNKED_MANIFEST)
    result = build(load_manifests([manifest]), options(tmp_path, staging_hub))
    assert result.ok, [v.error for v in result.variants]
    folder = tmp_path / "out" / "tester" / "coreml-tiny-sd-ios" / "split_einsum"
    names = sorted(p.name for p in (folder / "packages").iterdir())
    assert names == sorted(f"Stable_Diffusion_version_tiny_sd_{c}.mlpackage" for c in
                           ("text_encoder", "unet", "unet_chunk1", "unet_chunk2", "vae_decoder", "vae_encoder"))
    info = json.loads((folder / "build-info.json").read_text())
    assert {"unet", "unet_chunk1", "unet_chunk2"} <= set(info["fidelity"])
    assert all(figures["output_psnr_db"] >= 35 for figures in info["fidelity"].values())
    # the chunks' references come from the whole UNet's float forward, cut in two: chunk 1 takes the UNet's inputs,
    # chunk 2 what chunk 1 gives (and the text embeddings), and gives exactly the UNet's outputs
    from publisher.verify.fidelity import Reference

    refs = {name: Reference.load(tmp_path / "store" / "objects" / key[:2] / key / "reference.npz")
            for name, key in info["references"].items()}
    unet, first, second = refs["unet"], refs["unet_chunk1"], refs["unet_chunk2"]
    assert first.inputs.keys() == unet.inputs.keys()
    assert all(np.array_equal(first.inputs[k], unet.inputs[k]) for k in unet.inputs)
    assert set(second.inputs) == {"encoder_hidden_states", *first.outputs}
    assert all(np.array_equal(second.inputs[k], v) for k, v in first.outputs.items())
    assert np.array_equal(second.inputs["encoder_hidden_states"], unet.inputs["encoder_hidden_states"])
    assert second.outputs.keys() == unet.outputs.keys()
    assert all(np.array_equal(second.outputs[k], unet.outputs[k]) for k in unet.outputs)


def test_parallel_isolated_build_equals_the_sequential_one(built, staging_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two steps at a time, each in a process forked from the preloaded server: the same packages and build-info
    files as one step at a time in the build's own process, references equal up to float rounding; each float
    reference still computed once."""
    from publisher.verify.fidelity import Reference

    work, sequential = built
    manifest = work / "manifests"
    result = build(load_manifests([manifest]), BuildOptions(
        out=tmp_path / "out", store=tmp_path / "store", namespace="tester", compile=False, endpoint=staging_hub.url,
        token=staging_hub.token, isolate=True, jobs=2, progress=False))
    assert result.ok, [v.error for v in result.variants]
    assert sorted(result.built) == sorted(sequential.built)
    for variant in result.variants:
        folder = variant.path
        assert folder is not None
        expected = json.loads((work / "out" / folder.relative_to(tmp_path / "out") / "build-info.json").read_text())
        info = json.loads((folder / "build-info.json").read_text())
        assert info["files"] == expected["files"], variant.variant.id
        for submodule, key in info["references"].items():
            mine = Reference.load(tmp_path / "store" / "objects" / key[:2] / key / "reference.npz")
            theirs = Reference.load(work / "store" / "objects" / key[:2] / key / "reference.npz")
            for name, value in mine.outputs.items():
                # steps side by side run PyTorch on fewer threads: sums in another order, the last bits differ
                assert np.allclose(value, theirs.outputs[name], rtol=1e-4, atol=1e-5), (submodule, name)


def _fails_deep_inside() -> None:
    def convert_layer_seven() -> None:
        raise ValueError("layer seven has no weights")

    convert_layer_seven()


def test_a_failing_isolated_step_keeps_the_childs_traceback(tmp_path: Path) -> None:
    """--debug shows where a step failed, also when it failed in its own process: the engine keeps the formatted
    exception, which carries the child's traceback."""
    import traceback

    from publisher.convert.coreml import run_isolated

    with pytest.raises(ValueError, match="layer seven") as info:
        run_isolated(_fails_deep_inside)
    text = "".join(traceback.format_exception(info.value))
    assert "convert_layer_seven" in text and "_fails_deep_inside" in text


RECIPES_MANIFEST = MANIFEST_HEAD + "".join(f"""\
  - repo: "{{{{namespace}}}}/coreml-tiny-sd-{name}"
    precision: {{{{type: palettize, nbits: 6, recipe: {name}.json}}}}
    attention: [ORIGINAL]
    components: [unet]
    layouts: [packages]
""" for name in ("a", "b", "c"))


def test_each_repo_is_palettized_by_its_own_recipe(tmp_path: Path, staging_hub, tiny_source_repo) -> None:  # type: ignore[no-untyped-def]
    """Two repos that differ only in their recipe file get their own packages; a recipe name that matches no
    weight fails its variant; editing a recipe in place rebuilds exactly what reads it."""
    folder = tmp_path / "manifests"
    manifest = write_manifest(folder, text=RECIPES_MANIFEST)
    (folder / "a.json").write_text(json.dumps({"*": 8}))
    (folder / "b.json").write_text(json.dumps({"*up_blocks*": 8, "*": 6}))  # the first match decides
    (folder / "c.json").write_text(json.dumps({"no_such_op": 2}))
    result = build(load_manifests([manifest]), options(tmp_path, staging_hub))
    by_repo = {r.variant.repo_name: r for r in result.variants}
    out = tmp_path / "out" / "tester"

    def unet_bits(repo: str) -> float:
        info = json.loads((out / repo / "original" / "build-info.json").read_text())
        return info["fidelity"]["unet"]["bits"]

    assert unet_bits("coreml-tiny-sd-a") == 8
    assert 6 < unet_bits("coreml-tiny-sd-b") < 8
    assert by_repo["coreml-tiny-sd-c"].status == "failed"
    assert "no_such_op" in (by_repo["coreml-tiny-sd-c"].error or "") and "match no weight" in (
        by_repo["coreml-tiny-sd-c"].error or "")
    assert sum(s.startswith("convert:") for s in result.built) == 1  # one float16 UNet for the three
    (folder / "b.json").write_text(json.dumps({"*": 8}))
    again = build(load_manifests([manifest]), options(tmp_path, staging_hub))
    assert sorted(s.split(":")[0] for s in again.built) == ["palettize", "verify"]
    assert unet_bits("coreml-tiny-sd-b") == 8
