"""Manifest validation: each rule gives one exact line with file:line: field: message."""

from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import pytest

from publisher.deployment import DeploymentTarget
from publisher.errors import ManifestError
from publisher.manifest import load_manifest, load_manifests, parse_manifest
from publisher.vocabulary import Attention, ComputeUnit

GOOD = textwrap.dedent("""\
    name: sd-test
    source:
      repo: org/tiny-sd
      revision: main
    license: creativeml-openrail-m
    resolution: 512
    publish:
      - repo: "{namespace}/coreml-tiny"
        precision: {type: float16}
        attention: [ORIGINAL, SPLIT_EINSUM]
      - repo: "{namespace}/coreml-tiny-palettized"
        precision:
          type: palettize
          nbits: 6
        attention: [ORIGINAL, SPLIT_EINSUM_V2]
    """)


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return [line.replace(str(path), "m.yaml") for line in info.value.lines]


def test_good_manifest_has_defaults(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, GOOD)).manifest
    float16, palettized = m.publish
    assert float16.deployment_target is DeploymentTarget.iOS16
    assert palettized.deployment_target is DeploymentTarget.iOS17
    assert float16.compute_unit(Attention.ORIGINAL) is ComputeUnit.CPU_AND_GPU
    assert palettized.compute_unit(Attention.SPLIT_EINSUM_V2) is ComputeUnit.ALL
    assert [c.value for c in m.components_for(float16)] == [
        "text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker"]
    assert [x.value for x in float16.layouts] == ["packages", "compiled", "zip"]
    assert float16.repo_id("me") == "me/coreml-tiny"


CASES = [
    # (replace old -> new in GOOD, expected error line)
    ("      nbits: 6", "      nbits: 5", "m.yaml:14: publish[1].precision.nbits: must be one of 1, 2, 4, 6, 8"),
    ("resolution: 512", "resolution: 500", "m.yaml:6: resolution: input should be a multiple of 64"),
    ("resolution: 512", "resolution: 1180591620717411303424", "m.yaml:6: resolution: input should be less than or "
     "equal to 2048"),
    ("resolution: 512", "resolution: '512'", "m.yaml:6: resolution: must be a square's side (512) or WIDTHxHEIGHT "
     "(512x768)"),
    ("license: creativeml-openrail-m", "license: creativeml-openrail-m\ncolour: blue", "m.yaml:6: colour: unknown field"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT]",
     "m.yaml:10: publish[0].attention[1]: must be one of ORIGINAL, SPLIT_EINSUM, SPLIT_EINSUM_V2"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, ORIGINAL]",
     "m.yaml:10: publish[0].attention[1]: duplicate 'ORIGINAL'"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: []",
     "m.yaml:10: publish[0].attention: list should have at least 1 item after validation, not 0"),
    ('repo: "{namespace}/coreml-tiny-palettized"', 'repo: "{namespace}/coreml-tiny"',
     "m.yaml:11: publish[1].repo: duplicate of publish[0].repo"),
    ('repo: "{namespace}/coreml-tiny-palettized"', 'repo: "../etc/passwd"',
     "m.yaml:11: publish[1].repo: must be 'namespace/name' (letters, digits, '-', '_', '.'; the namespace may be "
     "'{namespace}')"),
    ('repo: "{namespace}/coreml-tiny-palettized"', 'repo: "just-a-name"',
     "m.yaml:11: publish[1].repo: must be 'namespace/name' (letters, digits, '-', '_', '.'; the namespace may be "
     "'{namespace}')"),
    ("  repo: org/tiny-sd", "  repo: tiny-sd",
     "m.yaml:3: source.repo: does not match ^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/"
     "[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$"),
    ("    attention: [ORIGINAL, SPLIT_EINSUM_V2]",
     "    attention: [ORIGINAL, SPLIT_EINSUM_V2]\n    chunk_unet: true",
     "m.yaml:16: publish[1].chunk_unet: a 6-bit UNet is small enough (6 bits per weight): chunking is refused"),
    ("      nbits: 6", "      nbits: 6\n      granularity: per_grouped_channel\n      group_size: 32\n"
     "    minimum_deployment_target: iOS17",
     "m.yaml:15: publish[1].precision.granularity: per_grouped_channel needs minimum_deployment_target "
     "iOS18/macOS15 or later"),
    ("    attention: [ORIGINAL, SPLIT_EINSUM_V2]",
     "    attention: [ORIGINAL, SPLIT_EINSUM_V2]\n    minimum_deployment_target: iOS16",
     "m.yaml:16: publish[1].minimum_deployment_target: palettized weights need iOS17/macOS14 or later"),
    ("precision: {type: float16}", "precision: {type: float16, nbits: 8}",
     "m.yaml:9: publish[0].precision.nbits: only allowed when type is 'palettize'"),
    ("      nbits: 6", "      granularity: per_tensor",
     "m.yaml:12: publish[1].precision.nbits: required when type is 'palettize'"),
    ("precision: {type: float16}", "precision: {type: float8}",
     "m.yaml:9: publish[0].precision.type: must be one of float16, palettize"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT_EINSUM]\n    components: [unet, tokenizer]",
     "m.yaml:11: publish[0].components[1]: 'tokenizer' is not a component of family 'sd' (text_encoder, unet, "
     "control-unet, vae_decoder, vae_encoder, safety_checker)"),
    ("  revision: main", "  revision: main\n  components: [text_encoder, unet, vae_decoder]",
     None),  # fine on its own; see the subset rule below
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT_EINSUM]\n    layouts: [packages, zip]",
     "m.yaml:11: publish[0].layouts: 'zip' needs 'compiled' (the zip holds the compiled Resources)"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]",
     "attention: [ORIGINAL]\n    compute_units: {SPLIT_EINSUM: CPU_AND_NE}",
     "m.yaml:11: publish[0].compute_units.SPLIT_EINSUM: 'SPLIT_EINSUM' is not in this repo's attention list"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT_EINSUM]\n    chunk_unet: 'yes'",
     "m.yaml:11: publish[0].chunk_unet: input should be a valid boolean"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT_EINSUM]\n    chunk_unet: [SPLIT_EINSUM_V2]",
     "m.yaml:11: publish[0].chunk_unet[0]: 'SPLIT_EINSUM_V2' is not in this repo's attention list"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT_EINSUM]\n    chunk_unet: [FOO]",
     "m.yaml:11: publish[0].chunk_unet[0]: must be one of ORIGINAL, SPLIT_EINSUM, SPLIT_EINSUM_V2"),
    ("attention: [ORIGINAL, SPLIT_EINSUM]", "attention: [ORIGINAL, SPLIT_EINSUM]\n    chunk_unet: [SPLIT_EINSUM]",
     None),
    ("name: sd-test", "name: SD Test!", "m.yaml:1: name: does not match ^[a-z0-9](?:[a-z0-9.-]{0,62}[a-z0-9])?$"),
    ("name: sd-test\n", "", "m.yaml:1: name: required field is missing"),
]


@pytest.mark.parametrize(("old", "new", "expected"), CASES, ids=[c[2] or c[1] for c in CASES])
def test_rule(tmp_path: Path, old: str, new: str, expected: str | None) -> None:
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if expected is None:
        load_manifest(write(tmp_path, text))
    else:
        assert errors_of(tmp_path, text) == [expected]


def test_component_not_in_source(tmp_path: Path) -> None:
    text = GOOD.replace("  revision: main", "  revision: main\n  components: [text_encoder, unet, vae_decoder]")
    text = text.replace("attention: [ORIGINAL, SPLIT_EINSUM]",
                        "attention: [ORIGINAL, SPLIT_EINSUM]\n    components: [unet, safety_checker]")
    assert errors_of(tmp_path, text) == [
        "m.yaml:12: publish[0].components[1]: 'safety_checker' is not provided by the source (see source.components)"]


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    text = GOOD.replace("resolution: 512", "resolution: 128").replace("      nbits: 6", "      nbits: 3")
    assert errors_of(tmp_path, text) == [
        "m.yaml:6: resolution: input should be greater than or equal to 256",
        "m.yaml:14: publish[1].precision.nbits: must be one of 1, 2, 4, 6, 8",
    ]


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "m.yaml:1: (root): the manifest is empty"),
    (b"name: [unclosed\n", "m.yaml:2: (yaml): expected ',' or ']', but got '<stream end>'"),
    (b"- a\n- b\n", "m.yaml:1: (root): must be a mapping of fields, not CommentedSeq"),
    (b"name: x\nname: y\n", "m.yaml:2: (yaml): found duplicate key \"name\" with value \"y\" (original value: \"x\")"),
    (b"name: sd\n\xff\xfe\n", "m.yaml:2: (file): not UTF-8 text (byte 9)"),
])
def test_unparseable_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [line.replace(str(path), "m.yaml") for line in info.value.lines] == [expected]


def test_two_manifests_may_not_share_a_repo(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("name: sd-test", "name: other"), "b.yaml")
    with pytest.raises(ManifestError) as info:
        load_manifests([tmp_path])
    assert info.value.lines == [
        f"{tmp_path / 'b.yaml'}:1: publish[0].repo: '{{namespace}}/coreml-tiny' is also published by {tmp_path / 'a.yaml'}",
        f"{tmp_path / 'b.yaml'}:1: publish[1].repo: '{{namespace}}/coreml-tiny-palettized' is also published by "
        f"{tmp_path / 'a.yaml'}",
    ]


def test_repo_manifests_are_valid() -> None:
    loaded = load_manifests([Path(__file__).parent.parent / "manifests"])
    assert sorted(item.manifest.source.repo for item in loaded) == [
        "CompVis/stable-diffusion-v1-4", "Lykon/DreamShaper", "stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-2-base", "stabilityai/stable-diffusion-xl-base-1.0",
        "stable-diffusion-v1-5/stable-diffusion-v1-5"]
    for item in loaded:
        assert item.path.read_text().startswith("# yaml-language-server: $schema=./manifest.schema.json\n")


def test_safety_checker_only_at_512(tmp_path: Path) -> None:
    """The Swift pipeline feeds the safety checker a 512x512 image: asking for one at another resolution is an
    error that says why; by default it is left out there."""
    at_256 = GOOD.replace("resolution: 512", "resolution: 256")
    asked = at_256.replace("attention: [ORIGINAL, SPLIT_EINSUM]",
                           "attention: [ORIGINAL, SPLIT_EINSUM]\n    components: [unet, safety_checker]")
    assert errors_of(tmp_path, asked) == [
        "m.yaml:11: publish[0].components[1]: a safety checker needs resolution 512 (the Swift pipeline feeds it a "
        "512x512 image), not 256"]
    default = load_manifest(write(tmp_path, at_256)).manifest
    assert [c.value for c in default.components_for(default.publish[0])] == [
        "text_encoder", "unet", "vae_decoder", "vae_encoder"]
    at_512 = load_manifest(write(tmp_path, GOOD)).manifest
    assert "safety_checker" in [c.value for c in at_512.components_for(at_512.publish[0])]


def test_chunk_unet_per_attention(tmp_path: Path) -> None:
    text = GOOD.replace("attention: [ORIGINAL, SPLIT_EINSUM]",
                        "attention: [ORIGINAL, SPLIT_EINSUM]\n    chunk_unet: [SPLIT_EINSUM]")
    target = load_manifest(write(tmp_path, text)).manifest.publish[0]
    assert [target.chunks_unet(a) for a in target.attention] == [False, True]


@pytest.mark.parametrize(("content", "expected"), [
    ("name: x\n" + "# padding\n" * 30_000, "m.yaml:1: (file): 300008 bytes; a manifest may have 262144 at most"),
    ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", "m.yaml:1: (yaml): nested deeper than 32 levels"),
    ("name: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "m.yaml:1: (yaml): nested deeper than 32 levels"),
    ("".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v: 1\n",
     "m.yaml:1: (yaml): nested deeper than 32 levels"),
])
def test_hostile_sizes_are_one_line_and_bounded(tmp_path: Path, content: str, expected: str) -> None:
    import tracemalloc

    path = write(tmp_path, content)
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the work is bounded by what it allocates: a loader that expands the aliases builds billions of values
    assert peak < 64 * 2**20
    assert [line.replace(str(path), "m.yaml") for line in info.value.lines] == [expected]


def test_resolved_repo_ids_are_checked_across_files(tmp_path: Path) -> None:
    from publisher.manifest import check_resolved

    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("name: sd-test", "name: other").replace('"{namespace}/coreml-tiny"', '"me/coreml-tiny"')
          .replace('"{namespace}/coreml-tiny-palettized"', '"me/coreml--tiny"'), "b.yaml")
    loaded = load_manifests([tmp_path])  # the templates differ: fine until the namespace is known
    with pytest.raises(ManifestError) as other:
        check_resolved(loaded, "other")
    assert len(other.value.lines) == 1 and "'me/coreml--tiny' is not a valid Hub repo id" in other.value.lines[0]
    with pytest.raises(ManifestError) as info:
        check_resolved(loaded, "me")
    assert info.value.lines == [
        f"{tmp_path / 'b.yaml'}:8: publish[0].repo: 'me/coreml-tiny' is also published by publish[0] of "
        f"{tmp_path / 'a.yaml'}",
        f"{tmp_path / 'b.yaml'}:11: publish[1].repo: 'me/coreml--tiny' is not a valid Hub repo id: Cannot have -- or "
        ".. in repo_id: 'me/coreml--tiny'.",
    ]
    for bad in ("a..b", "-x", "x\nFAKE"):
        with pytest.raises(ManifestError, match=r"^namespace '.*': must be letters") as raised:
            check_resolved(loaded, bad)
        assert "\n" not in str(raised.value)


def test_plan_refuses_resolved_duplicates(tmp_path: Path) -> None:
    from publisher.plan import build_plan

    text = GOOD.replace('"{namespace}/coreml-tiny-palettized"', '"me/coreml-tiny"')
    with pytest.raises(ManifestError, match=r"publish\[1\].repo: 'me/coreml-tiny' is also published by publish\[0\]"):
        build_plan([load_manifest(write(tmp_path, text))], "me")


def _leaves(node: object, loc: tuple = ()) -> list[tuple]:
    """Every location in a parsed manifest: mappings' values and lists' items, at any depth."""
    found = [loc] if loc else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _leaves(value, (*loc, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _leaves(value, (*loc, index))
    return found


def test_every_bad_value_at_any_depth_is_one_line(tmp_path: Path) -> None:
    """Each value of a real manifest replaced by each YAML type: a `file:line: field: message` line or a valid
    manifest, never a crash."""
    import yaml

    base = yaml.safe_load((Path(__file__).parent.parent / "manifests" / "sd-v1-5.yaml").read_text())
    replacements = [{"type": {"nested": 1}}, {"a": [1, 2]}, [1, {"b": None}], None, True, 3.5, -1, "", "x" * 300,
                    "2026-12-06"]
    line = re.compile(r"^m\.yaml:\d+: \S.*: .+$")
    checked = 0
    for loc in _leaves(base):
        for value in replacements:
            document = copy.deepcopy(base)
            parent = document
            for part in loc[:-1]:
                parent = parent[part]
            parent[loc[-1]] = value
            path = tmp_path / "m.yaml"
            path.write_text(yaml.safe_dump(document))
            try:
                load_manifest(path)
            except ManifestError as exc:
                lines = [text.replace(str(path), "m.yaml") for text in exc.lines]
                assert lines and all(line.match(text) for text in lines), (loc, value, lines)
            checked += 1
    assert checked > 300


def test_community_source_rules(tmp_path: Path) -> None:
    """A single-file checkpoint needs the config repo that describes it; `weights` and the safety checker do not
    apply to it; LoRA files stay inside their repo and are named once."""
    text = """\
name: x
source:
  repo: a/b
  file: sub/model.ckpt
  weights: fp16
  components: [unet, safety_checker]
  loras:
    - {repo: e/f, file: l.safetensors, scale: 1}
    - {repo: e/f, file: a/../b.pt}
    - {repo: E/f, file: l.safetensors, scale: 0.5}
license: mit
publish:
  - repo: n/x
    precision: {type: float16}
    attention: [ORIGINAL]
"""
    manifest, errors = parse_manifest(text, tmp_path / "m.yaml")
    assert manifest is None
    where = str(tmp_path / "m.yaml")
    assert errors == [
        f"{where}:9: source.loras[1].file: must be a file path inside the repo (no empty, '.' or '..' part)",
        f"{where}:4: source.file: needs source.config: the diffusers repo whose configs and tokenizer describe the "
        "checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)",
        f"{where}:5: source.weights: does not apply to a single-file checkpoint (its weights are converted in the "
        "file's own precision)",
        f"{where}:6: source.components[1]: 'safety_checker' is not in a single-file checkpoint",
        f"{where}:10: source.loras[2]: duplicate LoRA (same repo and file)",
    ]
    _, errors = parse_manifest(text.replace("  file: sub/model.ckpt\n", "").replace("  weights: fp16\n", "")
                               .replace("  loras:", "  config: {repo: c/d}\n  loras:"), tmp_path / "m.yaml")
    assert f"{where}:5: source.config: applies only with source.file (a single-file checkpoint)" in errors
    _, errors = parse_manifest(text.replace("scale: 1}", "scale: '1'}"), tmp_path / "m.yaml")
    assert errors == [f"{where}:8: source.loras[0].scale: input should be a valid number"]
    ok, errors = parse_manifest(text.replace("  weights: fp16\n", "").replace(", safety_checker", "")
                                .replace("  loras:", "  config: {repo: c/d}\n  loras:")
                                .replace("    - {repo: e/f, file: a/../b.pt}\n", "")
                                .replace("E/f", "g/h"), tmp_path / "m.yaml")
    assert errors == [] and ok is not None and [lora.scale for lora in ok.source.loras] == [1.0, 0.5]
