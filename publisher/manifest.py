"""Manifest loading: YAML in, a validated `Manifest` out, or one-line errors with file:line. The models are
publisher.manifest_schema, the rules that span fields publisher.manifest_rules; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from publisher.compress.scheme import precision_json_schema
from publisher.deployment import DeploymentTarget
from publisher.errors import ManifestError
from publisher.manifest_rules import Loc, cross_field_errors
from publisher.manifest_schema import (
    CHECKPOINT_SUFFIXES,
    MAX_LORAS,
    MAX_SIZES,
    NAMESPACE_RE,
    REPO_FILE_RE,
    REPO_ID_RE,
    SLUG_RE,
    ConfigSource,
    ExtraSource,
    LoadedManifest,
    LoraSource,
    Manifest,
    PublishRepo,
    Runners,
    Source,
)
from publisher.vocabulary import Attention, Component, ComputeUnit, Layout

__all__ = ["CHECKPOINT_SUFFIXES", "MAX_LORAS", "MAX_SIZES", "REPO_FILE_RE", "REPO_ID_RE", "SLUG_RE", "Attention",
           "Component", "ComputeUnit", "ConfigSource", "DeploymentTarget", "ExtraSource", "Layout", "LoadedManifest",
           "LoraSource", "Manifest", "PublishRepo", "Runners", "Source", "cross_field_errors", "load_manifest",
           "load_manifests"]

SCHEMA_FILE_NAME = "manifest.schema.json"
# Bounds on what a manifest may make the loader do (a real one is ~1 KB, ~60 nodes, 4 levels deep): a YAML alias
# bomb or a deeply nested document is refused in one line instead of hanging or crashing `validate`.
MAX_MANIFEST_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 32
MANIFEST_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------------------------------------------------
# Loading with line numbers


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(root)"


def _line_of(document: Any, loc: Loc) -> int:
    """1-based line of the deepest node of `loc` that exists in the YAML document."""
    line = 0
    node = document
    for part in loc:
        if isinstance(node, CommentedMap):
            key = _find_key(node, part)
            if key is None:
                break
            line = node.lc.value(key)[0] if not isinstance(node[key], (CommentedMap, CommentedSeq)) \
                else node.lc.key(key)[0]
            node = node[key]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line = node.lc.item(part)[0]
            node = node[part]
        else:
            break
    return line + 1


def _find_key(node: CommentedMap, part: str | int) -> Any:
    if part in node:
        return part
    for key in node:  # keys may be non-strings in YAML (1: x), or enums rendered as strings
        if str(key) == str(part):
            return key
    return None


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in ("literal_error", "enum"):
        expected = str(ctx.get("expected", "")).replace(" or ", ", ").replace("'", "")
        return f"must be one of {expected}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch":
        return f"does not match {ctx.get('pattern')}"
    if kind == "value_error" and ctx.get("error") is not None:  # a validator's own message
        return str(ctx["error"])
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def _clean_loc(loc: Sequence[Any]) -> Loc:
    # pydantic appends '[key]' for errors on a dict's keys (reported at the key itself), and a union's tag
    return tuple(part for part in loc if part not in ("[key]", "[bool]", "[list]", "[one]"))


def parse_manifest(text: str, path: Path) -> tuple[Manifest | None, list[str]]:
    """Validate one manifest's text; returns the manifest or the error lines (`file:line: field: message`)."""
    manifest, _, errors = _parse(text, path)
    return manifest, errors


def _parse(text: str, path: Path) -> tuple[Manifest | None, tuple[dict[str, Any], ...], list[str]]:
    """parse_manifest, and the contents of the files each publish entry's precision names (read next to it)."""
    manifest, document, errors = _validate(text, path)
    if manifest is None:
        return None, (), errors
    inputs: list[dict[str, Any]] = []
    problems: list[tuple[Loc, str]] = []
    for index, target in enumerate(manifest.publish):
        read, found = target.precision.scheme.read_inputs(target.precision, path.parent)
        inputs.append(read)
        problems.extend((("publish", index, *loc), message) for loc, message in found)
    if problems:
        return None, (), [_one_line(f"{path}:{_line_of(document, loc)}: {format_loc(loc)}: {msg}")
                          for loc, msg in problems]
    return manifest, tuple(inputs), []


def _validate(text: str, path: Path) -> tuple[Manifest | None, Any, list[str]]:
    name = str(path)
    depth = 0
    for number, char in enumerate(text):  # flow nesting, before the parser recurses into it
        depth += 1 if char in "[{" else -1 if char in "]}" else 0
        if depth > MAX_DEPTH:
            return None, None, [f"{name}:{text.count(chr(10), 0, number) + 1}: (yaml): nested deeper than {MAX_DEPTH} "
                          "levels"]
    try:
        document = YAML(typ="rt").load(text)
    except RecursionError:
        return None, None, [f"{name}:1: (yaml): nested deeper than this loader follows (a manifest needs {MAX_DEPTH} "
                      "levels at most)"]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = (exc.problem or exc.context or "invalid YAML").strip().replace("\n", " ")
        return None, None, [_one_line(f"{name}:{line}: (yaml): {problem}")]
    except YAMLError as exc:
        return None, None, [_one_line(f"{name}:1: (yaml): {str(exc).splitlines()[0] if str(exc) else 'invalid YAML'}")]
    if document is None:
        return None, None, [f"{name}:1: (root): the manifest is empty"]
    if not isinstance(document, CommentedMap):
        return None, None, [f"{name}:1: (root): must be a mapping of fields, not {type(document).__name__}"]
    try:
        plain = _plain(document, [MAX_NODES], 0)
    except _TooLarge as exc:
        return None, None, [f"{name}:1: (yaml): {exc}"]
    try:
        manifest = Manifest.model_validate(plain)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = _clean_loc(error["loc"])
            lines.append(_one_line(f"{name}:{_line_of(document, loc)}: {format_loc(loc)}: {_message(error)}"))
        return None, None, lines
    errors = cross_field_errors(manifest)
    if errors:
        return None, document, [_one_line(f"{name}:{_line_of(document, loc)}: {format_loc(loc)}: {msg}")
                      for loc, msg in errors]
    return manifest, document, []


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """Control characters (newlines, ANSI escapes) in names or values from the file are shown escaped, so that one
    problem is always one line and a manifest cannot forge output."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


class _TooLarge(Exception):
    pass


def _plain(node: Any, budget: list[int], depth: int) -> Any:
    """ruamel's round-trip nodes -> plain dicts/lists (pydantic's strict mode wants builtin types). Aliases are
    expanded here, so the node budget and the depth bound what an alias bomb can cost."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(f"expands to more than {MAX_NODES} values (YAML aliases?); a manifest is far smaller")
    if depth > MAX_DEPTH:
        raise _TooLarge(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        return {(str(k) if not isinstance(k, (str, int, bool)) else k): _plain(v, budget, depth + 1)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, budget, depth + 1) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


def load_manifest(path: Path) -> LoadedManifest:
    loaded, errors = _load(path)
    if loaded is None:
        raise ManifestError(errors[0], errors)
    return loaded


def _load(path: Path) -> tuple[LoadedManifest | None, list[str]]:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            return None, [f"{path}:1: (file): {size} bytes; a manifest may have {MAX_MANIFEST_BYTES} at most"]
        raw = path.read_bytes()
    except OSError as exc:
        return None, [f"{path}:1: (file): cannot read: {exc.strerror or exc}"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, [f"{path}:{line}: (file): not UTF-8 text (byte {exc.start})"]
    manifest, inputs, errors = _parse(text, path)
    if manifest is None:
        return None, errors
    return LoadedManifest(path=path, manifest=manifest, sha256=hashlib.sha256(raw).hexdigest(),
                          precision_inputs=inputs), []


def manifest_files(paths: Sequence[Path]) -> list[Path]:
    """Expand directories into their manifest files (sorted); files are taken as given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise ManifestError(f"{path}: no such file or directory")
    if not files:
        raise ManifestError(f"no manifest (*.yaml) found in {', '.join(str(p) for p in paths)}")
    return files


def load_manifests(paths: Sequence[Path]) -> list[LoadedManifest]:
    """Load every manifest; all errors of all files are reported together. Two manifests may not
    share a name or a target repo."""
    loaded: list[LoadedManifest] = []
    errors: list[str] = []
    for path in manifest_files(paths):
        item, item_errors = _load(path)
        errors.extend(item_errors)
        if item is not None:
            loaded.append(item)
    names: dict[str, Path] = {}
    repos: dict[str, Path] = {}
    for item in loaded:
        if item.manifest.name in names:
            errors.append(f"{item.path}:1: name: '{item.manifest.name}' is also the name of {names[item.manifest.name]}")
        names.setdefault(item.manifest.name, item.path)
        for i, target in enumerate(item.manifest.publish):
            key = target.repo.lower()
            if key in repos and repos[key] != item.path:
                errors.append(f"{item.path}:1: publish[{i}].repo: '{target.repo}' is also published by {repos[key]}")
            repos.setdefault(key, item.path)
    if errors:
        raise ManifestError(errors[0], errors)
    return loaded


def _hub_repo_id_problem(repo_id: str) -> str | None:
    """huggingface_hub's own repo-id rule (it refuses '--' and '..', a leading or trailing '-' or '.', ...)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def check_namespace(namespace: str) -> str:
    if not NAMESPACE_RE.fullmatch(namespace) or _hub_repo_id_problem(f"{namespace}/x") is not None:
        raise ManifestError(_one_line(f"namespace '{namespace}': must be letters, digits, '-', '_' or '.', without "
                                      "'--' or '..' (a Hub user or org)"))
    return namespace


def _line_in_file(path: Path, loc: Loc) -> int:
    try:
        return _line_of(YAML(typ="rt").load(path.read_text(encoding="utf-8")), loc)
    except Exception:  # the file validated a moment ago; a line number is a courtesy
        return 1


def located(path: Path, loc: Loc, message: str) -> str:
    """One error line about a field of a manifest file that loaded: `file:line: field: message`."""
    return _one_line(f"{path}:{_line_in_file(path, loc)}: {format_loc(loc)}: {message}")


def check_resolved(loaded: Sequence[LoadedManifest], namespace: str) -> None:
    """Rules on repo ids once `{namespace}` is filled in: each must pass huggingface_hub's validation, and no two
    publish entries (in one file or across files) may name the same repo. Raises ManifestError with every line."""
    check_namespace(namespace)
    errors: list[str] = []
    first: dict[str, tuple[Path, int]] = {}
    for item in loaded:
        for i, target in enumerate(item.manifest.publish):
            repo_id = target.repo_id(namespace)
            at = ("publish", i, "repo")
            problem = _hub_repo_id_problem(repo_id)
            if problem is not None:
                errors.append(located(item.path, at, f"'{repo_id}' is not a valid Hub repo id: {problem}"))
            key = repo_id.lower()  # the Hub matches repo ids case-insensitively
            if key in first:
                other, index = first[key]
                where = f"publish[{index}]" + ("" if other == item.path else f" of {other}")
                errors.append(located(item.path, at, f"'{repo_id}' is also published by {where}"))
            first.setdefault(key, (item.path, i))
    if errors:
        raise ManifestError(errors[0], errors)


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    # `precision` is one branch per registered compression scheme, whatever the Python type says
    branches = precision_json_schema()["oneOf"]
    for branch in branches:
        for name, definition in branch.pop("$defs", {}).items():
            schema.setdefault("$defs", {})[name] = definition
    schema["$defs"]["PublishRepo"]["properties"]["precision"] = {"oneOf": branches}
    schema["$defs"].pop("CompressionSettings", None)
    from publisher.family import families

    schema["properties"]["family"]["enum"] = list(families())
    # component names are the families' own (a plug-in family adds its names): the registered ones, for editors
    names = list(dict.fromkeys(c.value for family in families().values() for c in family.component_names))

    def mark(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop("x-component", False):
                node.pop("pattern", None)
                node["enum"] = names
            for value in node.values():
                mark(value)
        elif isinstance(node, list):
            for value in node:
                mark(value)

    mark(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "coreml-publisher manifest"
    return schema
