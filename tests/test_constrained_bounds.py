"""A required call always completes (issue: reliability items 4 and 5).

4. The grammar bounds what it forces (``constrained.bound_schema``: arrays, numbers, strings, free
   objects get caps that follow ``max_new_tokens``), and when the budget is about to run out the
   decoder writes the shortest valid close (``constrained.CloseGuard``): a required call returns a
   parsed call, or our ConstraintError, never ``length`` with no call.
5. The grammar and the parser accept the same language: capped strings escape control characters (no
   raw ones), special tokens cannot be written inside the call, and one lenient parser
   (``ToolCallFormat.parse``) serves every path.
"""

from __future__ import annotations

import json

import pytest

from flashback_agents.chat import parse_tool_calls
from flashback_agents.engines import local_engine
from flashback_agents.constrained import (GRAMMARS, Bounds, ConstraintError, bound_schema, bounds_for, cap_strings,
                                          tool_call_processor, tool_call_schema)
from flashback_agents.generation import GenerationConfig, generate
from flashback_agents.layout import Message
from flashback_agents.toolformat import HERMES, LLAMA3_JSON, MISTRAL

jsonschema = pytest.importorskip("jsonschema")


def tool(props: dict, name: str = "f", required: list | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": "Do it.", "parameters": {
        "type": "object", "properties": props, "required": list(props) if required is None else required}}}


def args_schema(t: dict) -> dict:
    return t["function"]["parameters"]


@pytest.fixture(scope="module")
def engine(tiny_lm_2k):
    """An engine whose required calls keep the caller's max_tokens (no 256-token floor): the budget
    guard, not the floor, must make them complete."""
    eng = local_engine(tiny_lm_2k)
    eng.min_constrained_tokens = 0
    return eng


# ------------------------------------------------------------------ 4. the schema's caps
def test_bound_schema_caps_what_the_schema_leaves_open():
    b = Bounds()
    s = bound_schema({"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "integer"}},
        "few": {"type": "array", "items": {"type": "string"}, "minItems": 20},
        "n": {"type": "number", "minimum": 0},
        "s": {"type": "string"}, "long": {"type": "string", "maxLength": 5000},
        "min": {"type": "string", "minLength": 200},
        "e": {"enum": ["a", "b"]}, "p": {"type": "string", "pattern": "[a-z]+"},
        "o": {"type": "object"}, "any": {"description": "anything"},
        "type": {"type": "string"}, "properties": {"type": "integer"}}})  # names that are keywords elsewhere
    p = s["properties"]
    lim = 10 ** b.max_digits - 1
    assert p["xs"]["maxItems"] == 16 and p["xs"]["items"] == {"type": "integer", "minimum": -lim, "maximum": lim}
    assert p["few"]["maxItems"] == 20  # never below minItems
    assert p["n"] == {"type": "number", "minimum": 0, "maximum": lim}
    assert p["s"]["maxLength"] == 160 and p["long"]["maxLength"] == 160  # an explicit cap is only lowered
    assert p["min"] == {"type": "string", "minLength": 200, "maxLength": 200}  # raised to minLength, not refused
    assert p["e"] == {"enum": ["a", "b"]} and p["p"] == {"type": "string", "pattern": "[a-z]+"}
    assert p["o"]["maxProperties"] == 8 and "anyOf" in p["o"]["additionalProperties"]
    assert "anyOf" in p["any"] and p["any"]["description"] == "anything"
    assert p["type"]["maxLength"] == 160 and p["properties"]["maximum"] == lim
    assert s["type"] == "object" and "maxProperties" not in s  # named properties only: no free extras
    # caps follow the budget, in few tiers (few grammars to compile)
    assert bounds_for(None) == bounds_for(256) == bounds_for(512) == Bounds()
    assert bounds_for(1024).max_string == 512 and bounds_for(1024).max_items == 32
    assert bounds_for(8192).max_string == 2048
    # the server backend's string-only caps: minLength respected, nothing else touched
    assert cap_strings({"type": "string", "minLength": 200}) == {"type": "string", "minLength": 200, "maxLength": 200}
    assert cap_strings({"type": "integer"}) == {"type": "integer"} and cap_strings({}) == {}


def test_bounded_schema_still_validates_what_it_writes():
    """A cap only narrows: a value of the capped schema is a value of the original."""
    original = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                                                 "o": {"type": "object"}, "s": {"type": "string", "minLength": 3}},
                "required": ["xs", "o", "s"]}
    jsonschema.validate({"xs": [1.5, -2], "o": {"k": [1, "a"]}, "s": "abc"}, bound_schema(original))
    jsonschema.validate({"xs": [1.5, -2], "o": {"k": [1, "a"]}, "s": "abc"}, original)


def test_min_length_200_is_accepted(engine):
    t = tool({"text": {"type": "string", "minLength": 200}})
    r = engine.chat([Message("user", "write")], tools=[t], tool_choice="any",
                    config=GenerationConfig(max_new_tokens=64))
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
    assert len(r.tool_calls[0].arguments["text"]) >= 200


HARD = {  # each ended `length` with no call on the tiny model before the guard (issue 4)
    "array-of-integer": {"xs": {"type": "array", "items": {"type": "integer"}}},
    "number": {"x": {"type": "number"}},
    "free-object": {"o": {"type": "object"}},
    "long-enum": {"e": {"enum": [f"option_{'x' * 40}_{i}" for i in range(30)]}},
    "pattern": {"p": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"}},
    "long-maxLength": {"s": {"type": "string", "maxLength": 4000}},
    "email": {"m": {"type": "string", "format": "email"}},
}


@pytest.mark.parametrize("name", sorted(HARD))
def test_required_call_always_closes(engine, name):
    """Small budgets, greedy and sampled: a parsed call that validates, never `length` with no call."""
    t = tool(HARD[name])
    for n, seed in [(16, None), (48, None), (48, 1), (96, 2), (160, 3)]:
        cfg = GenerationConfig(max_new_tokens=n, temperature=0.0 if seed is None else 1.0, seed=seed)
        r = engine.chat([Message("user", "go")], tools=[t], tool_choice="any", config=cfg)
        assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1, (n, seed, r.raw_text[:200])
        jsonschema.validate(r.tool_calls[0].arguments, args_schema(t))
        if r.usage.forced_close:  # the guard wrote the end: within budget unless the shortest call is longer
            assert len(r.token_ids) <= n or r.usage.forced_close == len(r.token_ids)


def test_guard_keeps_the_call_within_max_tokens(tiny_lm_2k):
    """When the shortest call fits, a forced close ends within max_new_tokens (and is reported)."""
    from flashback_agents import CachedContext

    t = tool(HARD["array-of-integer"])
    prompt = tiny_lm_2k.encode("<|im_start|>user\ncount<|im_end|>\n<|im_start|>assistant\n")
    forced = 0
    for seed in range(6):
        ctx = CachedContext(tiny_lm_2k, max_context_tokens=2048)
        ctx.append(prompt)
        r = generate(ctx, GenerationConfig(max_new_tokens=100, temperature=1.0, seed=seed),
                     [tool_call_processor(tiny_lm_2k, [t])])
        assert r.finish_reason == "stop" and len(r.token_ids) <= 100
        assert parse_tool_calls(r.text, {"f"})[1]
        forced += r.forced_close > 0
        assert ctx.token_ids[-len(r.token_ids):] == r.token_ids  # the close is in the cache: the next turn appends
    assert forced  # the random model rambles: some runs were closed by the guard


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_guarded_close_is_the_same_with_speculation_and_jump_forward(tiny_lm_2k, seed):
    """The guard looks at the same positions under multi-token decoding: the output stays plain decoding's,
    and the cache equals a recompute."""
    from flashback_agents import CachedContext
    from flashback_agents.testing import assert_cache_matches_recompute

    t = tool({"xs": {"type": "array", "items": {"type": "integer"}}, "s": {"type": "string"}})
    prompt = tiny_lm_2k.encode("<|im_start|>user\nlist 1 2 3 1 2 3<|im_end|>\n<|im_start|>assistant\n")
    outs = {}
    for mode, flags in {"plain": dict(speculate=False, jump_forward=False),
                        "both": dict(speculate=True, jump_forward=True)}.items():
        ctx = CachedContext(tiny_lm_2k, max_context_tokens=2048)
        ctx.append(prompt)
        cfg = GenerationConfig(max_new_tokens=90, temperature=0.0 if seed is None else 1.0, seed=seed, **flags)
        outs[mode] = (ctx, generate(ctx, cfg, [tool_call_processor(tiny_lm_2k, [t])]))
    (pc, plain), (sc, spec) = outs["plain"], outs["both"]
    assert spec.token_ids == plain.token_ids and spec.forced_close == plain.forced_close
    assert parse_tool_calls(spec.text, {"f"})[1]
    assert sc.token_ids == pc.token_ids
    assert_cache_matches_recompute(sc, 1e-4)


def test_no_room_in_the_window_is_our_error(tiny_lm_2k):
    """A required call that cannot be completed in what is left of the context window: ConstraintError."""
    from flashback_agents import CachedContext

    t = tool({"text": {"type": "string", "minLength": 300}})
    ctx = CachedContext(tiny_lm_2k, max_context_tokens=2048)
    turn = tiny_lm_2k.encode("<|im_start|>user\nwrite<|im_end|>\n<|im_start|>assistant\n")
    ctx.append(turn * ((2048 - 100) // len(turn)))
    assert 2048 - len(ctx) < 300
    with pytest.raises(ConstraintError, match="context window"):
        generate(ctx, GenerationConfig(max_new_tokens=64), [tool_call_processor(tiny_lm_2k, [t])])


def test_json_reply_closes_too(engine):
    """A response_schema reply is closed by the same guard: valid JSON, never cut at `length`."""
    schema = {"type": "object", "properties": {"counts": {"type": "array", "items": {"type": "integer"}},
                                               "note": {"type": "string"}}, "required": ["counts", "note"]}
    for n, seed in [(12, None), (40, 1), (80, 2)]:
        r = engine.chat([Message("user", "count")], response_schema=schema,
                        config=GenerationConfig(max_new_tokens=n, temperature=0.0 if seed is None else 1.0, seed=seed))
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), schema)


# ------------------------------------------------------------------ 5. grammar and parser agree
def test_control_characters_in_arguments_parse():
    raw = '<tool_call>{"name": "f", "arguments": {"q": "a\tb\x01c\x1f"}}</tool_call>'
    text, calls = parse_tool_calls(raw, {"f"})
    assert text == "" and calls[0].arguments == {"q": "a\tb\x01c\x1f"}
    assert HERMES.parse(raw)[1][0].arguments["q"] == "a\tb\x01c\x1f"
    assert LLAMA3_JSON.parse('{"name": "f", "parameters": {"q": "x\ty"}}')[1][0].arguments == {"q": "x\ty"}
    assert MISTRAL.parse('[TOOL_CALLS][{"name": "f", "arguments": "{\\"q\\": \\"x\ty\\"}"}]')[1][0].arguments == \
        {"q": "x\ty"}  # arguments as a JSON string, with a raw tab in it
    # Hermes content stays as written, other formats strip it (as before the parsers were folded)
    assert parse_tool_calls('Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call>')[0] == "Sure. "


def test_grammar_strings_are_strict_json(tiny_lm_2k):
    """Capped strings: no raw control characters, JSON escapes allowed, no special tokens."""
    import xgrammar as xgr

    compiled = GRAMMARS.get(tiny_lm_2k, "tool_call", tool_call_schema([tool({"q": {"type": "string"}})]))
    head = '<tool_call>{"name": "f", "arguments": {"q": "a'

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(compiled)
        return m.accept_string(head) and m.accept_string(text)

    assert not accepts("\t") and not accepts("\x01") and not accepts("\n")
    assert accepts("\\t") and accepts('\\"') and accepts("\\u00e9") and not accepts("\\ud800")
    m = xgr.GrammarMatcher(compiled)
    m.accept_string(head)
    mask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    m.fill_next_token_bitmask(mask, 0)
    allowed = xgr.testing.bitmask_to_bool_mask(mask)[0]
    tok = tiny_lm_2k.tokenizer
    for special in ("<|im_start|>", "<|endoftext|>"):
        assert not allowed[tok.convert_tokens_to_ids(special)], special
    assert allowed[tiny_lm_2k.encode("a")[0]]


def test_sampled_required_calls_all_parse(engine):
    """Issue 5's reproduction: 0 of 10 sampled calls parsed (raw control characters in the argument)."""
    t = tool({"q": {"type": "string"}}, name="search")
    parsed = 0
    for seed in range(10):
        r = engine.chat([Message("user", f"search for thing {seed}")], tools=[t], tool_choice="any",
                        config=GenerationConfig(max_new_tokens=64, temperature=1.0, seed=seed))
        parsed += len(r.tool_calls) == 1 and r.finish_reason == "tool_calls"
        assert all(ord(c) >= 0x20 for c in r.raw_text), r.raw_text
    assert parsed == 10


def test_bind_tools_any_parses_every_call(tmp_path_factory):
    """Through ChatFlashBack.bind_tools(..., tool_choice="any") (the integration the issue used)."""
    pytest.importorskip("langchain_core")
    from langchain_core.tools import tool as lc_tool
    from langchain_flashback.chat_models import ChatFlashBack

    from flashback_agents.testing import build_tiny_model_dir

    @lc_tool
    def search(query: str) -> str:
        """Search the notes."""
        return query

    tiny = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-bind"), max_positions=2048)
    for seed in range(4):
        llm = ChatFlashBack(model=str(tiny), max_tokens=64, temperature=1.0, seed=seed)
        msg = llm.bind_tools([search], tool_choice="any").invoke(f"find item {seed}")
        assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "search", msg.content


# ------------------------------------------------------------------ property: random schemas, random budgets
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def _scalar(draw):
    kind = draw(st.sampled_from(["integer", "number", "string", "boolean", "enum"]))
    if kind == "integer":
        s = {"type": "integer"}
        if draw(st.booleans()):
            lo = draw(st.integers(-1000, 1000))
            s.update(minimum=lo, maximum=lo + draw(st.integers(0, 10 ** 6)))
        return s
    if kind == "number":
        return {"type": "number"} if draw(st.booleans()) else {"type": "number", "minimum": 0, "maximum": 1}
    if kind == "string":
        s = {"type": "string"}
        if draw(st.booleans()):
            s["minLength"] = draw(st.integers(0, 40))
        if draw(st.booleans()):
            s["maxLength"] = s.get("minLength", 0) + draw(st.integers(0, 400))
        return s
    if kind == "boolean":
        return {"type": "boolean"}
    return {"enum": draw(st.lists(_word, min_size=1, max_size=6, unique=True))}


def _value(depth: int):
    if depth <= 0:
        return _scalar()
    inner = _value(depth - 1)
    arrays = st.builds(lambda items, lo: {"type": "array", "items": items, **({"minItems": lo} if lo else {})},
                       inner, st.integers(0, 3))
    return st.one_of(_scalar(), arrays, _object(depth - 1))


def _object(depth: int):
    @st.composite
    def build(draw):
        props = draw(st.dictionaries(_word, _value(depth), min_size=0, max_size=4))
        required = [k for k in props if draw(st.booleans())]
        return {"type": "object", "properties": props, "required": required}
    return build()


@settings(max_examples=200, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(schema=_object(2), budget=st.integers(32, 256), seed=st.one_of(st.none(), st.integers(0, 1000)))
@pytest.mark.slow
def test_random_schemas_always_give_a_valid_call(engine, schema, budget, seed):
    t = {"type": "function", "function": {"name": "f", "description": "Do it.", "parameters": schema}}
    cfg = GenerationConfig(max_new_tokens=budget, temperature=0.0 if seed is None else 1.0, seed=seed)
    try:
        r = engine.chat([Message("user", "go")], tools=[t], tool_choice="any", config=cfg)
    except ConstraintError as exc:  # allowed: our error, saying what to change
        assert "max_tokens" in str(exc) or "context" in str(exc) or "schema" in str(exc)
        return
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1, r.raw_text[:300]
    jsonschema.validate(r.tool_calls[0].arguments, schema)


# ------------------------------------------------------------------ the default model
@pytest.mark.model
def test_default_model_array_of_integer_call_closes(default_lm):
    """Issue 4's reproduction: the default model, greedy, counted '..., 222, 223' until max_tokens."""
    t = tool({"numbers": {"type": "array", "items": {"type": "integer"}, "description": "The numbers to add."}},
             name="add_all")
    eng = local_engine(default_lm)
    r = eng.chat([Message("user", "Add up all the numbers from 1 to 300.")], tools=[t], tool_choice="any",
                 config=GenerationConfig(max_new_tokens=256))
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1, r.raw_text[-300:]
    jsonschema.validate(r.tool_calls[0].arguments, args_schema(t))

