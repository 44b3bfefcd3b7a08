"""The package's import structure: no circle among its modules, and every module imports on its own.

The graph is built with ``ast`` from module-level import statements (function bodies and
``if TYPE_CHECKING:`` blocks are lazy and left out); a circle there is a failure, whatever the order
Python happens to import things in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import flashback_agents

PKG = Path(flashback_agents.__file__).parent
NAME = "flashback_agents"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _module_level(body: list[ast.stmt]):
    """Import statements executed when the module is imported (not those in functions or TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level(node.body)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target.startswith(NAME) and target != mod:
                    graph[mod].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _dependency_order(graph: dict[str, set[str]]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(node: str) -> None:
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        order.append(node)

    for node in sorted(graph):
        visit(node)
    return order


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "flashback_agents.backends.base" in graph["flashback_agents.chat"]
    assert "flashback_agents.chat" in graph["flashback_agents.engines"]
    assert "flashback_agents.kvcache" in graph["flashback_agents.context"]  # `from . import kvcache`


def test_no_import_cycle_among_package_modules():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_chat_imports_no_backend_implementation():
    deps = import_graph()["flashback_agents.chat"]
    assert not {d for d in deps if d.startswith("flashback_agents.backends.") and not d.endswith(".base")}


def test_every_module_imports_in_a_fresh_interpreter():
    """One fresh interpreter imports every module in dependency order (leaves first) and reports each."""
    order = [m for m in _dependency_order(import_graph()) if not m.endswith(".__main__")]  # those run
    script = f"""
import importlib, json, sys, traceback
out = {{}}
for name in {order!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("flashback_agents"):
            out[name] = "optional:" + exc.name  # a third-party extra that is not installed
        else:
            out[name] = traceback.format_exc()
    except Exception:
        out[name] = traceback.format_exc()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    failures = {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()
                if not v.startswith("optional:")}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
