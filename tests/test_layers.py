"""The import graph DESIGN.md promises: tasks above models / losses / metrics / callbacks / run above ops; datamodules
apart (neither half imports the other) and its formats apart inside it; no cycles between modules; losses never
import models; and no private Lightning member touched outside lit_tasks/run/ (where each sits behind a guarded
function)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lightning

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
    """0 ops, 1 models / losses / metrics / callbacks / run, 2 tasks and the package root, 3 the CLI."""
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


def test_losses_never_import_models():
    for name, targets in graph().items():
        if name.startswith("lit_tasks.losses"):
            assert not {t for t in targets if t.startswith("lit_tasks.models")}, name


# -- private members of Lightning (and other libraries) only in lit_tasks/run/ -----------------------------------
SCANNED = ("lit_tasks", "datamodules", "tools", "benchmarks")
SEAM_FOLDER = "lit_tasks/run/"
# Private library members used outside lit_tasks/run/, by the function that uses them (file, qualified name): each
# one documented where it is, and a canary in tests/test_lightning_seams.py (or a torch nn.Module documented hook).
# datamodules/loaders.py's override of torch's DataLoader._index_sampler (datamodules cannot import lit_tasks.run) is
# guarded there by torch_index_sampler, with its canary.
ALLOWED = {
    ("lit_tasks/metrics/verification.py", "VerificationMetric._sync_dist"):
        "torchmetrics Metric._sync_dist override (canary: test_torchmetrics_sync_dist_keeps_the_signature_...)",
    ("tools/export.py", "deform_conv2d_symbolic"): "torch.onnx symbolic_helper._get_tensor_sizes in an ONNX symbolic",
}
# torch.nn names private by spelling only: nn.Module's state-dict hooks, which torch's docs tell subclasses to
# override, and the norm base classes isinstance checks use across torchvision / timm. Not Lightning; not guarded.
TORCH_NN_NAMES = {"_load_from_state_dict", "_save_to_state_dict", "_BatchNorm", "_InstanceNorm", "_NormBase"}


def lightning_private_names() -> set[str]:
    """Single-underscore names Lightning defines (methods, attributes, class attributes) in lightning.pytorch/fabric."""
    root = Path(lightning.__file__).parent
    pattern = re.compile(r"(?:\bdef\s+|\bself\.|^\s+)(_[a-zA-Z]\w*)\s*(?:\(|=|:)", re.M)
    return {name for sub in ("pytorch", "fabric") for path in (root / sub).rglob("*.py")
            for name in pattern.findall(path.read_text()) if not name.startswith("__")}


def lightning_base_privates() -> set[str]:
    """Single-underscore members of the Lightning classes one subclasses (module, data, callbacks, loggers, CLI)."""
    import lightning.pytorch as pl
    from lightning.pytorch import callbacks, cli, loggers

    classes = [pl.LightningModule, pl.LightningDataModule, cli.LightningCLI, cli.SaveConfigCallback,
               cli.LightningArgumentParser, *(getattr(callbacks, n) for n in callbacks.__all__),
               *(getattr(loggers, n) for n in loggers.__all__)]
    return {name for c in classes if isinstance(c, type) for name in dir(c)
            if name.startswith("_") and not name.startswith("__")}


def defined_names(tree: ast.AST) -> set[str]:
    """Names a file defines: functions, classes, assigned attributes and variables, arguments, imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return found


def lightning_imports(tree: ast.AST) -> set[str]:
    """Local names bound to Lightning modules or classes (``pl`` of ``import lightning.pytorch as pl``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.asname or alias.name for alias in node.names if alias.name.split(".")[0] == "lightning")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
            found.update(alias.asname or alias.name for alias in node.names)
    return found


def private_uses(path: Path, ours: set[str], lightning_names: set[str], base_privates: set[str]
                 ) -> list[tuple[str, int, str]]:
    """(enclosing function, line, what) for each private library member ``path`` touches.

    * an import of a ``_``-prefixed name, or from a ``_``-prefixed module, of lightning / torch / torchmetrics;
    * ``x._name`` where ``_name`` is a Lightning private not defined in this file (``self._trainer`` included);
    * ``x._name`` on anything but ``self`` / ``cls`` where no file of ours defines ``_name`` (a foreign private);
    * ``super()._name(...)``: an override calling a library's private method;
    * ``def _name`` in a class deriving from a Lightning class, ``_name`` a private of such a class: an override.
    """
    tree = ast.parse(path.read_text())
    local = defined_names(tree)
    from_lightning = lightning_imports(tree)
    found = []

    def root_name(node: ast.AST) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    def visit(node: ast.AST, scope: list[str], lightning_class: bool = False) -> None:
        what = None
        if isinstance(node, ast.ClassDef):
            lightning_class = any(root_name(base) in from_lightning for base in node.bases)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lightning_class and node.name in base_privates:
                what = f"def {node.name} (overrides Lightning's)"
            lightning_class = False
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("lightning", "torch",
                                                                                       "torchmetrics"):
            names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if names or any(p.startswith("_") for p in node.module.split(".")):
                what = f"from {node.module} import {', '.join(a.name for a in node.names)}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            receiver = node.value
            on_self = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
            on_super = (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
                        and receiver.func.id == "super")
            if on_super:
                what = f"super().{node.attr}"
            elif node.attr in lightning_names and node.attr not in local:
                what = ast.unparse(node)
            elif not on_self and node.attr not in ours:
                what = ast.unparse(node)
        if what:
            found.append((".".join(scope) or "<module>", node.lineno, what))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, lightning_class)

    visit(tree, [])
    return found


def test_no_private_lightning_member_is_touched_outside_run():
    """Every private Lightning (or torch) member lives in lit_tasks/run/ behind a function that raises a clear error
    when a release changes it (lightning_seams.py, canaries in test_lightning_seams.py). Elsewhere: the ALLOWED list
    (each documented and covered)."""
    files = [p for pkg in SCANNED for p in sorted((ROOT / pkg).rglob("*.py")) if not p.name.endswith("_pb2.py")]
    ours = set().union(*(defined_names(ast.parse(p.read_text())) for pkg in PACKAGES
                         for p in (ROOT / pkg).rglob("*.py")))
    names, base_privates = lightning_private_names(), lightning_base_privates()
    assert {"_should_check_val_fx", "_trainer", "_version", "_parse_ckpt_path"} <= names  # the scan still finds them
    assert {"_save_last_checkpoint", "_parse_ckpt_path"} <= base_privates
    problems, allowed_seen = [], set()
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(SEAM_FOLDER):
            continue
        for function, line, what in private_uses(path, ours, names, base_privates):
            if (relative, function) in ALLOWED:
                allowed_seen.add((relative, function))
            elif what.rpartition(".")[2] not in TORCH_NN_NAMES:
                problems.append(f"{relative}:{line} ({function}): {what}")
    assert allowed_seen == set(ALLOWED), f"ALLOWED names what is gone: {set(ALLOWED) - allowed_seen}"
    assert not problems, ("private library members outside lit_tasks/run/ (put each behind a function in "
                          "lit_tasks/run/lightning_seams.py; a LightningModule's trainer: attached_trainer(self)):\n"
                          + "\n".join(problems))


def test_the_private_member_scan_finds_what_it_must():
    """The scan above is real: it flags the kinds of use it exists to keep out."""
    sample = ROOT / "tests" / "data" / "private_uses_sample.py"
    ours = {"_mine"}
    found = {what for _, _, what in private_uses(sample, ours, lightning_private_names(), lightning_base_privates())}
    assert found == {"self.trainer.loggers[0]._version", "self.trainer.fit_loop._data_fetcher", "self._trainer",
                     "def _parse_ckpt_path (overrides Lightning's)", "super()._parse_ckpt_path",
                     "torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
                     "from lightning.fabric.utilities.cloud_io import _is_local_file_protocol"}


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
