"""A digest of the project code a build step runs: the modules it names and every project module they import.

Part of a step's store key, so a change to the converter's code rebuilds what it made. The source is normalised
through its syntax tree with docstrings dropped, so comments, docstrings and formatting change nothing.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "publisher"
_ROOT = Path(__file__).resolve().parents[1]  # publisher/


def module_file(name: str) -> Path | None:
    """The source file of a project module (`publisher.a.b` -> publisher/a/b.py or its package's __init__.py)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    parts = name.split(".")[1:]
    base = _ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# A project module named in a string: the registries load their built-ins so (`"publisher.families.sd:FAMILY"`),
# and that code runs as surely as an imported module's.
_NAMED_MODULE = re.compile(r"^(publisher(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?::[A-Za-z_][A-Za-z0-9_]*)?$")


def _imported(name: str, path: Path) -> set[str]:
    return set(_imported_by(name, path, _stamp(path)))


@functools.lru_cache(maxsize=512)
def _imported_by(name: str, path: Path, stamp: tuple[int, int]) -> frozenset[str]:
    """Project modules a module imports anywhere in it (function-level imports too, and modules named in strings),
    with their parent packages (once per version of the file: `stamp`)."""
    tree = _parsed(path, stamp)
    found: set[str] = set()
    own = module_file(name)
    package = name if own is not None and own.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                (named := _NAMED_MODULE.match(node.value)):
            found.add(named.group(1))
    closed: set[str] = set()
    for module in found:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            closed.add(".".join(parts[:i]))
    return frozenset(m for m in closed if module_file(m) is not None)


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_mtime_ns, info.st_size


@functools.lru_cache(maxsize=512)
def _parsed(path: Path, stamp: tuple[int, int]) -> ast.Module:
    """A module's syntax tree, parsed once per version of the file (`stamp`: its mtime and size)."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _normalised(path: Path) -> str:
    return _dumped(path, _stamp(path))


@functools.lru_cache(maxsize=512)
def _dumped(path: Path, stamp: tuple[int, int]) -> str:
    """The module's syntax tree without docstrings, dumped: comments and formatting are not in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def module_closure(names: Iterable[str]) -> list[str]:
    """The project modules `names` import, directly or not (themselves and their packages included), sorted."""
    seen: set[str] = set()
    todo = [n for n in names if module_file(n) is not None]
    for name in list(todo):
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        assert path is not None
        todo.extend(_imported(name, path) - seen)
    return sorted(seen)


def code_digest(names: tuple[str, ...]) -> str:
    """sha256 over the normalised source of `names` and every project module they import."""
    digest = hashlib.sha256()
    for name in module_closure(names):
        path = module_file(name)
        assert path is not None
        dumped = _normalised(path)
        digest.update(f"{name}\0{len(dumped)}\0".encode())
        digest.update(dumped.encode())
    return digest.hexdigest()
