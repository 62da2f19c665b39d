"""The package's import structure: no cycles (function-local imports included) and layers that import downwards.

The layers, lowest first, are those of docs/architecture.md; a module imports only from its own layer or below. A
new module gets a layer in ``LAYERS`` (and a line in docs/architecture.md): the test names any it cannot place.
Read with ``ast`` from the source; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gpd_ds"

# (layer, modules or packages): a name covers the package of that name and every module under it
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("gpd_ds", "errors", "registry", "progress", "preemption", "safeload", "cluster")),
    ("settings", ("config", "ds_config", "recipes")),
    ("infrastructure", ("distributed", "checkpoint", "reshard", "tracking", "ema", "engine", "run_lock")),
    ("data", ("data",)),
    ("architectures and losses", ("models.cifar", "models.mobilenet", "models.rvt", "reviewkd", "kd", "losses")),
    ("gpd", ("gpd", "tap_sets", "features")),
    ("models", ("models", "models.weights", "models.build", "models.teacher", "models.peer")),
    ("evaluation and outputs", ("evaluate", "export", "hub", "report", "dashboard", "config_checks")),
    ("training", ("train",)),
    ("command line", ("train_cli", "cli")),
)
MAX_UPWARD = 2


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every gpd_ds module ``name`` imports, anywhere in the file (functions included), as written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def _graph(implicit_packages: bool) -> dict[str, set[str]]:
    """Module -> the modules it imports; with ``implicit_packages``, also the packages Python runs first
    (importing ``gpd_ds.models.rvt`` runs ``gpd_ds/models/__init__.py``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = _imports(name, path, modules)
        if implicit_packages:  # a package that holds ``name`` is already being imported when ``name`` runs
            for target in list(edges):
                parts = target.split(".")
                edges.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                             if p != name and not name.startswith(p + "."))
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _layer(module: str) -> int | None:
    """The layer of ``module``: the most specific name in LAYERS that covers it."""
    best, depth = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            full = "gpd_ds" if name == "gpd_ds" else f"gpd_ds.{name}"
            covers = module == full or (name != "gpd_ds" and module.startswith(full + "."))
            if covers and full.count(".") > depth:
                best, depth = i, full.count(".")
    return best


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph(implicit_packages=True)) == []


def test_every_module_has_a_layer() -> None:
    assert [m for m in _modules() if _layer(m) is None] == []


def test_imports_run_down_the_layers() -> None:
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) -> {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in sorted(_graph(implicit_packages=False).items()) for t in sorted(targets)
              if _layer(t) > _layer(m)]
    assert len(upward) <= MAX_UPWARD, "\n".join(upward)
