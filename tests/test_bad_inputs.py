"""Bad inputs to the library and the integrations (reliability issue, items 8 and 11): each is one of our
errors (a :class:`~flashback_agents.FlashBackError`) whose message says what to do, raised before anything
changed, so a following normal call on the same tiny engine still works.

One parametrized case per bad input (the ids name them): ``pytest -q tests/test_bad_inputs.py`` counts
them. The command line has its own sweep (tests/test_cli_sweep.py).
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from flashback_agents import CachedContext, FlashBackError, GenerationConfig, generate
from flashback_agents.chat import ChatEngine
from flashback_agents.engines import local_engine, model_share, shared_engine
from flashback_agents.layout import Message


class Env:
    """The tiny model, one engine and one context the cases share, and a scratch directory."""

    def __init__(self, lm: Any, tiny_dir: Path, tmp: Path):
        self.lm, self.tiny_dir, self.tmp = lm, tiny_dir, tmp
        self.engine = local_engine(lm, acquire_timeout=None)
        self.ctx = CachedContext(lm)
        self.ctx.append(lm.encode("hello world, a short context to fork and save"))
        self.n = 0

    def path(self, name: str) -> Path:
        self.n += 1
        return self.tmp / f"{self.n}-{name}"

    def model_dir(self, name: str, change: Callable[[Path], None]) -> str:
        """A copy of the tiny model directory with one thing broken."""
        d = self.path(name)
        d.mkdir()
        for p in self.tiny_dir.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        change(d)
        return str(d)

    def gguf(self, data: bytes) -> str:
        p = self.path("model.gguf")
        p.write_bytes(data)
        return str(p)

    def budget(self) -> int:
        return model_share(self.lm).budget.max_bytes

    # the integrations, routed to the already loaded tiny model
    def lc(self, **kw: Any) -> Any:
        from langchain_flashback import ChatFlashBack

        return ChatFlashBack(model=str(self.tiny_dir), **{"max_tokens": 2, **kw})

    def lc_llm(self, **kw: Any) -> Any:
        from langchain_flashback import FlashBackLLM

        return FlashBackLLM(model=str(self.tiny_dir), **{"max_tokens": 2, **kw})

    def li(self, **kw: Any) -> Any:
        from llama_index.llms.flashback import FlashBack

        return FlashBack(model=self.lm, **{"max_tokens": 2, **kw})


def _truncate(name: str) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        p = d / name
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    return change


def _remove(*prefixes: str) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        for p in list(d.iterdir()):
            if p.name.startswith(prefixes):
                p.unlink()
    return change


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _load(e: Env, spec: str, **kw: Any) -> Any:
    from flashback_agents import load_model

    return load_model(spec, **{"device": "cpu", "adapter": None, **kw})


def _human_with_docs(docs: Any) -> list:
    from langchain_core.messages import HumanMessage

    return [HumanMessage("What does it say?", additional_kwargs={"documents": docs})]


def _li_user_with_docs(docs: Any) -> list:
    from llama_index.core.llms import ChatMessage

    return [ChatMessage(role="user", content="What does it say?", additional_kwargs={"documents": docs})]


async def _drain_async(gen: Any) -> None:
    async for _ in await gen:
        pass


def _fake_io_error(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """safetensors reports an I/O error as its own SafetensorError (as it does for EFBIG / ENOSPC)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError(f"Error while serializing: I/O error: {text}")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _save_past_file_size_limit(e: Env) -> None:
    """A real EFBIG: the process's file size limit (RLIMIT_FSIZE) below the file ``save`` writes."""
    import resource

    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no RLIMIT_FSIZE / SIGXFSZ on this platform")
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        e.ctx.save(e.path("big.safetensors"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _save_in_proc(e: Env) -> None:
    """A directory nothing can be created in (not even by root): /proc."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    e.ctx.save("/proc/flashback-no-such-dir/ctx.safetensors")


def _chdir_and(e: Env, fn: Callable[[], Any]) -> Any:
    old = os.getcwd()
    os.chdir(e.tmp)
    try:
        return fn()
    finally:
        os.chdir(old)


#: case id -> (the bad call, a fragment of the message that says what to do)
CASES: dict[str, tuple[Callable[..., Any], str]] = {
    # ChatEngine settings (item 8): checked before the model-wide byte budget changes
    "engine-max-cached-bytes-negative": (lambda e: local_engine(e.lm, max_cached_bytes=-1), "pass e.g. max_cached_bytes"),
    "engine-max-cached-bytes-string": (lambda e: local_engine(e.lm, max_cached_bytes="2GB"), "pass e.g. max_cached_bytes"),
    "engine-max-cached-bytes-float": (lambda e: local_engine(e.lm, max_cached_bytes=2.5e9), "pass e.g. max_cached_bytes"),
    "engine-max-cached-bytes-bool": (lambda e: local_engine(e.lm, max_cached_bytes=True), "pass e.g. max_cached_bytes"),
    "engine-shared-max-cached-bytes-negative": (lambda e: shared_engine(e.lm, adapter=None, max_cached_bytes=-5),
                                                "pass e.g. max_cached_bytes"),
    "engine-max-context-tokens-zero": (lambda e: local_engine(e.lm, max_context_tokens=0), "pass e.g. max_context_tokens"),
    "engine-max-context-tokens-negative": (lambda e: local_engine(e.lm, max_context_tokens=-512),
                                           "pass e.g. max_context_tokens"),
    "engine-max-context-tokens-string": (lambda e: local_engine(e.lm, max_context_tokens="4096"),
                                         "pass e.g. max_context_tokens"),
    "engine-max-context-tokens-float": (lambda e: local_engine(e.lm, max_context_tokens=100.5),
                                        "pass e.g. max_context_tokens"),
    "engine-acquire-timeout-negative": (lambda e: local_engine(e.lm, acquire_timeout=-1), "pass e.g. acquire_timeout"),
    "engine-acquire-timeout-nan": (lambda e: local_engine(e.lm, acquire_timeout=math.nan), "pass e.g. acquire_timeout"),
    "engine-acquire-timeout-string": (lambda e: local_engine(e.lm, acquire_timeout="soon"), "pass e.g. acquire_timeout"),
    "pool-max-bytes-negative": (lambda e: __import__("flashback_agents.pool", fromlist=["x"]).ContextPool(
        e.lm, max_bytes=-1), "pass e.g. max_bytes"),
    # the disk KV store (item 8): DiskKVStore(None) created ./None
    "kvstore-dir-none": (lambda e: _chdir_and(e, lambda: __import__("flashback_agents.kvstore", fromlist=["x"])
                                              .DiskKVStore(None)), "pass e.g. DiskKVStore("),
    "kvstore-dir-int": (lambda e: _chdir_and(e, lambda: __import__("flashback_agents.kvstore", fromlist=["x"])
                                             .DiskKVStore(5)), "pass e.g. DiskKVStore("),
    "kvstore-dir-blank": (lambda e: _chdir_and(e, lambda: __import__("flashback_agents.kvstore", fromlist=["x"])
                                               .DiskKVStore("  ")), "pass e.g. DiskKVStore("),
    "kvstore-dir-bytes": (lambda e: _chdir_and(e, lambda: __import__("flashback_agents.kvstore", fromlist=["x"])
                                               .DiskKVStore(b"store")), "pass e.g. DiskKVStore("),
    # fork_prefix (item 8): -1 returned all but one token
    "fork-prefix-minus-one": (lambda e: e.ctx.fork_prefix(-1), "count from the start"),
    "fork-prefix-very-negative": (lambda e: e.ctx.fork_prefix(-300), "count from the start"),
    "fork-prefix-string": (lambda e: e.ctx.fork_prefix("3"), "pass e.g. fork_prefix("),
    "fork-prefix-float": (lambda e: e.ctx.fork_prefix(2.0), "pass e.g. fork_prefix("),
    "fork-prefix-none": (lambda e: e.ctx.fork_prefix(None), "pass e.g. fork_prefix("),
    "fork-prefix-bool": (lambda e: e.ctx.fork_prefix(True), "pass e.g. fork_prefix("),
    # documents where they enter (item 8): documents='abc' became three documents
    "langchain-documents-string": (lambda e: e.lc().invoke(_human_with_docs("abc")), "pass a list"),
    "langchain-documents-int": (lambda e: e.lc().invoke(_human_with_docs(5)), "pass a list"),
    "langchain-documents-dict": (lambda e: e.lc().invoke(_human_with_docs({"page_content": "abc"})), "pass a list"),
    "langchain-documents-bytes": (lambda e: e.lc().invoke(_human_with_docs(b"abc")), "pass a list"),
    "langchain-document-not-text": (lambda e: e.lc().invoke(_human_with_docs([object()])), "pass strings"),
    "llamaindex-documents-int": (lambda e: e.li().chat(_li_user_with_docs(7)), "pass e.g. [text]"),
    "llamaindex-documents-dict": (lambda e: e.li().chat(_li_user_with_docs({"a": "b"})), "pass e.g. [text]"),
    # LlamaIndex complete() and friends (item 8): None and 5 were rendered as text
    "llamaindex-complete-none": (lambda e: e.li().complete(None), "pass the text to complete"),
    "llamaindex-complete-int": (lambda e: e.li().complete(5), "pass the text to complete"),
    "llamaindex-complete-list": (lambda e: e.li().complete(["hi"]), "pass the text to complete"),
    "llamaindex-complete-bytes": (lambda e: e.li().complete(b"hi"), "pass the text to complete"),
    "llamaindex-complete-formatted-none": (lambda e: e.li().complete(None, formatted=True), "pass the text to complete"),
    "llamaindex-stream-complete-none": (lambda e: e.li().stream_complete(None), "pass the text to complete"),
    "llamaindex-acomplete-none": (lambda e: asyncio.run(e.li().acomplete(None)), "pass the text to complete"),
    "llamaindex-astream-complete-int": (lambda e: asyncio.run(_drain_async(e.li().astream_complete(3))),
                                        "pass the text to complete"),
    # LlamaIndex fields (items 8, 11): a bare pydantic ValidationError before
    "llamaindex-max-tokens-string": (lambda e: e.li(max_tokens="ten"), "pass e.g. max_tokens="),
    "llamaindex-max-tokens-bool": (lambda e: e.li(max_tokens=True), "pass e.g. max_tokens="),
    "llamaindex-temperature-string": (lambda e: e.li(temperature="hot"), "pass e.g. temperature="),
    "llamaindex-temperature-list": (lambda e: e.li(temperature=[0.5]), "pass e.g. temperature="),
    "llamaindex-top-p-string": (lambda e: e.li(top_p="most"), "pass e.g. top_p="),
    "llamaindex-min-tokens-string": (lambda e: e.li(min_tokens="x"), "pass e.g. min_tokens="),
    "llamaindex-seed-string": (lambda e: e.li(seed="lucky"), "pass e.g. seed="),
    "llamaindex-timeout-string": (lambda e: e.li(timeout="soon"), "pass e.g. timeout="),
    "llamaindex-draft-tokens-string": (lambda e: e.li(draft_tokens="many"), "pass e.g. draft_tokens="),
    "llamaindex-max-context-tokens-string": (lambda e: e.li(max_context_tokens="big"), "pass e.g. max_context_tokens="),
    "llamaindex-max-cached-bytes-negative": (lambda e: e.li(max_cached_bytes=-1), "pass e.g. max_cached_bytes"),
    # LangChain fields (item 11)
    "langchain-temperature-string": (lambda e: e.lc(temperature="hot"), "pass e.g. temperature="),
    "langchain-temperature-none": (lambda e: e.lc(temperature=None), "pass e.g. temperature="),
    "langchain-top-p-string": (lambda e: e.lc(top_p="x"), "pass e.g. top_p="),
    "langchain-min-tokens-string": (lambda e: e.lc(min_tokens="x"), "pass e.g. min_tokens="),
    "langchain-min-tokens-bool": (lambda e: e.lc(min_tokens=False), "pass e.g. min_tokens="),
    "langchain-max-tokens-string": (lambda e: e.lc(max_tokens="ten"), "pass e.g. max_tokens="),
    "langchain-seed-string": (lambda e: e.lc(seed="s"), "pass e.g. seed="),
    "langchain-timeout-string": (lambda e: e.lc(timeout="soon"), "pass e.g. timeout="),
    "langchain-draft-tokens-string": (lambda e: e.lc(draft_tokens="x"), "pass e.g. draft_tokens="),
    "langchain-max-cached-bytes-string": (lambda e: e.lc(max_cached_bytes="2GB"), "pass e.g. max_cached_bytes="),
    "langchain-llm-temperature-string": (lambda e: e.lc_llm(temperature="hot"), "pass e.g. temperature="),
    "langchain-max-cached-bytes-negative": (lambda e: e.lc(max_cached_bytes=-1).invoke("hi"),
                                            "pass e.g. max_cached_bytes"),
    "langchain-max-context-tokens-zero": (lambda e: e.lc(max_context_tokens=0).invoke("hi"),
                                          "pass e.g. max_context_tokens"),
    # the same settings per call (item 11): a bare ValueError from int()/float() before
    "langchain-call-temperature-string": (lambda e: e.lc().invoke("hi", temperature="hot"), "pass e.g. temperature="),
    "langchain-call-max-tokens-string": (lambda e: e.lc().invoke("hi", max_tokens="ten"), "pass e.g. max_tokens="),
    "langchain-call-top-p-string": (lambda e: e.lc().invoke("hi", top_p="x"), "pass e.g. top_p="),
    "langchain-call-min-tokens-string": (lambda e: e.lc().invoke("hi", min_tokens="a"), "pass e.g. min_tokens="),
    "langchain-call-stop-int": (lambda e: e.lc().invoke("hi", stop=5), "stop"),
    "llamaindex-call-temperature-string": (lambda e: e.li().complete("hi", temperature="hot"), "pass e.g. temperature="),
    "llamaindex-call-max-tokens-string": (lambda e: e.li().chat(_li_user_with_docs([]), max_tokens="ten"),
                                          "pass e.g. max_tokens="),
    "llamaindex-call-top-p-string": (lambda e: e.li().complete("hi", top_p="x"), "pass e.g. top_p="),
    "llamaindex-call-min-tokens-string": (lambda e: e.li().complete("hi", min_tokens="a"), "pass e.g. min_tokens="),
    # seeds torch cannot take (item 11): a raw ValueError from the generator
    "gen-seed-2-pow-70": (lambda e: generate(e.ctx.fork_prefix(len(e.ctx)), GenerationConfig(
        max_new_tokens=2, temperature=1.0, seed=2**70)), "pass a smaller seed"),
    "gen-seed-2-pow-64": (lambda e: GenerationConfig(seed=2**64).validate(), "pass a smaller seed"),
    "gen-seed-below-int64": (lambda e: GenerationConfig(seed=-(2**63) - 1).validate(), "pass a smaller seed"),
    "chat-seed-2-pow-70": (lambda e: e.engine.chat([Message("user", "hi")], config=GenerationConfig(
        max_new_tokens=2, temperature=0.7, seed=2**70)), "pass a smaller seed"),
    "langchain-seed-2-pow-70": (lambda e: e.lc(seed=2**70, temperature=0.7).invoke("hi"), "pass a smaller seed"),
    "llamaindex-seed-2-pow-70": (lambda e: e.li(seed=2**70, temperature=0.7).complete("hi"), "pass a smaller seed"),
    # load_model (item 11)
    "load-device-int": (lambda e: _load(e, str(e.tiny_dir), device=5), "pass device="),
    "load-device-tpu": (lambda e: _load(e, str(e.tiny_dir), device="tpu"), "pass device="),
    "load-device-empty": (lambda e: _load(e, str(e.tiny_dir), device=""), "pass device="),
    "load-device-list": (lambda e: _load(e, str(e.tiny_dir), device=["cpu"]), "pass device="),
    "load-device-cuda-99": (lambda e: _load(e, str(e.tiny_dir), device="cuda:99"), "pass device="),
    "load-truncated-weights": (lambda e: _load(e, e.model_dir("trunc", _truncate("model.safetensors"))),
                               "copy or download them again"),
    "load-garbage-weights": (lambda e: _load(e, e.model_dir("garbage", _write("model.safetensors", os.urandom(4096)))),
                             "copy or download them again"),
    "load-empty-weights": (lambda e: _load(e, e.model_dir("empty", _write("model.safetensors", b""))),
                           "copy or download them again"),
    "load-no-tokenizer": (lambda e: _load(e, e.model_dir("notok", _remove("tokenizer", "special_tokens",
                                                                          "chat_template"))),
                          "copy the tokenizer files"),
    "load-garbage-tokenizer-json": (lambda e: _load(e, e.model_dir("badtok", _write("tokenizer.json", b"{oops"))),
                                    "copy the tokenizer files"),
    "load-empty-gguf": (lambda e: _load(e, e.gguf(b"")), "re-download or re-export it"),
    "load-garbage-gguf": (lambda e: _load(e, e.gguf(os.urandom(1024))), "re-download or re-export it"),
    "load-gguf-short-header": (lambda e: _load(e, e.gguf(b"GGUF\x03\x00")), "re-download or re-export it"),
    "load-gguf-damaged-header": (lambda e: _load(e, e.gguf(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 16
                                                          + os.urandom(64))), "re-download or re-export it"),
    "load-gguf-bad-version": (lambda e: _load(e, e.gguf(b"GGUF" + (99).to_bytes(4, "little") + bytes(16))),
                              "re-download or re-export it"),
    "load-gguf-valid-header-garbage-body": (lambda e: _load(e, e.gguf(b"GGUF" + (3).to_bytes(4, "little")
                                                                     + (1).to_bytes(8, "little") * 2
                                                                     + os.urandom(256))),
                                            "re-download it"),
    # CachedContext.save (item 11): a directory, a path under a file, no room
    "save-to-directory": (lambda e: e.ctx.save(e.tmp), "save takes a file path"),
    "save-to-none": (lambda e: e.ctx.save(None), "pass e.g. ctx.save("),
    "save-to-int": (lambda e: e.ctx.save(3), "pass e.g. ctx.save("),
    "save-to-empty-string": (lambda e: e.ctx.save(""), "pass e.g. ctx.save("),
    "save-under-a-file": (lambda e: e.ctx.save(e.tmp / "plain-file" / "ctx.safetensors"), "pass a path in a directory"),
    "save-where-nothing-can-be-created": (lambda e: _save_in_proc(e), "writable file system"),
    "save-file-too-large-efbig": (_save_past_file_size_limit, "room for it"),
    "save-efbig-from-safetensors": (lambda e, mp: (_fake_io_error(mp, "File too large (os error 27)"),
                                                   e.ctx.save(e.path("x.safetensors"))), "room for it"),
    "save-enospc-from-safetensors": (lambda e, mp: (_fake_io_error(mp, "No space left on device (os error 28)"),
                                                    e.ctx.save(e.path("x.safetensors"))), "room for it"),
}

#: cases whose error must also be an OSError (with the errno of the failure), as callers may catch that
OS_ERRORS = {"save-where-nothing-can-be-created": None, "save-file-too-large-efbig": errno.EFBIG,
             "save-efbig-from-safetensors": errno.EFBIG, "save-enospc-from-safetensors": errno.ENOSPC}


@pytest.fixture(scope="module")
def env(tiny_lm, tiny_model_dir, tmp_path_factory):
    e = Env(tiny_lm, Path(tiny_model_dir), tmp_path_factory.mktemp("bad-inputs"))
    (e.tmp / "plain-file").write_text("not a directory")
    # the LangChain classes take a model spec: route it to the already loaded tiny model
    pytest.importorskip("langchain_flashback")
    from langchain_flashback import _params

    original = _params.FlashBackParams._engine_for_model

    def engine_for(self: Any, model: str) -> ChatEngine:
        return shared_engine(tiny_lm, adapter=None, max_cached_bytes=self.max_cached_bytes,
                                 max_context_tokens=self.max_context_tokens, on_overflow=self.on_overflow)

    _params.FlashBackParams._engine_for_model = engine_for
    try:
        yield e
    finally:
        _params.FlashBackParams._engine_for_model = original


def _still_works(e: Env) -> None:
    """A normal call on the same engine and context after the bad one."""
    reply = e.engine.chat([Message("user", "hello")], config=GenerationConfig(max_new_tokens=2))
    assert reply.usage.output_tokens >= 1
    n = len(e.ctx)
    fork = e.ctx.fork_prefix(n)
    assert fork.token_ids == e.ctx.token_ids and len(generate(fork, GenerationConfig(max_new_tokens=1)).token_ids) == 1
    assert len(e.ctx) == n


@pytest.fixture(autouse=True)
def _scratch_cache(tmp_path, monkeypatch):
    """A GGUF conversion (none should get far) writes to a scratch cache, not the user's."""
    monkeypatch.setenv("FLASHBACK_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_our_error_saying_what_to_do(env, case):
    fn, advice = CASES[case]
    budget = env.budget()
    with pytest.MonkeyPatch.context() as mp:
        args = (env, mp) if fn.__code__.co_argcount == 2 else (env,)
        with pytest.raises(Exception) as info:
            fn(*args)
    exc = info.value
    assert isinstance(exc, FlashBackError), f"{case}: {type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert advice in str(exc), f"{case}: the message does not say what to do ({advice!r}): {exc}"
    if case in OS_ERRORS:
        assert isinstance(exc, OSError) and (OS_ERRORS[case] is None or exc.errno == OS_ERRORS[case]), (case, exc)
        assert "Errno" not in str(exc)  # our message, not OSError's "[Errno N] ..." form
    assert env.budget() == budget, f"{case}: the model-wide byte budget changed"
    _still_works(env)


def test_a_negative_budget_on_a_second_engine_leaves_the_first_engines_reuse(env):
    """The issue's scenario: the refused second engine must not shrink what the first one keeps cached."""
    engine = local_engine(env.lm, acquire_timeout=None)
    msgs = [Message("system", "You answer briefly. " * 8), Message("user", "a question that is long enough " * 4)]
    first = engine.chat(msgs, config=GenerationConfig(max_new_tokens=2))
    with pytest.raises(FlashBackError, match="max_cached_bytes"):
        local_engine(env.lm, max_cached_bytes=-1)
    again = engine.chat(msgs + [Message("assistant", first.text), Message("user", "and?")],
                        config=GenerationConfig(max_new_tokens=2))
    assert again.usage.cache_read >= first.usage.input_tokens - 1  # the whole first turn reused


def test_disk_store_none_creates_no_directory(env):
    from flashback_agents.kvstore import DiskKVStore

    with pytest.raises(FlashBackError):
        _chdir_and(env, lambda: DiskKVStore(None))
    assert not (env.tmp / "None").exists()


def test_a_failed_store_write_is_skipped_not_raised(env, tmp_path):
    """The disk tier still treats an I/O error reported by safetensors (EFBIG) as a skipped write."""
    from flashback_agents.kvstore import DiskKVStore, KVStoreWarning

    store = DiskKVStore(tmp_path / "kv", min_tokens=1, min_gain=0)
    ctx = CachedContext(env.lm)
    ctx.append(env.lm.encode("a context long enough to be stored " * 8))
    with pytest.MonkeyPatch.context() as mp:
        _fake_io_error(mp, "File too large (os error 27)")
        with pytest.warns(KVStoreWarning, match="File too large"):
            assert store.put(ctx) is None
    assert store.put(ctx) is not None  # and writes once the file system takes it


def test_settings_that_were_valid_still_are(env):
    """Numeric strings still convert as pydantic converted them; the engine defaults are unchanged."""
    assert env.lc(temperature="0.5", max_tokens="12").temperature == 0.5
    assert env.li(max_tokens="12", top_p="0.9").max_tokens == 12
    assert local_engine(env.lm, max_cached_bytes=0, max_context_tokens=64, acquire_timeout=math.inf).max_context_tokens == 64
    assert env.ctx.fork_prefix(10**6).token_ids == env.ctx.token_ids  # past the end: the whole context
    GenerationConfig(seed=-1).validate()
    GenerationConfig(seed=2**64 - 1).validate()


def test_bad_input_table_size():
    groups = {c.split("-")[0] for c in CASES}
    print(f"\nbad inputs tried: {len(CASES)} over {sorted(groups)}")
    assert len(CASES) >= 60
