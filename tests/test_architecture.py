"""The layering a reader relies on: api → dataplane → scheduler (batching) → executor →
backends, checked on the imports in the source (not on what happens to be imported at run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> dict[str, set[str]]:
    """module file -> the first-party modules it imports (lazily imported ones included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def _layer(module: str) -> str | None:
    """tensorgate.server.batching.queue → "batching"; tensorgate.server.model → "model"; others
    → None."""
    parts = module.split(".")
    if parts[:2] != ["tensorgate", "server"] or len(parts) < 3:
        return None
    return parts[2]


def _module(path: str) -> str:
    """server/batching/queue.py → tensorgate.server.batching.queue (the name it is imported by)."""
    return "tensorgate." + path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def test_front_ends_reach_the_core_only_through_the_data_plane() -> None:
    for path, names in _imports("server/api").items():
        forbidden = {
            n for n in names if _layer(n) in {"model", "models", "jobs", "batching", "executor"}
        }
        assert not forbidden, f"{path} imports {sorted(forbidden)}"


@pytest.mark.parametrize("caller", ["dataplane", "jobs", "api", "app"])
def test_only_the_model_set_knows_how_a_model_is_scheduled(caller: str) -> None:
    """The data plane and the job service sit on the model set (models.py): neither imports the
    schedulers (batching), the executor or a served model (model.py)."""
    for path, names in _imports("server").items():
        if Path(path).parts[1].removesuffix(".py") != caller:
            continue
        wrong = {n for n in names if _layer(n) in {"batching", "executor", "model"}}
        assert not wrong, f"{path} imports {sorted(wrong)}"


def test_a_models_scheduler_is_reached_only_by_the_model_set() -> None:
    allowed = {"server/model.py", "server/models.py"}
    for path in sorted((ROOT / "server").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name in allowed or name.startswith("server/batching/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "scheduler":
                raise AssertionError(f"{name}:{node.lineno} reaches a model's scheduler")


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("executor", "batching"),
        ("backends", "executor"),
        ("backends", "batching"),
        ("batching", "jobs"),
        ("batching", "dataplane"),
        ("jobs", "dataplane"),
        ("model", "dataplane"),
        ("telemetry", "batching"),
    ],
)
def test_lower_layers_never_import_higher_ones(lower: str, upper: str) -> None:
    files = _imports("server")
    for path, names in files.items():
        if Path(path).parts[1].removesuffix(".py") != lower:
            continue
        wrong = {n for n in names if _layer(n) == upper}
        assert not wrong, f"{path} ({lower}) imports {sorted(wrong)} ({upper})"


def test_server_and_client_packages_do_not_import_each_other() -> None:
    for path, names in _imports("server").items():
        assert not {n for n in names if n.startswith("tensorgate.client")}, path
    for path, names in _imports("client").items():
        assert not {n for n in names if n.startswith("tensorgate.server")}, path


def test_everything_imports_the_one_package_name() -> None:
    """server/ and client/ are tensorgate.server and tensorgate.client: importing them by their
    folder names would load a second copy of every module."""
    for package in ("server", "client", "command", "tests", "bench"):
        for path, names in _imports(package).items():
            old = {n for n in names if n.split(".")[0] in {"server", "client", "tensorgate_cli"}}
            assert not old, f"{path} imports {sorted(old)}"


def test_futures_are_settled_only_through_the_settle_once_helpers() -> None:
    """A request's future may be cancelled by its caller at any moment; every place that settles
    one goes through server/futures.py, which checks done() first. (The executor's worker thread
    settles concurrent.futures of its own, which nothing else can touch.)"""
    allowed = {"server/futures.py", "server/executor/worker.py"}
    for path in sorted((ROOT / "server").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"set_result", "set_exception"}:
                raise AssertionError(f"{name}:{node.lineno} calls .{node.attr} directly")


def test_no_module_imports_itself_back_through_others() -> None:
    """No import cycles, lazy imports included (a lazy import that dodges a cycle hides it)."""
    files = {**_imports("server"), **_imports("client"), **_imports("command")}
    modules = {_module(path): names for path, names in files.items()}
    # `from package import submodule` inside the package names the package too: no edge back.
    graph = {
        module: {
            n for n in names if n in modules and n != module and not module.startswith(n + ".")
        }
        for module, names in modules.items()
    }
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
