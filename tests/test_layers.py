"""The import direction of the layers (README.md#architecture), checked over every module's source.

    command line  ->  loadtest  ->  serving  ->  adapters.training  ->  adapters.tasks  ->  adapters core

Each layer imports only layers to its right. The command line (`serving.cli` and its
subcommands, `serving.commands`) is the entry point above them all: `capaserve loadtest`
dispatches to the loadtest package, which drives a server. The adapters core is every module of `adapters`
outside `adapters.tasks` and `adapters.training`: the bundle format (bundle, manifest, masks),
its checks (validation, errors), the merge math (merge, capaboost_linear), devices and the
shipped model (device, default_model, synthetic), the importers and the registry stores. No two
modules import each other, directly or around a loop, whether the import is at the top of a file
or deferred into a function. And the engine, the adapters core, the task layer and training
import with Ray, starlette and FastAPI absent, so training and offline tools never need Ray.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("loadtest", "serving", "adapters")
#: Layer rank by module prefix, the longest prefix that matches wins; higher ranks import lower ones only.
RANKS = {"serving.cli": 5, "serving.commands": 5, "loadtest": 4, "serving": 3, "adapters.training": 2, "adapters.tasks": 1, "adapters": 0}
LAYER_NAMES = {5: "command line", 4: "loadtest", 3: "serving", 2: "adapters.training", 1: "adapters.tasks", 0: "adapters core"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def rank(module: str) -> int | None:
    best = None
    for prefix, r in RANKS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, r)
    return None if best is None else best[1]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement of the file, wherever it stands."""
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for module, edges in graph.items():
        for target, line in edges:
            src, dst = rank(module), rank(target)
            if src is not None and dst is not None and dst > src:
                bad.append(f"{module}:{line} ({LAYER_NAMES[src]}) imports {target} ({LAYER_NAMES[dst]})")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_the_layers() -> None:
    """The scan reads real edges: serving imports the task layer, training imports it too."""
    graph = import_graph()
    assert any(t == "adapters.tasks.qa" for t, _ in graph["adapters.training.qa"])
    assert any(t == "adapters.tasks.tokens" for t, _ in graph["serving.engine.engine"])
    assert any(t.startswith("serving.") for t, _ in graph["loadtest.run"])
    assert rank("adapters.registry.store") == 0 and rank("adapters.tasks.qa") == 1 and rank("adapters") == 0
    assert rank("serving.commands.loadtest") == 5 and rank("serving.config") == 3


def test_every_import_points_down() -> None:
    assert upward_imports(import_graph()) == []


def test_no_module_imports_itself_around_a_loop() -> None:
    assert cycles(import_graph()) == []


def test_the_scan_fails_on_an_upward_or_circular_import() -> None:
    """The checks are not vacuous: a task module importing serving, and a two-module loop, are caught."""
    graph = import_graph()
    graph["adapters.tasks.qa"] = graph["adapters.tasks.qa"] + [("serving.config", 1)]
    assert upward_imports(graph) == ["adapters.tasks.qa:1 (adapters.tasks) imports serving.config (serving)"]
    graph["adapters.tasks.tokens"] = graph["adapters.tasks.tokens"] + [("adapters.tasks.qa", 1)]
    assert ["adapters.tasks.qa", "adapters.tasks.tokens"] in cycles(graph)


def test_relative_and_from_package_imports_resolve(tmp_path: Path) -> None:
    modules = {"serving": Path(), "serving.api": Path(), "serving.api.errors": Path(), "adapters.tasks.errors": Path()}
    src = tmp_path / "x.py"
    src.write_text("from . import errors\nfrom ..api import errors as e2\nfrom adapters.tasks.errors import Overloaded\n")
    assert imports_of("serving.api.auth", src, modules) == [
        ("serving.api.errors", 1), ("serving.api.errors", 2), ("adapters.tasks.errors", 3)
    ]


BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"ray", "starlette", "fastapi"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocked())
    for name in list(sys.modules):
        if name.split(".")[0] in {"ray", "starlette", "fastapi"}:
            del sys.modules[name]
    try:
        import ray
    except ImportError:
        pass
    else:
        raise SystemExit("the block does not work")
    done = []
    for pkg in ("serving.engine", "adapters"):
        package = importlib.import_module(pkg)
        done.append(pkg)
        for info in pkgutil.walk_packages(package.__path__, pkg + "."):
            importlib.import_module(info.name)
            done.append(info.name)
    print(len(done), " ".join(done))
    """
)


def test_engine_and_adapters_import_without_ray() -> None:
    """Every module of serving.engine and of adapters (core, tasks, training) imports with Ray,
    starlette and FastAPI unimportable."""
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout.split()
    for expected in ("serving.engine.engine", "adapters.tasks.errors", "adapters.training.trainer", "adapters.registry.store"):
        assert expected in names


def test_serving_needs_ray_where_it_serves() -> None:
    """The blocked-import test can fail: the HTTP error mapping does import Ray and FastAPI."""
    script = BLOCKED_IMPORT.replace('("serving.engine", "adapters")', '("serving.api",)')
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is blocked in this test" in proc.stderr
