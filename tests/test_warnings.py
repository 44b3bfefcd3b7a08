"""Our own code raises no FutureWarning / DeprecationWarning (pyproject filters only named third-party ones).

A deprecated call of ours (e.g. ``model(past_key_values=...)`` on transformers >= 5.24) warns from inside
the library it calls, so it is caught here as an error raised while our code runs, and by the file a
recorded warning is attributed to.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import flashback_agents
from flashback_agents import CachedContext, GenerationConfig, Message, generate
from flashback_agents.engines import local_engine
from flashback_agents.kvcache import cache_kwarg

PKG = str(Path(flashback_agents.__file__).parent)


def _cached_generation(lm) -> None:
    ctx = CachedContext(lm)
    ctx.sync(ctx.layout.render([Message("system", "You analyse logs."), Message("user", "Which component?")]))
    generate(ctx, GenerationConfig(max_new_tokens=4))
    ctx.append_evidence("10:15:09 ERROR network: connection reset", source="app.log")
    generate(ctx, GenerationConfig(max_new_tokens=3))
    ctx.rollback(2)
    local_engine(lm).chat([Message("user", "hi")], config=GenerationConfig(max_new_tokens=3))


def test_cached_generation_raises_no_deprecation_of_ours(tiny_lm):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        _cached_generation(tiny_lm)  # a deprecated call on our path raises here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cached_generation(tiny_lm)
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and str(w.filename).startswith(PKG)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def test_the_model_call_uses_the_cache_keyword_the_model_takes(tiny_lm):
    import inspect

    params = inspect.signature(tiny_lm.model.forward).parameters
    assert cache_kwarg(tiny_lm.model) == ("cache" if "cache" in params else "past_key_values")
