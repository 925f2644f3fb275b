"""Model-card metadata checks, as the Hub's `validate-yaml` endpoint applies them to a README's front matter."""

from __future__ import annotations

import re
from typing import Any

import yaml

_FRONT_MATTER = re.compile(r"\A\s*---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)
_STR_OR_LIST = ("language", "datasets", "base_model", "metrics", "license_name", "license_link", "new_version")
_LIST_OF_STR = ("tags", "datasets", "metrics", "language", "base_model")
# The license identifiers the Hub's metadata validation accepts (its "Licenses" table), `other` for the rest.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++
osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license
llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())


# Bounds on what a card's metadata may make the server do: the Hub's cards are a few KB with no aliases; an alias
# bomb multiplies the values to check (and the errors) with each level.
MAX_METADATA_BYTES = 256 * 1024
MAX_ALIASES = 50
MAX_ERRORS = 100


class _TooMuch(Exception):
    pass


# libyaml's parser where PyYAML has it (a 256 KiB card: 2.1 s in the pure-Python loader, the event loop's time)
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # nested collections; a card has a handful


def _load_bounded(text: str) -> Any:
    """The metadata's value, once its events show no more aliases than a card ever has and no deeper nesting (an
    alias bomb or a deep nest is refused before anything is built from it)."""
    aliases = depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _TooMuch(f"more than {MAX_ALIASES} YAML aliases in the metadata")
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooMuch(f"nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.load(text, Loader=_LOADER)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


MAX_VISITS = 10_000  # model-index entries, results and metrics looked at (aliases can multiply them)


def _model_index_errors(index: Any) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be an array']
    errors: list[str] = []
    visits = 0
    for i, entry in enumerate(index):
        visits += 1 + (len(entry.get("results") or []) if isinstance(entry, dict) and
                       isinstance(entry.get("results"), list) else 0)
        if visits > MAX_VISITS or len(errors) >= MAX_ERRORS:
            errors.append('"model-index" is larger than a card\'s metadata is checked for')
            break
        at = f'"model-index[{i}]"'
        if not isinstance(entry, dict):
            errors.append(f"{at} must be an object")
            continue
        if not isinstance(entry.get("name"), str):
            errors.append(f'{at}.name must be a string')
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f"{at}.results must be an array")
            continue
        for j, result in enumerate(results):
            where = f"{at}.results[{j}]"
            if not isinstance(result, dict):
                errors.append(f"{where} must be an object")
                continue
            task = result.get("task")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f"{where}.task.type must be a string")
            dataset = result.get("dataset")
            if not isinstance(dataset, dict) or not isinstance(dataset.get("type"), str) \
                    or not isinstance(dataset.get("name"), str):
                errors.append(f"{where}.dataset must have string 'type' and 'name'")
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{where}.metrics must be a non-empty array")
                continue
            visits += len(metrics)
            if visits > MAX_VISITS:
                break
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append(f"{where}.metrics[{k}] must have a string 'type' and a 'value'")
    return errors


def validate_card(content: str) -> tuple[list[str], list[str]]:
    """Return (errors, warnings) for a README's metadata block."""
    head = content[:MAX_METADATA_BYTES]
    match = _FRONT_MATTER.match(head)
    if match is None:
        if len(content) > MAX_METADATA_BYTES and head.lstrip().startswith("---"):
            return [f"the metadata block does not end within {MAX_METADATA_BYTES} bytes"], []
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        data = _load_bounded(match.group(1))
    except _TooMuch as exc:
        return [f"Invalid YAML in metadata: {exc}"], []
    except yaml.YAMLError as exc:
        # where the parser noticed the problem, unless that is the end of the text (an unclosed bracket): then the
        # construct it is in
        mark = getattr(exc, "problem_mark", None)
        if mark is None or mark.index >= len(match.group(1).rstrip()):
            mark = getattr(exc, "context_mark", None) or mark
        where = f" (line {mark.line + 2})" if mark is not None else ""
        return [f"Invalid YAML in metadata{where}: {getattr(exc, 'problem', None) or exc}"], []
    if data is None:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"], []
    errors: list[str] = []
    for key in ("license", "pipeline_tag", "library_name", "thumbnail"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in _LIST_OF_STR:
        if key in data and not ((isinstance(data[key], str) and key in _STR_OR_LIST) or _is_str_list(data[key])):
            errors.append(f'"{key}" must be {"a string or " if key in _STR_OR_LIST else ""}an array of strings')
    if isinstance(data.get("license"), str) and data["license"] not in HUB_LICENSES:
        errors.append(f'"license" must be one of the Hub\'s license identifiers (or "other" with license_name and '
                      f'license_link), not "{data["license"]}"')
    if "model-index" in data:
        errors.extend(_model_index_errors(data["model-index"]))
    if "widget" in data and not isinstance(data["widget"], list):
        errors.append('"widget" must be an array')
    return errors[:MAX_ERRORS], []
