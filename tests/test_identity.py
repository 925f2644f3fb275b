"""A step is what it computes: ids and store keys from its parameters, the files it reads and the code it runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import publisher.util.codehash as codehash
from publisher.errors import ManifestError
from publisher.manifest import load_manifest, load_manifests
from publisher.plan import Plan, build_plan
from tests.helpers import MANIFEST_HEAD, write_manifest

TWO_RECIPES = MANIFEST_HEAD + """\
  - repo: "{{namespace}}/coreml-tiny-sd-a"
    precision: {{type: palettize, nbits: 6, recipe: a.json}}
    attention: [ORIGINAL]
    layouts: [packages]
  - repo: "{{namespace}}/coreml-tiny-sd-b"
    precision: {{type: palettize, nbits: 6, recipe: b.json}}
    attention: [ORIGINAL]
    layouts: [packages]
"""


def two_recipe_manifest(folder: Path, a: dict[str, int], b: dict[str, int]) -> Path:
    path = write_manifest(folder, text=TWO_RECIPES)
    (folder / "a.json").write_text(json.dumps(a))
    (folder / "b.json").write_text(json.dumps(b))
    return path


def plan_of(path: Path) -> Plan:
    return build_plan(load_manifests([path]), "tester")


def keys_by_label(plan: Plan) -> dict[str, str]:
    keys = plan.keys()
    return {f"{step.label} {sorted(step.variants)}": keys[step.id] for step in plan.steps.values()}


def test_two_recipes_make_two_compress_steps_each_with_its_own(tmp_path: Path) -> None:
    path = two_recipe_manifest(tmp_path, {"*conv*": 4}, {"*conv*": 2})
    plan = plan_of(path)
    compress = plan.steps_of("compress")
    by_repo: dict[str, list] = {}
    for step in compress:
        assert len(step.variants) == 1, step.id  # never shared between the two repos
        by_repo.setdefault(step.variants[0].split("/")[1], []).append(step)
    assert set(by_repo) == {"coreml-tiny-sd-a", "coreml-tiny-sd-b"}
    assert len(by_repo["coreml-tiny-sd-a"]) == len(by_repo["coreml-tiny-sd-b"]) >= 2
    assert {str(s.params.inputs["recipe"]) for s in by_repo["coreml-tiny-sd-a"]} == {"[['*conv*', 4]]"}
    assert {str(s.params.inputs["recipe"]) for s in by_repo["coreml-tiny-sd-b"]} == {"[['*conv*', 2]]"}
    # the float16 conversions they both read are still one step each
    assert all(len(s.variants) == 2 for s in plan.steps_of("convert"))
    # the same recipe file for both is one step again
    same = two_recipe_manifest(tmp_path / "same", {"*conv*": 4}, {"*conv*": 2})
    same.write_text(same.read_text().replace("b.json", "a.json"))
    assert all(len(s.variants) == 2 for s in plan_of(same).steps_of("compress"))


def test_editing_a_recipe_in_place_changes_exactly_the_steps_that_read_it(tmp_path: Path) -> None:
    path = two_recipe_manifest(tmp_path, {"*conv*": 4}, {"*conv*": 2})
    before = keys_by_label(plan_of(path))
    (tmp_path / "b.json").write_text(json.dumps({"*conv*": 1}))
    plan = plan_of(path)
    after = keys_by_label(plan)
    assert set(before) == set(after)
    changed = {label for label in before if before[label] != after[label]}
    readers = {f"{s.label} {sorted(s.variants)}" for s in plan.steps.values()
               if s.variants == ["tester/coreml-tiny-sd-b/original"] and s.kind in ("compress", "verify")}
    # the compress steps of b, and the verify steps of b's compressed packages; the float16 packages' verify steps
    # (b's too, where it verifies an uncompressed component) read no recipe
    compressed_verifies = {f"{s.label} {sorted(s.variants)}" for s in plan.steps_of("verify")
                           if plan.steps[s.inputs[0]].kind == "compress" and "-b/" in s.variants[0]}
    # and what reads those packages: b's end-to-end check and its assembly
    assemble = {f"{s.label} {sorted(s.variants)}" for s in plan.steps_of("assemble") + plan.steps_of("evaluate")
                if "-b/" in s.variants[0]}
    assert changed == {r for r in readers if r.startswith("palettize:")} | compressed_verifies | assemble
    assert changed and not any(label.startswith(("fetch:", "convert:")) for label in changed)


def _copy_of_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "publisher"
    shutil.copytree(codehash._ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codehash, "_ROOT", root)
    return root


def test_a_code_change_rekeys_its_steps_and_a_comment_changes_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = two_recipe_manifest(tmp_path / "m", {"*conv*": 4}, {"*conv*": 2})
    root = _copy_of_the_code(tmp_path, monkeypatch)
    before = keys_by_label(plan_of(path))
    converter = root / "convert" / "coreml.py"
    source = converter.read_text()
    # comments, a docstring edit and formatting: no key moves
    edited = source.replace('"""', '"""Edited. ', 1).replace("\n\n\n", "\n\n\n# a comment\n\n\n", 1)
    converter.write_text(edited.replace("from __future__ import annotations", "from __future__ import annotations  # x"))
    assert keys_by_label(plan_of(path)) == before
    # a change of code: the conversions and every step after them, not the fetches
    converter.write_text(source + "\n_CHANGED = 1\n")
    plan = plan_of(path)
    after = keys_by_label(plan)
    changed = {label.split(":")[0] for label in before if before[label] != after[label]}
    unchanged = {label.split(":")[0] for label in before if before[label] == after[label]}
    assert {"convert", "palettize", "verify"} <= changed
    assert "fetch" in unchanged and "fetch" not in changed
    # a family's module is loaded by its registry from a name in a string: its code counts as imported code
    converter.write_text(source)
    assert keys_by_label(plan_of(path)) == before
    family = root / "families" / "sd.py"
    family_source = family.read_text()
    family.write_text(family_source + "\n_CHANGED = 1\n")
    after = keys_by_label(plan_of(path))
    assert {label.split(":")[0] for label in before if before[label] != after[label]} >= {"convert", "verify"}
    family.write_text(family_source)
    # the code that puts compressed weights on another package's program (resolution packs, the ControlledUnet) is
    # part of every compress step's key: a change re-keys the compressions and what follows, not the conversions
    rebase = root / "compress" / "rebase.py"
    rebase_source = rebase.read_text()
    rebase.write_text(rebase_source + "\n_CHANGED = 1\n")
    after = keys_by_label(plan_of(path))
    assert {label.split(":")[0] for label in before if before[label] != after[label]} == {"palettize", "verify",
                                                                                           "evaluate", "assemble"}
    rebase.write_text(rebase_source)
    # a change to the zip writer moves only what it runs (no zip in these layouts: nothing at all here)
    assert keys_by_label(plan_of(path)) == before
    (root / "layout.py").write_text((root / "layout.py").read_text() + "\n_CHANGED = 1\n")
    assert keys_by_label(plan_of(path)) == before


def test_plan_json_shows_each_key_and_what_went_into_it(tmp_path: Path) -> None:
    plan = plan_of(two_recipe_manifest(tmp_path, {"*conv*": 4}, {"*conv*": 2}))
    data = plan.to_json()
    keys = plan.keys()
    for entry in data["steps"]:
        assert entry["key"] == keys[entry["id"]] and len(entry["key"]) == 64
        if entry["kind"] in ("fetch", "assemble"):  # keyed by the commit; by the files it links
            assert "code" not in entry
        else:
            assert "publisher.convert.coreml" in entry["code"]["modules"] or entry["kind"] != "convert"
            assert len(entry["code"]["sha256"]) == 64 and "coremltools" in entry["tools"]


@pytest.mark.parametrize(("recipe", "message"), [
    ('{\n  "conv": true\n}', "m.yaml:LINE: publish[1].precision.recipe: b.json:2: 'conv': nbits must be one of "
                             "0, 1, 2, 4, 6, 8 (0 keeps it float16), not true"),
    ('{"conv": 3}', "b.json:1: 'conv': nbits must be one of 0, 1, 2, 4, 6, 8 (0 keeps it float16), not 3"),
    ('["conv"]', "b.json:1: a recipe is a JSON object of op name -> nbits, not list"),
    ('{"conv": ', "b.json:1: not JSON"),
    ("{}", "b.json:1: the recipe is empty"),
    (None, "b.json: cannot read the recipe"),
])
def test_recipe_files_are_checked_when_the_manifest_loads(tmp_path: Path, recipe: str | None, message: str) -> None:
    path = two_recipe_manifest(tmp_path, {"*conv*": 4}, {})
    if recipe is None:
        (tmp_path / "b.json").unlink()
    else:
        (tmp_path / "b.json").write_text(recipe)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "b.json" in text)
    assert len(info.value.lines) == 1
    got = info.value.lines[0].replace(str(path), "m.yaml")
    assert got.startswith(f"m.yaml:{line}: publish[1].precision.recipe: ")
    assert message.replace("LINE", str(line)) in got


def test_a_recipe_linked_out_of_the_manifest_folder_is_refused(tmp_path: Path) -> None:
    path = two_recipe_manifest(tmp_path / "m", {"*conv*": 4}, {"*conv*": 2})
    (tmp_path / "outside.json").write_text('{"*conv*": 4}')
    (tmp_path / "m" / "b.json").unlink()
    (tmp_path / "m" / "b.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(ManifestError, match=r"publish\[1\]\.precision\.recipe: b\.json leads outside"):
        load_manifest(path)
