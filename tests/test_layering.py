"""The module graph of src/qlorax: no import cycles, and no import from a lower layer to a
higher one (docs/layout.md names the layers). Imports inside functions and under
TYPE_CHECKING count: hiding an arrow in a function does not make it go away."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom; a module may import only from its own layer or a lower one. The first
# matching prefix decides (a package name covers its submodules).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("commands", ("qlorax.cli", "qlorax.commands")),
    ("usecases", ("qlorax.usecases",)),
    ("executors", ("qlorax.executors",)),
    ("child", ("qlorax.launcher", "qlorax.worker", "qlorax.jobs")),
    ("foundation", ("qlorax.errors", "qlorax.settings", "qlorax.layout", "qlorax.artifacts", "qlorax.profiles",
                    "qlorax.identity", "qlorax.config", "qlorax.config_hints", "qlorax.cpuid", "qlorax.fingerprint",
                    "qlorax.determinism", "qlorax.interrupts",
                    "qlorax.formats", "qlorax.optim", "qlorax.devices", "qlorax.ops.secrets",
                    "qlorax.saved_configs", "qlorax.container", "qlorax.strict_input")),
    ("domain", ("qlorax",)),  # everything else: train, data, model, analysis, publish, ops, ...
]
ORDER = ["foundation", "domain", "child", "executors", "usecases", "commands"]


def layer_of(module: str) -> str:
    if module == "qlorax":
        return "foundation"
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(module)


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "qlorax").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the qlorax modules it imports anywhere in its file."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            targets.update(t for t in (resolve(n) for n in names if n.startswith("qlorax")) if t and t != module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_import_points_up_a_layer() -> None:
    upward = sorted(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
                    for module, targets in import_graph().items() for target in targets
                    if ORDER.index(layer_of(target)) > ORDER.index(layer_of(module)))
    assert upward == []


def test_the_checks_can_fail() -> None:
    """A cycle and an upward arrow planted in a copy of the graph are found."""
    graph = {name: set(targets) for name, targets in import_graph().items()}
    graph["qlorax.errors"].add("qlorax.settings")
    graph["qlorax.settings"].add("qlorax.errors")
    assert ["qlorax.errors", "qlorax.settings"] in cycles(graph)
    assert ORDER.index(layer_of("qlorax.usecases.training")) > ORDER.index(layer_of("qlorax.train"))


def test_no_function_over_60_lines_and_no_module_over_450() -> None:
    long_functions, long_modules = [], []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > 450:
            long_modules.append(f"{module}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{module}.{node.name}: {length} lines")
    assert long_modules == []
    assert long_functions == []
