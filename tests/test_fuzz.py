"""Property-based suite (hypothesis) on the tiny random model (issue 16).

1. Random operation sequences on ``CachedContext`` (append, evidence, sync, rollback, fork,
   generate, compaction under ``on_overflow="evict"``, save/load) keep the cache invariant: the
   next-token logits equal a full recompute of the held ids, and the budget holds.
2. Random message lists, tool schemas, tool choices and settings through ``ChatEngine`` either
   answer or raise one of our error types: never a raw dependency error.
3. Random bytes as context, transcript, store, checkpoint and adapter files never run code and
   never raise outside our error types.

Small ``max_examples`` and ``deadline=None`` keep it to well under a minute on one core.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flashback_agents import CachedContext, FlashBackError, GenerationConfig, generate  # noqa: E402
from flashback_agents.context import ContextLoadError, ContextOverflowError  # noqa: E402
from flashback_agents.engines import local_engine  # noqa: E402
from flashback_agents.layout import Message, ToolCall  # noqa: E402
from flashback_agents.models import ModelLoadError  # noqa: E402
from flashback_agents.testing import assert_cache_matches_recompute  # noqa: E402
from flashback_agents.retrieval import RetrievalError  # noqa: E402
from flashback_agents.training.trainer import TrainError  # noqa: E402
from flashback_agents.training.transcripts import TranscriptError, read_transcripts  # noqa: E402

#: what the library raises on purpose: every such error is a FlashBackError (tests/test_errors.py)
OUR_ERRORS = FlashBackError
FAST = settings(max_examples=20, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
MARKER_ENV = "FLASHBACK_PWNED_MARKER"


def check_invariant(ctx: CachedContext) -> None:
    assert len(ctx) <= ctx.max_context_tokens
    assert ctx.cached_tokens <= len(ctx) <= ctx.cached_tokens + 1
    if len(ctx):
        assert_cache_matches_recompute(ctx, 1e-4)


# --------------------------------------------------------------------------- 1. op sequences vs recompute
ids_st = st.lists(st.integers(3, 447), min_size=1, max_size=24)
words = st.text(alphabet="abcdeERROR disk:0123 \n", min_size=1, max_size=60)
op_st = st.one_of(
    st.tuples(st.just("append"), ids_st),
    st.tuples(st.just("evidence"), words),
    st.tuples(st.just("sync"), st.tuples(st.integers(0, 400), ids_st)),
    st.tuples(st.just("rollback"), st.integers(0, 40)),
    st.tuples(st.just("fork"), st.integers(0, 400)),
    st.tuples(st.just("generate"), st.integers(1, 6)),
    st.tuples(st.just("save_load"), st.none()),
)


@settings(FAST, max_examples=60)
@given(mode=st.sampled_from(["error", "evict"]), ops=st.lists(op_st, min_size=1, max_size=12))
def test_random_operation_sequences_match_a_recompute(tiny_lm, mode, ops):
    budget = 160 if mode == "evict" else 512
    ctx = CachedContext(tiny_lm, max_context_tokens=budget, on_overflow=mode, prefill_chunk=17)
    ctx.append(ctx.layout.render([Message("user", "start")], add_generation_prompt=False))
    tmp = Path(tempfile.mkdtemp())
    try:
        for op, arg in ops:
            before = ctx.token_ids
            try:
                if op == "append":
                    ctx.append(arg)
                elif op == "evidence":
                    ctx.append_evidence(arg, source="log")
                elif op == "sync":
                    keep, tail = arg
                    ctx.sync(ctx.token_ids[:keep] + tail)
                elif op == "rollback":
                    ctx.rollback(min(arg, len(ctx) - 1))
                elif op == "fork":
                    ctx = ctx.fork_prefix(max(1, arg)) if arg % 2 else ctx.fork()
                elif op == "generate":
                    generate(ctx, GenerationConfig(max_new_tokens=arg))
                elif op == "save_load":
                    ctx.save(tmp / "c.pt")
                    loaded = CachedContext.load(tiny_lm, tmp / "c.pt")
                    assert loaded.token_ids == ctx.token_ids and loaded.on_overflow == ctx.on_overflow
                    ctx = loaded
            except ContextOverflowError:
                assert mode == "error" or op in ("append", "sync", "evidence")
                assert ctx.token_ids == before  # a refused call changes nothing
            check_invariant(ctx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- 2. random chat requests
any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())
text_st = st.text(alphabet=any_char, max_size=30)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text_st,
                      st.frozensets(st.integers(), max_size=2).map(set))
json_st = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=6)
role_st = st.sampled_from(["system", "user", "assistant", "tool", "evidence", "wizard", "", None])
plain_text = st.text(alphabet="abc xyz:ERROR 12\n", max_size=30)
valid_message_st = st.one_of(
    st.builds(Message, role=st.sampled_from(["user", "evidence"]), content=plain_text),
    st.builds(Message, role=st.just("assistant"), content=plain_text,
              tool_calls=st.lists(st.builds(ToolCall, name=st.just("grep"),
                                            arguments=st.dictionaries(st.sampled_from(["p", "n"]),
                                                                      st.one_of(plain_text, st.integers()), max_size=2),
                                            id=st.just("c1")), max_size=1)),
    st.builds(Message, role=st.just("tool"), content=plain_text, name=st.just("grep")))
junk_message_st = st.builds(
    Message, role=role_st, content=st.one_of(text_st, st.none(), st.integers()),
    tool_calls=st.one_of(st.just([]), st.lists(st.builds(ToolCall, name=st.one_of(text_st, st.integers()),
                                                         arguments=st.one_of(st.dictionaries(st.text(max_size=4), json_st,
                                                                                             max_size=2), json_st),
                                                         id=st.text(max_size=4)), max_size=2)),
    tool_call_id=st.one_of(st.none(), st.text(max_size=4)), name=st.one_of(st.none(), text_st),
    documents=st.one_of(st.just([]), st.lists(st.one_of(text_st, st.none()), max_size=2)))
message_st = st.one_of(valid_message_st, valid_message_st, valid_message_st, junk_message_st)
schema_st = st.one_of(
    st.just({"type": "object", "properties": {"w": {"enum": ["a", "b"]}}, "required": ["w"]}),
    st.dictionaries(st.sampled_from(["type", "properties", "required", "enum", "items"]), json_st, max_size=3))
tool_st = st.one_of(
    st.builds(lambda n, p, d: {"type": "function", "function": {"name": n, "description": d, "parameters": p}},
              st.sampled_from(["grep", "count", ""]), schema_st, st.one_of(text_st, st.integers())),
    text_st, json_st)
def mostly(valid, junk):
    """Valid values three times in four, so requests get past validation and decode too."""
    return st.one_of(valid, valid, valid, junk)


request_st = st.fixed_dictionaries({
    "messages": mostly(st.lists(message_st, min_size=1, max_size=4), json_st),
    "tools": mostly(st.none(), st.one_of(st.lists(tool_st, max_size=2), text_st)),
    "tool_choice": mostly(st.sampled_from([None, "auto", "none"]), st.one_of(st.sampled_from(["any", "grep", "nope"]),
                                                                             st.integers())),
    "response_schema": mostly(st.none(), schema_st),
    "config": st.builds(GenerationConfig, max_new_tokens=mostly(st.integers(0, 3), st.integers(-2, -1)),
                        temperature=mostly(st.sampled_from([0.0, 0.7]), st.floats(allow_nan=True)),
                        top_p=mostly(st.just(1.0), st.floats(allow_nan=True)),
                        seed=st.just(1),
                        stop=mostly(st.just(()), st.one_of(text_st, st.lists(text_st, max_size=2)))),
    "timeout": mostly(st.sampled_from([None, 5.0]), st.floats(allow_nan=True)),
})


OUTCOMES = {"answered": 0, "error": 0}


@pytest.fixture(scope="module")
def fuzz_engine(tiny_lm):
    engine = local_engine(tiny_lm, max_context_tokens=400)
    engine.min_constrained_tokens = 6  # constrained replies need not complete here: keep examples fast
    return engine


@settings(max_examples=150, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=request_st)
def test_random_chat_requests_raise_only_our_errors(fuzz_engine, req):
    try:
        reply = fuzz_engine.chat(**req)
    except OUR_ERRORS as exc:
        assert str(exc)
        OUTCOMES["error"] += 1
    else:
        assert isinstance(reply.text, str)
        OUTCOMES["answered"] += 1
    assert not any(e.busy for e in fuzz_engine.pool._entries)


def test_random_chat_requests_reach_decoding_too():
    """Runs after the property above: the generator must not only produce rejected requests."""
    print(f"\nrandom chat requests: {OUTCOMES}")
    assert OUTCOMES["answered"] >= 5 and OUTCOMES["error"] >= 5


# --------------------------------------------------------------------------- 3. random bytes as files
class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


def _pickle_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"format": "flashback-context-v2", "step": 1, "x": _Pwn()}, buf)
    return buf.getvalue()


class Files(dict):
    """Scratch dir plus seed files (a short repr: hypothesis prints fixtures of failing examples)."""

    def __repr__(self) -> str:
        return f"Files({self['root']})"


@pytest.fixture(scope="module")
def files(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-files")
    os.environ[MARKER_ENV] = str(root / "pwned")
    ctx = CachedContext(tiny_lm, max_context_tokens=200, on_overflow="evict")
    ctx.append(tiny_lm.encode("a saved context for mutation"))
    ctx.save(root / "good.pt")
    return Files(root=root, good=(root / "good.pt").read_bytes(), pickle=_pickle_bytes())


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b)


blob_st = st.one_of(st.binary(max_size=400), st.sampled_from(["good", "pickle"]).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=4))))


def _blob(files: dict, spec) -> bytes:
    if isinstance(spec, bytes):
        return spec
    kind, flips = spec
    return _mutate(files[kind], flips)


@FAST
@given(spec=blob_st)
def test_random_context_files(tiny_lm, files, spec):
    path = files["root"] / "ctx.pt"
    path.write_bytes(_blob(files, spec))
    try:
        ctx = CachedContext.load(tiny_lm, path)
        check_invariant(ctx)
    except ContextLoadError as exc:
        assert "saved" in str(exc) or "context" in str(exc)
    assert not (files["root"] / "pwned").exists()


@FAST
@given(spec=blob_st, skip=st.booleans())
def test_random_checkpoint_files(files, spec, skip):
    from flashback_agents.training.checkpoint import load_checkpoint
    from flashback_agents.training.config import TrainConfig

    d = files["root"] / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "trainer_state.pt").write_bytes(_blob(files, spec))

    class Acc:
        process_index = 0
    with pytest.raises(TrainError):
        load_checkpoint(d, None, None, None, TrainConfig(), Acc(), {})
    assert not (files["root"] / "pwned").exists()


line_st = st.one_of(st.binary(max_size=120), json_st.map(lambda v: json.dumps(v, default=str).encode()),
                    st.just(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'))


@FAST
@given(lines=st.lists(line_st, min_size=1, max_size=5), suffix=st.sampled_from([".jsonl", ".json"]),
       skip=st.booleans())
def test_random_transcript_files(files, lines, suffix, skip):
    path = files["root"] / f"t{suffix}"
    path.write_bytes(b"\n".join(lines))
    try:
        tr = read_transcripts(path, skip_invalid=skip)
        assert len(tr) + tr.n_skipped >= 0
    except TranscriptError as exc:
        assert not skip, exc


@FAST
@given(manifest=st.one_of(st.binary(max_size=200), json_st.map(lambda v: json.dumps(v, default=str).encode()),
                          st.just(b'{"format": "flashback-store-v1", "retriever": "bm25", "chunk_tokens": 8, '
                                  b'"overlap": 0}')),
       chunks=st.one_of(st.binary(max_size=200), st.lists(line_st, max_size=3).map(b"\n".join)),
       query=text_st)
def test_random_store_files(files, manifest, chunks, query):
    from flashback_agents.retrieval import open_store

    store = files["root"] / "store"
    shutil.rmtree(store, ignore_errors=True)
    (store / "bm25").mkdir(parents=True)
    (store / "store.json").write_bytes(manifest)
    (store / "bm25" / "chunks.jsonl").write_bytes(chunks)
    try:
        r = open_store(store)
        r.retrieve(query, k=2)
    except RetrievalError as exc:
        assert str(exc)


@settings(max_examples=5, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=st.one_of(st.binary(max_size=120), json_st.map(lambda v: json.dumps(v, default=str).encode())),
       weights=st.binary(max_size=200))
def test_random_adapter_files(tiny_model_dir, files, config, weights):
    from flashback_agents import load_model

    d = files["root"] / "adapter"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / "adapter_config.json").write_bytes(config)
    (d / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(ModelLoadError):
        load_model(str(tiny_model_dir), adapter=str(d), device="cpu")
    assert not (files["root"] / "pwned").exists()
