"""Layout (flashback_agents/layout.py): prefix-stable rendering of conversations, marked tool results and
documents, reply ids reused, clear errors, a bounded encode cache."""

from __future__ import annotations

import pytest

from flashback_agents import CachedContext, GenerationConfig, Layout, LayoutError, Message, ToolCall, generate


def test_layout_is_prefix_stable_and_marks_tool_results(tiny_lm):
    lay = Layout(tiny_lm)
    tools = [{"type": "function", "function": {"name": "grep", "description": "search",
                                                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    msgs = [Message("system", "You analyse logs."), Message("user", "How many errors?", documents=["doc one"]),
            Message("assistant", "", tool_calls=[ToolCall("grep", {"q": "ERROR"}, "c1")]),
            Message("tool", "3 lines", tool_call_id="c1", name="grep"), Message("assistant", "There are 3."),
            Message("user", "Thanks")]
    prev: list[int] = []
    for n in range(1, len(msgs) + 1):
        ids = lay.render(msgs[:n], tools=tools, add_generation_prompt=False)
        assert ids[: len(prev)] == prev
        prev = ids
    left, right = tiny_lm.marker_ids
    assert prev.count(left) == 2 and prev.count(right) == 2  # the document and the tool result
    assert lay.render(msgs, tools=tools) == lay.render(msgs, tools=tools)  # deterministic
    # prepend moves evidence before the question
    pre = lay.render(msgs[:2], pattern="prepend", add_generation_prompt=False)
    q = tiny_lm.encode("How many errors?")
    pos_q = next(i for i in range(len(pre)) if pre[i:i + len(q)] == q)
    assert pre.index(left) < pos_q


def test_layout_reuses_generated_ids_for_replies(tiny_lm):
    lay = Layout(tiny_lm)
    ctx = CachedContext(tiny_lm)
    msgs = [Message("user", "hi")]
    ctx.sync(lay.render(msgs))
    res = generate(ctx, GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    reply = Message("assistant", res.text)
    lay.remember_reply(reply, res.token_ids)
    nxt = lay.render(msgs + [reply, Message("user", "more")])
    r = ctx.sync(nxt)
    assert r.reused == len(ctx.token_ids) - r.computed
    assert nxt[: len(lay.render(msgs)) + 6] == ctx.token_ids[: len(lay.render(msgs)) + 6]


def test_layout_errors(tiny_lm):
    lay = Layout(tiny_lm)
    with pytest.raises(LayoutError, match="unknown role 'robot'"):
        lay.render([Message("robot", "x")])
    with pytest.raises(LayoutError, match="no earlier assistant message made a call"):
        lay.render([Message("user", "x"), Message("tool", "r", tool_call_id="zz")])
    with pytest.raises(LayoutError, match="only the first message"):
        lay.render([Message("user", "x"), Message("system", "y")])


def test_repeated_identical_reply_keeps_its_own_ids(tiny_lm):
    """The same reply text generated twice with different ids: each re-renders to its own ids."""
    lay = Layout(tiny_lm)
    msgs = [Message("user", "go")]
    p1 = lay.render(msgs)
    first = tiny_lm.encode("quick brown fox")
    lay.remember_reply(Message("assistant", "quick brown fox"), first + [2], prompt_ids=p1)
    msgs2 = msgs + [Message("assistant", "quick brown fox"), Message("user", "again")]
    p2 = lay.render(msgs2)
    t = "quick brown fox"
    second = next(ids for ids in (tiny_lm.encode(t[:i]) + tiny_lm.encode(t[i:]) for i in range(1, len(t)))
                  if ids != first)
    assert second != first and tiny_lm.decode(second) == "quick brown fox"  # other ids, same text
    lay.remember_reply(Message("assistant", "quick brown fox"), second + [2], prompt_ids=p2)
    full = lay.render(msgs2 + [Message("assistant", "quick brown fox")], add_generation_prompt=False)
    assert full[: len(p1) + len(first)] == p1 + first  # the first reply still renders to its own ids
    assert full[len(p2): len(p2) + len(second)] == second


def test_layout_encode_cache_is_a_bounded_lru(tiny_lm):
    layout = Layout(tiny_lm)
    for i in range(3 * Layout.ENC_CACHE_ENTRIES):
        layout.render([Message("user", f"distinct message {i}")])
    assert len(layout._enc_cache) <= Layout.ENC_CACHE_ENTRIES
    assert layout.fmt.prefix["user"] in layout._enc_cache  # hot entries stay
