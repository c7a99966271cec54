"""The import graph DESIGN.md promises: tasks above models / losses / metrics / callbacks above ops; datamodules
apart (neither half imports the other) and its formats apart inside it; no cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lit_tasks", "datamodules")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of our packages that ``path`` imports (absolute and relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports(path):
            while imported and imported not in modules:  # `from pkg import name` may name an attribute
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def layer(module: str) -> int:
    """0 ops, 1 models / losses / metrics / callbacks, 2 tasks and the package root, 3 the CLI."""
    parts = module.split(".")
    if parts[:2] == ["lit_tasks", "ops"]:
        return 0
    if len(parts) > 1 and parts[1] in ("models", "losses", "metrics", "callbacks", "run", "schedules", "param_groups"):
        return 1
    return 3 if module == "lit_tasks.cli" else 2


def test_the_two_halves_never_import_each_other():
    for name, targets in graph().items():
        if name == "lit_tasks.cli":  # the CLI composes both halves (it lists the DataModules in --help)
            continue
        other = "datamodules" if name.startswith("lit_tasks") else "lit_tasks"
        assert not {t for t in targets if t.startswith(other)}, name


def test_imports_point_down():
    edges = graph()
    for name, targets in edges.items():
        if not name.startswith("lit_tasks") or name == "lit_tasks":
            continue
        for target in targets:
            if target == "lit_tasks" or not target.startswith("lit_tasks"):
                continue
            assert layer(target) <= layer(name), f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
            if layer(name) == 2 and layer(target) == 2 and name != "lit_tasks.base":
                assert target == "lit_tasks.base", f"task {name} imports another task {target}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                # a package __init__ re-exporting its modules is not a cycle of code depending on itself
                cycle = stack[stack.index(target):] + [target] if target in stack else [node, target]
                if not any(c.count(".") < n.count(".") and n.startswith(c + ".") for c in cycle for n in cycle):
                    raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            elif state.get(target) is None:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])



FORMATS = ("datamodules.tfrecord", "datamodules.recordio", "datamodules.face_bin")


def test_formats_import_nothing_else_of_datamodules():
    """The formats (TFRecord, MXNet RecordIO, insightface .bin) are libraries of their own: the families decode."""
    edges = graph()
    assert {"datamodules.recordio", "datamodules.face_bin", "datamodules.tfrecord.reader"} <= set(edges)
    for name, targets in edges.items():
        own = next((f for f in FORMATS if name == f or name.startswith(f + ".")), None)
        if own is None:
            continue
        outside = sorted(t for t in targets if t.startswith("datamodules") and t != own and not t.startswith(own + "."))
        assert not outside, f"format module {name} imports {outside}"
