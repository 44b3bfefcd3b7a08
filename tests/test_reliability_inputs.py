"""Every bad input a careless or hostile user can give, through every public entry point and file
reader, is one of our error types with a message that says what to do (issue 16, "Must show").

The table is the test: one parametrized case per bad input (the ids name them), so
``pytest -q tests/test_reliability_inputs.py`` reports the count; ``test_bad_input_table_size``
prints it and keeps it at 100 or more.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from flashback_agents import CachedContext, FlashBackError, GenerationConfig, generate
from flashback_agents.engines import local_engine, shared_engine
from flashback_agents.layout import Message, ToolCall
from flashback_agents.pool import ContextPool
from flashback_agents.training.transcripts import parse_conversation, read_transcripts

#: what the library raises on purpose: every such error is a FlashBackError (tests/test_errors.py)
OUR_ERRORS = FlashBackError

#: a message "says what to do": it names an action or the accepted values
ADVICE = re.compile(r"\b(pass|use|re-?create|rebuild|remove|decode|convert|start|shorten|raise|set|check|create|"
                    r"index|delete|encode|re-encode|finish|bind|drop|roll back|append|expected|must|one of|"
                    r"train|save|restart|point|give|lower|need|needs|accepted|see|move|merge|build|fix)\b", re.I)

MARKER_ENV = "FLASHBACK_PWNED_MARKER"


class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


class Env:
    """What the cases need: the tiny model, an engine, a scratch dir and a valid saved context."""

    def __init__(self, lm: Any, tmp: Path):
        self.lm, self.tmp = lm, tmp
        self.engine = local_engine(lm, acquire_timeout=None)
        ctx = CachedContext(lm, max_context_tokens=300, on_overflow="evict")
        ctx.append(lm.encode("hello world, this is a saved context"))
        self.ctx_file = tmp / "good.pt"
        torch.save(_v2_payload(ctx), self.ctx_file)  # the older torch format (still loaded): its key table
        self.payload = torch.load(self.ctx_file, weights_only=True)
        self.v3_file = tmp / "good.safetensors"
        ctx.save(self.v3_file)  # what save writes now (kvstore format v3)
        self.n = 0

    def file(self, data: bytes | str, name: str = "f") -> Path:
        self.n += 1
        p = self.tmp / f"{self.n}-{name}"
        p.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        return p

    def saved(self, **changes: Any) -> Path:
        """The valid saved context with some keys changed (None deletes the key)."""
        payload = dict(self.payload)
        for k, v in changes.items():
            if v is _DELETE:
                payload.pop(k, None)
            else:
                payload[k] = v(payload) if callable(v) else v
        self.n += 1
        path = self.tmp / f"{self.n}-ctx.pt"
        torch.save(payload, path)
        return path

    def load(self, **changes: Any) -> Any:
        return CachedContext.load(self.lm, self.saved(**changes))

    def ctx(self, **kw: Any) -> CachedContext:
        return CachedContext(self.lm, **kw)

    def chat(self, msgs: Any, **kw: Any) -> Any:
        kw.setdefault("config", GenerationConfig(max_new_tokens=2))
        return self.engine.chat(msgs, **kw)

    def store(self, manifest: Any = None, chunks: bytes | None = None) -> Path:
        self.n += 1
        d = self.tmp / f"{self.n}-store"
        d.mkdir()
        m = {"format": "flashback-store-v1", "retriever": "bm25", "chunk_tokens": 64, "overlap": 8}
        text = manifest if isinstance(manifest, str) else json.dumps(m if manifest is None else manifest)
        (d / "store.json").write_text(text)
        if chunks is not None:
            (d / "bm25").mkdir()
            (d / "bm25" / "chunks.jsonl").write_bytes(chunks)
        return d


_DELETE = object()


def _v2_payload(ctx: CachedContext) -> dict:
    """A context as format v2 (torch zip) held it; ``CachedContext.save`` writes v3 since issue 19."""
    from flashback_agents import kvcache
    from flashback_agents.contextfile_legacy import _checksum

    kv = [(k.contiguous().clone(), v.contiguous().clone()) for k, v in kvcache.layer_tensors(ctx.cache)]
    payload = {"format": "flashback-context-v2", "fingerprint": ctx.lm.fingerprint, "model": ctx.lm.name,
               "token_ids": ctx.token_ids, "kv": kv, "max_context_tokens": ctx.max_context_tokens,
               "on_overflow": ctx.on_overflow, "low_water": float(ctx.low_water),
               "prefill_chunk": int(ctx.prefill_chunk), "evicted": None}
    payload["checksum"] = _checksum(payload)
    return payload
ok_msgs = [Message("user", "hi")]
TOOL = {"type": "function", "function": {"name": "grep", "description": "Search.",
                                         "parameters": {"type": "object", "properties": {"p": {"type": "string"}}}}}


def _kv(fn: Callable[[torch.Tensor], Any]) -> Callable[[dict], list]:
    return lambda p: [(fn(k), fn(v)) for k, v in p["kv"]]


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0xFF
    return bytes(b)


def _pwn_file(env: Env) -> Path:
    os.environ[MARKER_ENV] = str(env.tmp / "pwned")
    path = env.tmp / "pwn.pt"
    torch.save({"format": "flashback-context-v2", "x": _Pwn()}, path)
    return path


def _train_resume(env: Env, state: bytes | None = None, obj: Any = None) -> Any:
    from flashback_agents.training.checkpoint import load_checkpoint
    from flashback_agents.training.config import TrainConfig

    d = env.tmp / f"ckpt{env.n}"
    env.n += 1
    d.mkdir()
    if obj is not None:
        torch.save(obj, d / "trainer_state.pt")
    else:
        (d / "trainer_state.pt").write_bytes(state or b"")

    class Acc:
        process_index = 0
    return load_checkpoint(d, None, None, None, TrainConfig(), Acc(), {})


def _bad_pool_size(env: Env) -> Any:
    ContextPool(env.lm, max_contexts=-1)  # a busy pool no longer raises: it runs the call on a temporary context


CASES: dict[str, Callable[[Env], Any]] = {
    # ---- CachedContext: constructor and calls
    "ctx-on_overflow-unknown": lambda e: e.ctx(on_overflow="nope"),
    "ctx-low_water-zero": lambda e: e.ctx(low_water=0),
    "ctx-low_water-nan": lambda e: e.ctx(low_water=float("nan")),
    "ctx-prefill_chunk-zero": lambda e: e.ctx(prefill_chunk=0),
    "ctx-prefill_chunk-str": lambda e: e.ctx(prefill_chunk="8"),
    "ctx-budget-negative": lambda e: e.ctx(max_context_tokens=-5),
    "ctx-budget-str": lambda e: e.ctx(max_context_tokens="big"),
    "ctx-evict-budget-tiny": lambda e: e.ctx(max_context_tokens=8, on_overflow="evict"),
    "append-float-ids": lambda e: e.ctx().append([1.5]),
    "append-str-ids": lambda e: e.ctx().append(["a"]),
    "append-negative-id": lambda e: e.ctx().append([-1]),
    "append-huge-id": lambda e: e.ctx().append([10 ** 9]),
    "append-bool-id": lambda e: e.ctx().append([True]),
    "append-bytes": lambda e: e.ctx().append(b"bytes"),
    "append-lone-surrogate": lambda e: e.ctx().append("a\ud800b"),
    "append-none": lambda e: e.ctx().append(None),
    "append-int": lambda e: e.ctx().append(42),
    "append-overflow": lambda e: e.ctx(max_context_tokens=20).append(list(range(10, 40))),
    "evidence-none": lambda e: e.ctx().append_evidence(None),
    "evidence-source-int": lambda e: e.ctx().append_evidence("x", source=5),
    "evidence-surrogate": lambda e: e.ctx().append_evidence("\udfff"),
    "sync-str": lambda e: e.ctx().sync("text"),
    "sync-none-id": lambda e: e.ctx().sync([1, None]),
    "sync-overflow": lambda e: e.ctx(max_context_tokens=20).sync(list(range(10, 40))),
    "rollback-negative": lambda e: e.ctx().rollback(-1),
    "rollback-too-many": lambda e: e.ctx().rollback(10 ** 6),
    "rollback-float": lambda e: e.ctx().rollback(1.5),
    "logits-empty": lambda e: e.ctx().next_token_logits(),
    # ---- CachedContext.load: the file is not trusted
    "load-missing": lambda e: CachedContext.load(e.lm, e.tmp / "nothing.pt"),
    "load-random-bytes": lambda e: CachedContext.load(e.lm, e.file(os.urandom(256))),
    "load-empty-file": lambda e: CachedContext.load(e.lm, e.file(b"")),
    "load-json-file": lambda e: CachedContext.load(e.lm, e.file('{"format": "flashback-context-v2"}')),
    "load-code-pickle": lambda e: CachedContext.load(e.lm, _pwn_file(e)),
    "load-truncated-zip": lambda e: CachedContext.load(e.lm, e.file(e.ctx_file.read_bytes()[:300])),
    "load-truncated-v3": lambda e: CachedContext.load(e.lm, e.file(e.v3_file.read_bytes()[:-100])),
    "load-v3-flipped-byte": lambda e: CachedContext.load(e.lm, e.file(_flip(e.v3_file.read_bytes(), -50))),
    "load-v3-edited-ids": lambda e: CachedContext.load(e.lm, e.file(e.v3_file.read_bytes().replace(
        b'\\"token_ids\\": [', b'\\"token_ids\\": [1, ', 1))),
    "load-a-list": lambda e: (torch.save([1, 2], e.tmp / "l.pt"), CachedContext.load(e.lm, e.tmp / "l.pt")),
    "load-format-other": lambda e: e.load(format="something-else"),
    "load-no-fingerprint": lambda e: e.load(fingerprint=_DELETE),
    "load-no-token_ids": lambda e: e.load(token_ids=_DELETE),
    "load-no-kv": lambda e: e.load(kv=_DELETE),
    "load-no-on_overflow": lambda e: e.load(on_overflow=_DELETE),
    "load-other-model": lambda e: e.load(fingerprint="0" * 32),
    "load-fingerprint-int": lambda e: e.load(fingerprint=5),
    "load-ids-strings": lambda e: e.load(token_ids=lambda p: [str(t) for t in p["token_ids"]]),
    "load-ids-out-of-vocab": lambda e: e.load(token_ids=lambda p: [10 ** 6] * len(p["token_ids"])),
    "load-ids-negative": lambda e: e.load(token_ids=lambda p: [-1] * len(p["token_ids"])),
    "load-ids-tensor": lambda e: e.load(token_ids=lambda p: torch.tensor(p["token_ids"])),
    "load-layer-missing": lambda e: e.load(kv=lambda p: p["kv"][:-1]),
    "load-extra-layer": lambda e: e.load(kv=lambda p: p["kv"] + p["kv"][:1]),
    "load-head-size": lambda e: e.load(kv=_kv(lambda t: t[..., :-1])),
    "load-head-count": lambda e: e.load(kv=_kv(lambda t: t[:, :1])),
    "load-unequal-lengths": lambda e: e.load(kv=lambda p: [(p["kv"][0][0][..., :-1, :], p["kv"][0][1])] + p["kv"][1:]),
    "load-kv-int-dtype": lambda e: e.load(kv=_kv(lambda t: t.to(torch.int32))),
    "load-kv-nan": lambda e: e.load(kv=_kv(lambda t: t * float("nan"))),
    "load-kv-3d": lambda e: e.load(kv=_kv(lambda t: t[0])),
    "load-kv-not-pairs": lambda e: e.load(kv=lambda p: [k for k, _ in p["kv"]]),
    "load-kv-strings": lambda e: e.load(kv=lambda p: [("k", "v") for _ in p["kv"]]),
    "load-budget-below-held": lambda e: e.load(max_context_tokens=3),
    "load-budget-negative": lambda e: e.load(max_context_tokens=-1),
    "load-on_overflow-unknown": lambda e: e.load(on_overflow="explode"),
    "load-low_water-5": lambda e: e.load(low_water=5.0),
    "load-prefill_chunk-0": lambda e: e.load(prefill_chunk=0),
    "load-evicted-malformed": lambda e: e.load(evicted={"stubs": [1], "stub_keys": "x"}),
    "load-evicted-bad-ids": lambda e: e.load(evicted={"stubs": {"k": [10 ** 7]}, "stub_keys": ["k"]}),
    "load-evicted-with-error-mode": lambda e: e.load(on_overflow="error", evicted={"stubs": {}, "stub_keys": []}),
    # ---- decoding settings (GenerationConfig through generate and the engine)
    "gen-temperature-nan": lambda e: e.chat(ok_msgs, config=GenerationConfig(temperature=float("nan"))),
    "gen-temperature-negative": lambda e: e.chat(ok_msgs, config=GenerationConfig(temperature=-1)),
    "gen-temperature-inf": lambda e: e.chat(ok_msgs, config=GenerationConfig(temperature=float("inf"))),
    "gen-temperature-str": lambda e: e.chat(ok_msgs, config=GenerationConfig(temperature="hot")),
    "gen-top_p-zero": lambda e: e.chat(ok_msgs, config=GenerationConfig(top_p=0)),
    "gen-top_p-nan": lambda e: e.chat(ok_msgs, config=GenerationConfig(top_p=float("nan"))),
    "gen-top_k-negative": lambda e: e.chat(ok_msgs, config=GenerationConfig(top_k=-1)),
    "gen-top_k-float": lambda e: e.chat(ok_msgs, config=GenerationConfig(top_k=1.5)),
    "gen-max_new_tokens-negative": lambda e: e.chat(ok_msgs, config=GenerationConfig(max_new_tokens=-1)),
    "gen-max_new_tokens-float": lambda e: e.chat(ok_msgs, config=GenerationConfig(max_new_tokens=2.5)),
    "gen-min_new_tokens-negative": lambda e: e.chat(ok_msgs, config=GenerationConfig(min_new_tokens=-3)),
    "gen-seed-str": lambda e: e.chat(ok_msgs, config=GenerationConfig(seed="x")),
    "gen-stop-int-list": lambda e: e.chat(ok_msgs, config=GenerationConfig(stop=[1])),
    "gen-stop-int": lambda e: e.chat(ok_msgs, config=GenerationConfig(stop=5)),
    "gen-stop-bytes": lambda e: e.chat(ok_msgs, config=GenerationConfig(stop=b"x")),
    "generate-config-dict": lambda e: generate(e.ctx(), {"max_new_tokens": 2}),
    "generate-temperature-nan": lambda e: generate(_filled(e), GenerationConfig(temperature=float("nan"))),
    # ---- ChatEngine: messages
    "chat-messages-str": lambda e: e.chat("hi"),
    "chat-messages-empty": lambda e: e.chat([]),
    "chat-messages-tuples": lambda e: e.chat([("user", "x")]),
    "chat-role-unknown": lambda e: e.chat([Message("wizard", "x")]),
    "chat-role-none": lambda e: e.chat([Message(None, "x")]),
    "chat-content-none": lambda e: e.chat([Message("user", None)]),
    "chat-content-int": lambda e: e.chat([Message("user", 5)]),
    "chat-lone-surrogate": lambda e: e.chat([Message("user", "hi \ud83d there")]),
    "chat-surrogate-system": lambda e: e.chat([Message("system", "\udc80"), Message("user", "x")]),
    "chat-surrogate-tool": lambda e: e.chat([Message("user", "x"), Message("tool", "r\ud800", name="grep")]),
    "chat-surrogate-tool-name": lambda e: e.chat([Message("user", "x"), Message("tool", "r", name="g\ud800")]),
    "chat-system-not-first": lambda e: e.chat([Message("user", "x"), Message("system", "y")]),
    "chat-orphan-tool-result": lambda e: e.chat([Message("user", "x"), Message("tool", "r", tool_call_id="zz")]),
    "chat-tool-args-set": lambda e: e.chat([Message("user", "x"), Message("assistant", "", tool_calls=[
        ToolCall("grep", {"p": {1, 2}})])]),
    "chat-tool-args-not-dict": lambda e: e.chat([Message("user", "x"), Message("assistant", "", tool_calls=[
        ToolCall("grep", ["p"])])]),
    "chat-tool-args-nan": lambda e: e.chat([Message("user", "x"), Message("assistant", "", tool_calls=[
        ToolCall("grep", {"p": float("nan")})])]),
    "chat-tool-args-surrogate": lambda e: e.chat([Message("user", "x"), Message("assistant", "", tool_calls=[
        ToolCall("grep", {"p": "\ud800"})])]),
    "chat-tool-calls-not-list": lambda e: e.chat([Message("user", "x"), Message("assistant", "", tool_calls="grep")]),
    "chat-tool-call-dict": lambda e: e.chat([Message("user", "x"), Message("assistant", "", tool_calls=[
        {"name": "grep", "arguments": {}}])]),
    "chat-documents-not-list": lambda e: e.chat([Message("user", "x", documents="doc")]),
    "chat-documents-none-item": lambda e: e.chat([Message("user", "x", documents=[None])]),
    "chat-overflow-error-mode": lambda e: local_engine(e.lm, max_context_tokens=32, on_overflow="error").chat(
        [Message("user", "word " * 100)]),
    "chat-overflow-evict-no-blocks": lambda e: local_engine(e.lm, max_context_tokens=32).chat(
        [Message("user", "word " * 100)]),
    # ---- ChatEngine: tools, tool choice, schemas, settings
    "tools-bare-string": lambda e: e.chat(ok_msgs, tools="search"),
    "tools-list-of-strings": lambda e: e.chat(ok_msgs, tools=["search"]),
    "tools-function-object": lambda e: e.chat(ok_msgs, tools=[print]),
    "tools-no-name": lambda e: e.chat(ok_msgs, tools=[{"no": "name"}]),
    "tools-set-in-schema": lambda e: e.chat(ok_msgs, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "required": {"a"}}}}]),
    "tools-params-not-dict": lambda e: e.chat(ok_msgs, tools=[{"type": "function", "function": {
        "name": "f", "parameters": "x"}}]),
    "tools-surrogate-description": lambda e: e.chat(ok_msgs, tools=[{"type": "function", "function": {
        "name": "f", "description": "\ud800", "parameters": {}}}]),
    "tools-description-int": lambda e: e.chat(ok_msgs, tools=[{"name": "f", "description": 5}]),
    "tool_choice-unknown-name": lambda e: e.chat(ok_msgs, tools=[TOOL], tool_choice="nope"),
    "tool_choice-int": lambda e: e.chat(ok_msgs, tools=[TOOL], tool_choice=5),
    "tool_choice-without-tools": lambda e: e.chat(ok_msgs, tool_choice="any"),
    "tool_choice-dict-no-name": lambda e: e.chat(ok_msgs, tools=[TOOL], tool_choice={"function": {}}),
    "schema-str": lambda e: e.chat(ok_msgs, response_schema="json"),
    "schema-set": lambda e: e.chat(ok_msgs, response_schema={"type": "object", "required": {"a"}}),
    "schema-invalid": lambda e: e.chat(ok_msgs, response_schema={"type": "nope"}),
    "config-dict": lambda e: e.engine.chat(ok_msgs, config={"temperature": 0}),
    "timeout-negative": lambda e: e.chat(ok_msgs, timeout=-1),
    "timeout-str": lambda e: e.chat(ok_msgs, timeout="soon"),
    "timeout-nan": lambda e: e.chat(ok_msgs, timeout=float("nan")),
    "complete-prompt-int": lambda e: e.engine.complete(5),
    "complete-prompt-surrogate": lambda e: e.engine.complete("x\udcff"),
    "complete-temperature-nan": lambda e: e.engine.complete("x", GenerationConfig(temperature=float("nan"))),
    "stream_chat-surrogate": lambda e: e.engine.stream_chat([Message("user", "\ud800")]),
    "pool-max_contexts-negative": _bad_pool_size,
    "pool-max_contexts-str": lambda e: ContextPool(e.lm, max_contexts="16"),
    # ---- integrations
    "langchain-temperature-nan": lambda e: e.lc().invoke("hi", temperature=float("nan")),
    "langchain-surrogate": lambda e: e.lc().invoke("hi \ud800"),
    "langchain-tools-bare-string": lambda e: e.lc().invoke("hi", tools="search"),
    "langchain-tool-args-set": lambda e: e.lc().invoke([("user", "x"), _ai_call({"p": {1}})]),
    "langchain-timeout-negative": lambda e: e.lc().invoke("hi", timeout=-1),
    "langchain-llm-surrogate": lambda e: e.lc_llm().invoke("x\ud800"),
    "langchain-llm-top_p-zero": lambda e: e.lc_llm().invoke("x", top_p=0.0),
    "llamaindex-surrogate": lambda e: e.li().chat([_li_msg("\ud800")]),
    "llamaindex-temperature-nan": lambda e: e.li().chat([_li_msg("hi")], temperature=float("nan")),
    "llamaindex-tools-bad-dict": lambda e: e.li().chat([_li_msg("hi")], tool_choice=5),
    # ---- transcripts (the training data reader)
    "transcripts-missing": lambda e: read_transcripts(e.tmp / "none.jsonl"),
    "transcripts-bad-utf8": lambda e: read_transcripts(e.file(b'{"messages": [{"role": "user", "content": "x\xff"}]}\n',
                                                              "t.jsonl")),
    "transcripts-json-bad-utf8": lambda e: read_transcripts(e.file(b'[{"role": "user", "content": "\xfe"}]', "t.json")),
    "transcripts-deep-nesting": lambda e: read_transcripts(e.file("[" * 100000 + "]" * 100000 + "\n", "t.jsonl")),
    "transcripts-list-of-ints": lambda e: read_transcripts(e.file("[1, 2, 3]\n", "t.jsonl")),
    "transcripts-surrogate-escape": lambda e: read_transcripts(e.file(json.dumps({"messages": [
        {"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "y"}]}) + "\n", "t.jsonl")),
    "transcripts-random-bytes": lambda e: read_transcripts(e.file(os.urandom(300) + b"\n", "t.jsonl")),
    "transcripts-format-unknown": lambda e: read_transcripts(e.file("{}\n", "t.jsonl"), format="nope"),
    "transcripts-paths-int": lambda e: read_transcripts(5),
    "transcripts-json-string": lambda e: read_transcripts(e.file('"just a string"', "t.json")),
    "transcripts-json-invalid": lambda e: read_transcripts(e.file('{"messages": [', "t.json")),
    "parse-none": lambda e: parse_conversation(None),
    "parse-messages-str": lambda e: parse_conversation({"messages": "x"}),
    "parse-content-int-list": lambda e: parse_conversation({"messages": [{"role": "user", "content": [1]},
                                                                         {"role": "assistant", "content": "y"}]}),
    # ---- retrieval stores
    "store-missing": lambda e: _open_store(e.tmp / "no-store"),
    "store-no-manifest": lambda e: _open_store((e.tmp / "empty-dir").mkdir() or e.tmp / "empty-dir"),
    "store-manifest-list": lambda e: _open_store(e.store(manifest="[1, 2]")),
    "store-manifest-invalid-json": lambda e: _open_store(e.store(manifest="{nope")),
    "store-manifest-no-retriever": lambda e: _open_store(e.store(manifest={"format": "flashback-store-v1"})),
    "store-manifest-chunk_tokens-str": lambda e: _open_store(e.store(manifest={
        "format": "flashback-store-v1", "retriever": "bm25", "chunk_tokens": "x", "overlap": 0})),
    "store-manifest-unknown-retriever": lambda e: _open_store(e.store(manifest={
        "format": "flashback-store-v1", "retriever": "magic", "chunk_tokens": 8, "overlap": 0})),
    "store-manifest-other-format": lambda e: _open_store(e.store(manifest={"format": "v0"})),
    "bm25-chunks-random": lambda e: _open_store(e.store(chunks=os.urandom(200))),
    "bm25-chunks-list-line": lambda e: _open_store(e.store(chunks=b"[1, 2]\n")),
    "bm25-chunks-bad-utf8": lambda e: _open_store(e.store(chunks=b'{"id": "a", "text": "\xff"}\n')),
    "bm25-chunks-no-text": lambda e: _open_store(e.store(chunks=b'{"id": "a"}\n')),
    "bm25-query-int": lambda e: _bm25().retrieve(5),
    "bm25-k-negative": lambda e: _bm25().retrieve("x", k=-1),
    "chroma-path-is-a-file": lambda e: _chroma(e.file(b"x", "chroma")),
    "chroma-collection-short": lambda e: _chroma(e.tmp / "c", collection="x"),
    "index-nothing": lambda e: _index([], e.tmp / "s1"),
    "index-store-is-file": lambda e: _index([str(e.file("text"))], e.file(b"x", "store")),
    "index-missing-file": lambda e: _index([str(e.tmp / "nope.txt")], e.tmp / "s2"),
    # ---- training checkpoints (resume)
    "resume-code-pickle": lambda e: _train_resume(e, obj={"step": 1, "x": _Pwn()}) if _set_marker(e) else None,
    "resume-random-bytes": lambda e: _train_resume(e, state=os.urandom(300)),
    "resume-empty": lambda e: _train_resume(e, state=b""),
    "resume-missing-keys": lambda e: _train_resume(e, obj={"step": 1}),
    "resume-a-list": lambda e: _train_resume(e, obj=[1, 2]),
}


def _set_marker(e: Env) -> bool:
    os.environ[MARKER_ENV] = str(e.tmp / "pwned")
    return True


def _filled(e: Env) -> CachedContext:
    ctx = e.ctx()
    ctx.append(e.lm.encode("hello"))
    return ctx


def _ai_call(args: dict) -> Any:
    from langchain_core.messages import AIMessage

    return AIMessage("", tool_calls=[{"name": "grep", "args": args, "id": "c1"}])


def _li_msg(text: str) -> Any:
    from llama_index.core.llms import ChatMessage

    return ChatMessage(role="user", content=text)


def _open_store(path: Path) -> Any:
    from flashback_agents.retrieval import open_store

    return open_store(path)


def _bm25() -> Any:
    from flashback_agents.retrieval.bm25 import BM25Retriever

    return BM25Retriever.from_texts(["alpha beta", "gamma delta"])


def _chroma(path: Path, **kw: Any) -> Any:
    from flashback_agents.retrieval.chroma import ChromaRetriever

    return ChromaRetriever(path, **kw)


def _index(paths: list, store: Path) -> Any:
    from flashback_agents.retrieval import index_paths

    return index_paths(paths, store, retriever="bm25")


@pytest.fixture(scope="module")
def env(tiny_lm, tmp_path_factory):
    e = Env(tiny_lm, tmp_path_factory.mktemp("bad-inputs"))
    from langchain_flashback import ChatFlashBack, FlashBackLLM as LCLLM
    from llama_index.llms.flashback import FlashBack

    e.lc = lambda: ChatFlashBack(model=tiny_lm.name, max_tokens=2)
    e.lc_llm = lambda: LCLLM(model=tiny_lm.name, max_tokens=2)
    e.li = lambda: FlashBack(model=tiny_lm, max_tokens=2)
    # the LangChain classes take a model spec: route it to the already loaded tiny model
    engine = shared_engine(tiny_lm)
    from langchain_flashback import _params

    original = _params.FlashBackParams._engine_for_model
    _params.FlashBackParams._engine_for_model = lambda self, model: engine
    try:
        yield e
    finally:
        _params.FlashBackParams._engine_for_model = original


RESULTS: dict[str, str] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_our_error_saying_what_to_do(env, case):
    marker = env.tmp / "pwned"
    with pytest.raises(Exception) as info:
        CASES[case](env)
    exc = info.value
    RESULTS[case] = type(exc).__name__
    assert isinstance(exc, OUR_ERRORS), f"{case}: {type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert ADVICE.search(str(exc)), f"{case}: the message does not say what to do: {exc}"
    assert not marker.exists(), f"{case}: a file ran code"


def test_bad_input_table_size():
    entry_points = {c.split("-")[0] for c in CASES}
    print(f"\nbad inputs tried: {len(CASES)} over {len(entry_points)} entry points / readers: "
          f"{sorted(entry_points)}")
    assert len(CASES) >= 100
    assert {"ctx", "append", "load", "chat", "tools", "langchain", "llamaindex", "transcripts", "store", "bm25",
            "chroma", "resume", "gen"} <= entry_points


def test_skip_invalid_survives_a_bad_byte_and_the_cli_prints_no_traceback(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "t.jsonl"
    data.write_bytes(json.dumps(good).encode() + b"\n" + b'{"messages": "\xff"}\n' + json.dumps(good).encode() + b"\n")
    tr = read_transcripts(data, skip_invalid=True)
    assert len(tr) == 2 and tr.n_skipped == 1 and "UTF-8" in tr.skipped[0].reason and tr.skipped[0].where.endswith(":2")
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "a"), "--model",
                                   str(tmp_path / "no-model"), "--skip-invalid", "--steps", "1"])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "skipped 1 malformed" in res.output and "no-model" in res.output
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "b"), "--steps", "1"])
    assert isinstance(res.exception, SystemExit) and "t.jsonl:2" in res.output and "UTF-8" in res.output


def test_integrations_refuse_a_tool_given_as_a_bare_string(tiny_model_dir):
    """A tool given by name is our LayoutError with what to pass instead (both integrations)."""
    from flashback_agents.layout import LayoutError

    lc = pytest.importorskip("langchain_flashback")
    with pytest.raises(LayoutError, match="not a tool"):
        lc.ChatFlashBack(model=str(tiny_model_dir)).bind_tools(["search"])
    with pytest.raises(LayoutError, match="list of tools"):
        lc.ChatFlashBack(model=str(tiny_model_dir)).bind_tools("search")
    li = pytest.importorskip("llama_index.llms.flashback.convert")
    with pytest.raises(LayoutError, match="LlamaIndex tool"):
        li.tool_spec("search")
