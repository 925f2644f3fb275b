"""Data flows one way: a module imports only from its own layer or the ones below (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "publisher"

# lowest first; a module belongs to the first layer whose prefix matches it (longest prefixes listed first)
LAYERS: list[tuple[str, ...]] = [
    ("publisher.errors", "publisher.util", "publisher.metrics", "publisher.build_info", "publisher.vocabulary",
     "publisher"),                                                                         # base
    ("publisher.manifest", "publisher.manifest_schema", "publisher.manifest_rules",
     "publisher.contract", "publisher.mlpackage", "publisher.milfile", "publisher.compress",
     "publisher.family", "publisher.families", "publisher.coreai_bundle",
     "publisher.deployment"),                                                              # model, files, schemes
    ("publisher.plan", "publisher.plan_variant"),                                                                  # what to build
    ("publisher.convert", "publisher.verify", "publisher.compile", "publisher.layout",
     "publisher.store", "publisher.generate", "publisher.generate_reference",
     "publisher.evaluate",
     "publisher.compress.sensitivity"),  # the stages (the mixed-bit analysis runs the ANE UNet: convert/ is below it)
    ("publisher.engine", "publisher.fetch", "publisher.publish", "publisher.staging"),   # running them, the Hub
    ("publisher.tiny", "publisher.demo"),                                                 # fixtures, the demo
    ("publisher.cli", "publisher.__main__"),                                              # the command line
]


def layer_of(module: str) -> int:
    best = (-1, -1)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), index))
    assert best[1] >= 0, module
    return best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("publisher"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("publisher")}
    return found


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for target in imports(path):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert upward == []


def test_the_check_can_fail() -> None:
    assert layer_of("publisher.milfile") < layer_of("publisher.convert.coreml")
    assert layer_of("publisher.engine.build") > layer_of("publisher.verify.fidelity")
    assert layer_of("publisher.util.hashing") == 0 and layer_of("publisher.cli.build") == len(LAYERS) - 1


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (function-level imports and `from package import module` too)."""
    modules = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("publisher"):
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[module] = {t for t in targets if t in modules and t != module and not module.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []
    # the check finds one where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
