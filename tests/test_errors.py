"""One error root: every error the library raises on purpose is a :class:`FlashBackError`, and keeps
the built-in base it had (``except ValueError`` still catches a ``ContextError``)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import flashback_agents
from flashback_agents import FlashBackError
from flashback_agents.errors import FlashBackError as RootError

#: public exception classes that must NOT join the root (none today)
NOT_OURS: set[str] = set()

#: defined in files other sessions are editing right now; each joins the root in its owner's change.
#: An entry that has joined the root fails test_pending_list_is_current: then remove it here.
PENDING: set[str] = set()


def _modules():
    for info in pkgutil.walk_packages(flashback_agents.__path__, "flashback_agents."):
        if info.name.endswith(".__main__"):  # importing it runs the command line
            continue
        try:
            yield importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("flashback_agents"):
                raise
            continue  # an optional third-party extra that is not installed


def public_errors() -> dict[str, type]:
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, Warning)
                    and obj.__module__ == mod.__name__ and not name.startswith("_")):
                found[f"{mod.__name__}.{name}"] = obj
    return found


def test_every_public_error_of_the_package_is_a_flashback_error():
    errors = public_errors()
    assert len(errors) >= 15, sorted(errors)
    outside = sorted(q for q, cls in errors.items() if not issubclass(cls, FlashBackError)
                     and q not in NOT_OURS | PENDING)
    assert not outside, f"errors not under FlashBackError (add it as a second base): {outside}"


def test_pending_list_is_current():
    errors = public_errors()
    stale = sorted(q for q in PENDING if q not in errors or issubclass(errors[q], FlashBackError))
    assert not stale, f"remove from PENDING (gone, or a FlashBackError now): {stale}"


#: the integration packages (under integrations/): their errors join the root too
INTEGRATIONS = ("langchain_flashback", "llama_index.llms.flashback")


def _integration_modules():
    for name in INTEGRATIONS:
        try:
            pkg = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(("flashback_agents", *INTEGRATIONS)):
                raise
            continue  # its framework (an optional extra) is not installed
        yield pkg
        for info in pkgutil.walk_packages(pkg.__path__, name + "."):
            yield importlib.import_module(info.name)


def test_every_error_class_defined_anywhere_is_a_flashback_error():
    """Private error classes too (``_ContextFileNotFound``, ``_WriteError``, ...) and the integrations'
    (``_PromptTypeError``, ...): whatever the package or an integration defines and raises is one."""
    found = {}
    for mod in [*_modules(), *_integration_modules()]:
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and not issubclass(obj, Warning)
                    and obj.__module__ == mod.__name__):
                found[f"{mod.__name__}.{name}"] = obj
    assert len(found) >= 25, sorted(found)
    assert any(q.startswith(INTEGRATIONS) for q in found), sorted(found)
    outside = sorted(q for q, cls in found.items() if not issubclass(cls, FlashBackError) and q not in NOT_OURS)
    assert not outside, f"error classes not under FlashBackError (add it as a base): {outside}"


@pytest.mark.parametrize("qualname, builtin", [
    ("flashback_agents.context.ContextError", ValueError),
    ("flashback_agents.context.ContextLoadError", ValueError),
    ("flashback_agents.context.ContextOverflowError", RuntimeError),
    ("flashback_agents.models.ModelLoadError", RuntimeError),
    ("flashback_agents.pool.PoolTimeoutError", TimeoutError),
    ("flashback_agents.generation.GenerationConfigError", ValueError),
    ("flashback_agents.kvstore.KVStoreError", ValueError),
    ("flashback_agents.retrieval.base.RetrievalError", ValueError),
    ("flashback_agents.export_gguf.GGUFExportError", RuntimeError),
    ("flashback_agents.backends.server.errors.ServerError", RuntimeError),
    ("flashback_agents.backends.server.errors.ServerContextError", RuntimeError),
])
def test_errors_keep_their_builtin_base(qualname, builtin):
    mod, _, name = qualname.rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    assert issubclass(cls, builtin) and issubclass(cls, FlashBackError)


def test_the_root_is_exported_and_is_the_bottom_layer():
    assert FlashBackError is RootError and "FlashBackError" in flashback_agents.__all__
    assert FlashBackError.__bases__ == (Exception,)
    tree = ast.parse(Path(inspect.getfile(RootError)).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in imports:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        assert not (isinstance(node, ast.ImportFrom) and node.level), "errors.py imports from the package"
        assert not any(n.startswith("flashback_agents") for n in names), "errors.py imports from the package"


def test_one_except_catches_what_the_library_raises(tiny_lm, tmp_path):
    from flashback_agents import CachedContext, ContextPool, load_model

    cases = [
        lambda: load_model(str(tmp_path / "missing"), device="cpu"),  # ModelLoadError
        lambda: CachedContext(tiny_lm).append([-1]),  # ContextError
        lambda: CachedContext.load(tiny_lm, tmp_path / "none.safetensors"),  # ContextLoadError
        lambda: ContextPool(tiny_lm, max_contexts=-1),  # ContextError
    ]
    for case in cases:
        with pytest.raises(FlashBackError):
            case()
