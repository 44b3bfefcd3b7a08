"""tool_choice="none" means no call (flashback_agents.callmask), and the repeat-call guard
(``repeat_calls="forbid"``): masks, end-to-end on tiny models, cache consistency after a replaced reply."""

from __future__ import annotations

import json

import pytest
import torch

from flashback_agents.backends.base import ChatUsage, Constraint
from flashback_agents.backends.local import LocalBackend
from flashback_agents.callmask import (CallMask, NoCallProcessor, no_call_processor, single_token_tag_ids,
                                       stream_visible, strip_call_markup)
from flashback_agents.chat import ChatEngine, _Plan, answered_calls, check_repeat_calls
from flashback_agents.engines import local_engine, shared_engine
from flashback_agents.constrained import ConstraintError
from flashback_agents.generation import GenerationConfig, GenerationResult
from flashback_agents.layout import Message, ToolCall
from flashback_agents.pool import ContextPool
from flashback_agents.toolformat import HERMES, LLAMA3_JSON, MISTRAL

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two digits.",
                                           "parameters": {"type": "object",
                                                          "properties": {"a": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9},
                                                                         "b": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
                                                          "required": ["a", "b"]}}}]
NEG = float("-inf")


def call_text(a: int, b: int) -> str:
    return "<tool_call>" + json.dumps({"name": "add", "arguments": {"a": a, "b": b}}) + "</tool_call>"


def answered_conversation(a: int = 1, b: int = 2) -> list[Message]:
    return [Message("user", "add 1 and 2"),
            Message("assistant", "", tool_calls=[ToolCall("add", {"a": a, "b": b}, id="c1")]),
            Message("tool", "3", tool_call_id="c1", name="add")]


# ---------------------------------------------------------------- the mask, on a made-up vocabulary
VOCAB = [b"<eos>", b"<", b"tool", b"_call", b">", b"<tool_call>", b"hi", b" x<tool_call>", b"[TOOL_CALLS]",
         b"_call>", b"l>", b"{", b" {", b"  ", b"ok", b"<|python_tag|>", b"call"]


def scores_after(proc: NoCallProcessor, tokens: list[int]) -> torch.Tensor:
    """The processor's scores at the step after ``tokens`` were generated (fed as plain decoding does)."""
    ids = [0, 0]
    out = proc(torch.tensor([ids]), torch.zeros(1, len(VOCAB)))
    for t in tokens:
        ids.append(t)
        out = proc(torch.tensor([ids]), torch.zeros(1, len(VOCAB)))
    return out[0]


def test_mask_forbids_the_tag_and_every_completion_of_a_partial_tag():
    mask = CallMask(VOCAB, special={0, 8, 15}, tags=["<tool_call>"])
    assert sorted(mask.always.tolist()) == [5, 7]  # the tag as one token, and inside a longer one
    s = scores_after(NoCallProcessor(mask), [])  # blank: no tag, and no markup of any kind opens the reply
    assert s[5] == NEG and s[7] == NEG and s[1] == NEG and s[6] == 0
    s = scores_after(NoCallProcessor(mask), [6])  # "hi": a "<" in the text is fine, the tag is not
    assert s[1] == 0 and s[5] == NEG and s[7] == NEG
    s = scores_after(NoCallProcessor(mask), [1, 2])  # "<tool": "_call>" completes it, "_call" does not (yet)
    assert s[9] == NEG and s[3] == 0 and s[4] == 0
    s = scores_after(NoCallProcessor(mask), [1, 2, 3])  # "<tool_call": ">" completes it
    assert s[4] == NEG and s[9] == 0 and s[6] == 0
    s = scores_after(NoCallProcessor(mask), [1, 2, 3, 6])  # "<tool_callhi": no longer a prefix
    assert s[4] == 0
    s = scores_after(NoCallProcessor(mask), [1, 2, 0, 3])  # a special token adds no text: "<tool" + "_call"
    assert s[4] == NEG


def test_mask_of_a_special_token_tag_and_of_llama3_json():
    mistral = CallMask(VOCAB, special={0, 8, 15}, tags=["[TOOL_CALLS]"], tag_ids=[8])
    assert mistral.always.tolist() == [8]
    assert scores_after(NoCallProcessor(mistral), [6])[8] == NEG
    llama = CallMask(VOCAB, special={0, 8, 15}, tags=["<|python_tag|>"], lead_brace=True, tag_ids=[15])
    s = scores_after(NoCallProcessor(llama), [])
    assert s[11] == NEG and s[12] == NEG and s[15] == NEG and s[6] == 0  # a reply may not open with JSON
    s = scores_after(NoCallProcessor(llama), [13])  # still blank after spaces
    assert s[11] == NEG and s[12] == NEG
    s = scores_after(NoCallProcessor(llama), [14])  # "ok": a brace later is text
    assert s[11] == 0 and s[12] == 0 and s[15] == NEG


def test_strip_and_stream_visible():
    assert strip_call_markup('a<tool_call>{"x": 1}</tool_call>b') == 'a{"x": 1}b'
    assert strip_call_markup("<tool<tool_call>_call>ok") == "ok"
    assert strip_call_markup("[TOOL_CALLS][{}] <|python_tag|>", MISTRAL) == "[{}] "
    assert stream_visible("Sure <tool") == ("Sure <tool", 5)
    assert stream_visible("Sure <tool_call>x") == ("Sure x", 6)


def test_answered_calls_and_repeat_calls_validation():
    k12, k34 = ("add", '{"a":1,"b":2}'), ("add", '{"a":3,"b":4}')
    msgs = [Message("user", "u"),
            Message("assistant", "", tool_calls=[ToolCall("add", {"b": 2, "a": 1}, id="x"),
                                                 ToolCall("add", {"a": 3, "b": 4}, id="y")]),
            Message("tool", "7", tool_call_id="y")]
    assert answered_calls(msgs) == {k34}  # by id: only y is answered
    assert answered_calls(msgs + [Message("tool", "3")]) == {k12, k34}  # no id: the oldest unanswered one
    no_ids = [Message("assistant", "", tool_calls=[ToolCall("add", {"a": 1, "b": 2})]), Message("tool", "3")]
    assert answered_calls(no_ids) == {k12}
    assert answered_calls(no_ids[:1]) == frozenset()  # a call without a result is not answered
    assert check_repeat_calls(None) == "forbid"  # the measured default (docs/benchmarks.md section 9) and check_repeat_calls("forbid") == "forbid"
    with pytest.raises(ConstraintError, match=r"\['allow', 'forbid'\]"):
        check_repeat_calls("never")


# ---------------------------------------------------------------- tiny model (tiny_lm_2k, conftest.py)
class PushyBackend(LocalBackend):
    """A local backend whose model *wants* to write ``push`` (a large bias on its next token at each
    step), in front of whatever the engine's constraint adds: a stand-in for a model that calls tools."""

    push: str | None = None

    def prepare(self, ids, config, constraint):
        procs = super().prepare(ids, config, constraint)
        if self.push is None:
            return procs
        target = self.lm.encode(self.push) + [min(self.lm.eos_token_ids)]
        state = {"start": None}

        def pusher(input_ids, scores):
            if state["start"] is None:
                state["start"] = input_ids.shape[1]
            step = input_ids.shape[1] - state["start"]
            if step < len(target):
                scores = scores.clone()
                scores[:, target[step]] += 1000.0
            return scores

        return [pusher] + procs


def pushy_engine(lm, push: str | None) -> ChatEngine:
    backend = PushyBackend(ContextPool(lm))
    backend.push = push
    engine = ChatEngine(lm, backend=backend)
    engine.lazy_tool_grammar = False  # the pushed call is the model's own text
    return engine


def test_processor_masks_the_tag_on_a_real_vocabulary(tiny_lm_2k):
    proc = no_call_processor(tiny_lm_2k)
    assert b"<tool" in proc.mask.tags and b"< Tool" in proc.mask.tags  # the stem and its drifted spellings
    opener = tiny_lm_2k.encode("<tool")
    assert len(opener) > 1  # spelled in several tokens: the completion is what gets masked
    width = tiny_lm_2k.model.get_output_embeddings().weight.shape[0]
    ids = [1, 2]
    out = proc(torch.tensor([ids]), torch.zeros(1, width))
    assert out[0, opener[0]] == NEG  # a blank reply may not open with "<" at all
    text = tiny_lm_2k.encode("ok ")
    for t in text:  # after some text, only the tag itself is forbidden
        ids.append(t)
        out = proc(torch.tensor([ids]), torch.zeros(1, width))
    for t in opener[:-1]:
        assert out[0, t] == 0, t  # every step towards the tag is allowed ...
        ids.append(t)
        out = proc(torch.tensor([ids]), torch.zeros(1, width))
    assert out[0, opener[-1]] == NEG  # ... but not the token that completes it
    assert torch.isinf(out).sum() < width // 4


def test_none_yields_no_call_and_no_tag_even_from_a_model_that_calls(tiny_lm_2k):
    engine = pushy_engine(tiny_lm_2k, call_text(1, 2))
    msgs = [Message("user", "add 1 and 2")]
    auto = engine.chat(msgs, tools=TOOLS, config=GenerationConfig(max_new_tokens=64))
    assert [(c.name, c.arguments) for c in auto.tool_calls] == [("add", {"a": 1, "b": 2})]  # it would call
    none = engine.chat(msgs, tools=TOOLS, tool_choice="none", config=GenerationConfig(max_new_tokens=64))
    assert none.tool_calls == [] and none.finish_reason != "tool_calls"
    assert "<tool_call>" not in none.text and "<tool_call>" not in none.raw_text
    assert none.usage.input_tokens == auto.usage.input_tokens  # the tools stay in the prompt
    run = engine.stream_chat(msgs, tools=TOOLS, tool_choice="none", config=GenerationConfig(max_new_tokens=64))
    assert "".join(run) == run.reply.text and "<tool_call>" not in run.reply.text
    assert none.usage.output_tokens <= 64  # the caller's max_tokens stands (no constrained floor)


def test_none_strips_a_stray_tag_as_a_last_resort(tiny_lm_2k):
    engine = local_engine(tiny_lm_2k)
    plan = _Plan([], GenerationConfig(), None, None, parse_tools=False, remember=False, no_calls=True)
    reply = engine._finish(plan, GenerationResult(text=f"ok {call_text(1, 2)}", token_ids=[], finish_reason="stop"),
                           ChatUsage())
    assert reply.tool_calls == [] and "<tool_call>" not in reply.text and reply.text.startswith("ok ")


def test_forbid_replaces_a_repeated_call_with_text(tiny_lm_2k):
    engine = pushy_engine(tiny_lm_2k, call_text(1, 2))
    msgs = answered_conversation(1, 2)
    cfg = GenerationConfig(max_new_tokens=80)
    allowed = engine.chat(msgs, tools=TOOLS, config=cfg, repeat_calls="allow")
    assert [(c.name, c.arguments) for c in allowed.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert allowed.usage.repeat_calls_forbidden == 0
    assert not engine.chat(msgs, tools=TOOLS, config=cfg).tool_calls  # the default: forbid
    forbidden = engine.chat(msgs, tools=TOOLS, config=cfg, repeat_calls="forbid")
    assert forbidden.tool_calls == [] and forbidden.finish_reason != "tool_calls"
    assert "<tool_call>" not in forbidden.text
    assert forbidden.usage.repeat_calls_forbidden == 1
    assert forbidden.usage.tokens_discarded == len(allowed.token_ids)
    assert forbidden.usage.output_tokens == len(forbidden.token_ids)
    # a required call is not guarded (it cannot be answered in text)
    assert engine.chat(msgs, tools=TOOLS, tool_choice="any", config=cfg, repeat_calls="forbid").tool_calls


def test_forbid_keeps_a_call_with_other_arguments(tiny_lm_2k):
    engine = pushy_engine(tiny_lm_2k, call_text(2, 2))
    reply = engine.chat(answered_conversation(1, 2), tools=TOOLS, config=GenerationConfig(max_new_tokens=80),
                        repeat_calls="forbid")
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("add", {"a": 2, "b": 2})]
    assert reply.usage.repeat_calls_forbidden == 0 and reply.usage.tokens_discarded == 0
    # an unanswered call (no tool result yet) is not a repeat either
    pending = answered_conversation(2, 2)[:2]
    assert engine.chat(pending, tools=TOOLS, config=GenerationConfig(max_new_tokens=80),
                       repeat_calls="forbid").tool_calls


async def test_forbid_in_streams_and_async(tiny_lm_2k):
    engine = pushy_engine(tiny_lm_2k, call_text(1, 2))
    msgs, cfg = answered_conversation(1, 2), GenerationConfig(max_new_tokens=80)
    run = engine.stream_chat(msgs, tools=TOOLS, config=cfg, repeat_calls="forbid")
    streamed = "".join(run)  # the call markup was held back: the reply is replaced before any content
    assert run.reply.tool_calls == [] and streamed == run.reply.text and run.reply.usage.repeat_calls_forbidden == 1
    areply = await engine.achat(msgs, tools=TOOLS, config=cfg, repeat_calls="forbid")
    assert areply.tool_calls == [] and areply.usage.repeat_calls_forbidden == 1
    # text streamed before the call cannot be taken back: the repeated call is dropped, the text stays
    engine.backend.push = "Hi " + call_text(1, 2)
    run = engine.stream_chat(msgs, tools=TOOLS, config=cfg, repeat_calls="forbid")
    streamed = "".join(run)
    assert streamed.startswith("Hi") and run.reply.tool_calls == [] and run.reply.text == streamed
    assert run.reply.usage.repeat_calls_forbidden == 1 and run.reply.usage.tokens_discarded == 0
    # ... while chat() (nobody saw the text) decodes again
    reply = engine.chat(msgs, tools=TOOLS, config=cfg, repeat_calls="forbid")
    assert reply.tool_calls == [] and reply.usage.tokens_discarded > 0


def test_cache_after_a_replaced_reply_equals_a_fresh_engine(tiny_lm_2k):
    """The discarded decode leaves nothing behind: the next call's greedy output (and the pooled
    contexts' logits) equal those of an engine that never saw it."""
    from flashback_agents.testing import assert_cache_matches_recompute

    engine = pushy_engine(tiny_lm_2k, call_text(1, 2))
    msgs, cfg = answered_conversation(1, 2), GenerationConfig(max_new_tokens=24)
    first = engine.chat(msgs, tools=TOOLS, config=GenerationConfig(max_new_tokens=80), repeat_calls="forbid")
    assert first.usage.repeat_calls_forbidden == 1
    for entry in engine.pool._entries:
        assert_cache_matches_recompute(entry.ctx)
    engine.backend.push = None
    follow = msgs + [Message("assistant", first.text), Message("user", "thanks")]
    again = engine.chat(follow, tools=TOOLS, config=cfg)
    assert again.usage.cache_read >= first.usage.input_tokens  # the prompt (and the reply) were reused
    fresh = local_engine(tiny_lm_2k).chat(follow, tools=TOOLS, config=cfg)
    assert again.token_ids == fresh.token_ids and again.text == fresh.text
    for entry in engine.pool._entries:
        assert_cache_matches_recompute(entry.ctx)


# ---------------------------------------------------------------- the other families (tiny models)
@pytest.fixture(scope="module")
def family_engines(tmp_path_factory):
    """The tiny model with Qwen's (<tool_call> one plain added token), Llama 3's and Mistral's templates."""
    import shutil

    from test_toolformat import FAMILY_TOKENS, _template
    from transformers import AddedToken, AutoTokenizer

    from flashback_agents import load_model
    from flashback_agents.testing import build_tiny_model_dir

    tiny_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-mask-families"), max_positions=4096)
    engines = {}
    for name, (special, plain, eos) in FAMILY_TOKENS.items():
        path = tmp_path_factory.mktemp(f"tiny-mask-{name}")
        shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(str(tiny_dir))
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
        if eos:
            tok.eos_token = eos
        tok.chat_template = _template(name)
        tok.save_pretrained(str(path))
        engines[name] = local_engine(load_model(str(path), device="cpu", adapter=None))
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.mark.parametrize("name,tag", [("qwen2.5-7b-instruct", "<tool_call>"), ("mistral-large-2407", "[TOOL_CALLS]"),
                                      ("llama-3.2-instruct", "<|python_tag|>")])
def test_family_tag_token_is_masked_and_never_written(name, tag, family_engines):
    engine = family_engines[name]
    lm, fmt = engine.lm, engine.layout.tool_format
    assert fmt is {"<tool_call>": HERMES, "[TOOL_CALLS]": MISTRAL, "<|python_tag|>": LLAMA3_JSON}[tag]
    tag_id = lm.tokenizer.convert_tokens_to_ids(tag)
    assert single_token_tag_ids(lm.tokenizer, fmt) == [tag_id]
    width = lm.model.get_output_embeddings().weight.shape[0]
    proc = no_call_processor(lm, fmt)
    first = proc(torch.tensor([[1]]), torch.zeros(1, width))[0]
    assert first[tag_id] == NEG
    if fmt is LLAMA3_JSON:  # a reply may not open with JSON, but may use braces later
        brace = lm.encode("{")[0]
        assert first[brace] == NEG
        word = lm.encode("ok")[0]
        later = proc(torch.tensor([[1, word]]), torch.zeros(1, width))[0]
        assert later[brace] == 0 and later[tag_id] == NEG
    # end to end: a model pushed to write the tag token first writes no call
    backend = PushyBackend(ContextPool(lm))
    backend.push = None
    pushy = ChatEngine(lm, backend=backend)
    pushy.lazy_tool_grammar = False
    body = {"name": "add", fmt.args_key: {"a": 1, "b": 2}}
    backend.push = tag + (json.dumps([body]) if fmt.array else json.dumps(body))
    msgs = [Message("user", "add 1 and 2")]
    cfg = GenerationConfig(max_new_tokens=80)
    auto = pushy.chat(msgs, tools=TOOLS, config=cfg)
    assert [c.name for c in auto.tool_calls] == ["add"], auto.raw_text  # pushed: it calls
    reply = pushy.chat(msgs, tools=TOOLS, tool_choice="none", config=cfg)
    assert reply.tool_calls == [] and tag_id not in reply.token_ids and tag not in reply.text
    if fmt is LLAMA3_JSON:
        assert not reply.text.lstrip().startswith("{")


def test_server_payload_bans_a_one_token_tag():
    from flashback_agents.backends.server.protocol import Prepared, ServerInfo, build_payload

    cfg = GenerationConfig(max_new_tokens=4)
    for flavor, expected in (("llama.cpp", [[7, False]]), ("vllm", {"7": -100})):
        info = ServerInfo(url="http://x/v1", base_url="http://x", api_url="http://x/v1", flavor=flavor, model_id="m")
        _, body = build_payload(info, [1, 2], cfg, Prepared(banned_ids=[7]), lambda k, m: None)
        assert body["logit_bias"] == expected
        _, plain = build_payload(info, [1, 2], cfg, Prepared(), lambda k, m: None)
        assert "logit_bias" not in plain


def test_server_backend_never_parses_calls_under_none_and_guards_repeats():
    """A server where the tag is spelled in several tokens (no logit bias possible): no call is parsed,
    the stray tag is stripped, and the guard's second request is answered in text."""
    pytest.importorskip("httpx")
    from fake_llama import FakeLlama

    from flashback_agents.backends.server import load_server_tokenizer
    from flashback_agents.engines import clear_server_engines

    fake = FakeLlama(load_server_tokenizer("smollm2-135m-instruct")[0], model_id="smollm2-135m-instruct",
                     reply="Sure " + call_text(1, 2))
    try:
        engine = shared_engine(fake.url)
        msgs = [Message("user", "add 1 and 2")]
        assert [c.arguments for c in engine.chat(msgs, tools=TOOLS).tool_calls] == [{"a": 1, "b": 2}]
        no_call = Constraint("no_tool_call", {}, fmt=HERMES)
        assert engine.backend.prepare([], GenerationConfig(), no_call).banned_ids == []  # "<tool_call>": many tokens
        none = engine.chat(msgs, tools=TOOLS, tool_choice="none")
        assert none.tool_calls == [] and none.text.startswith("Sure ") and "<tool_call>" not in none.text
        before = fake.requests
        guarded = engine.chat(answered_conversation(1, 2), tools=TOOLS, repeat_calls="forbid")
        assert fake.requests == before + 2  # the repeat, then the reply decoded again with calls forbidden
        assert guarded.tool_calls == [] and "<tool_call>" not in guarded.text
        assert guarded.usage.repeat_calls_forbidden == 1 and guarded.usage.tokens_discarded > 0
    finally:
        clear_server_engines()
        fake.stop()


# ---------------------------------------------------------------- the real default model
@pytest.mark.model
def test_default_model_none_never_calls(default_lm):
    engine = shared_engine()
    msgs = [Message("user", "What is 2 plus 3? Use the add tool.")]
    cfg = GenerationConfig(max_new_tokens=80)
    reply = engine.chat(msgs, tools=TOOLS, tool_choice="none", config=cfg)
    assert reply.tool_calls == [] and "<tool_call>" not in reply.text and "<tool_call>" not in reply.raw_text
    forced = engine.chat(msgs, tools=TOOLS, tool_choice="any", config=cfg)
    assert forced.tool_calls  # the same prompt with a call required does call
