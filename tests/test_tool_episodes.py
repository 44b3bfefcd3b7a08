"""General tool-use episodes (tools/tool_episodes.py): scripted right, recorded from the frameworks' own
agent loops, and trained on exactly the ids each integration sends at every step."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("langchain.agents")
pytest.importorskip("llama_index.core.agent.workflow")

from flashback_agents.layout import Layout  # noqa: E402
from flashback_agents.training.samples import IGNORE, conversation_sample  # noqa: E402
from flashback_agents.training.transcripts import parse_conversation  # noqa: E402
from tools import tool_families as fam  # noqa: E402
from tools.tool_episodes import FRAMEWORKS, Player, draw_episode, to_openai  # noqa: E402


def _episodes(n: int, seed: int = 3, mix: str = "v2"):
    rng = random.Random(seed)
    return [draw_episode(rng, mix) for _ in range(n)]


@pytest.mark.parametrize("mix", ["v2", "v5"])
def test_episodes_are_scripted_right(mix):
    kinds = set()
    for ep in _episodes(300, mix=mix):
        kinds.add(ep.kind)
        names = [n for n, _ in ep.calls]
        assert all(n in ep.tools for n in names), (ep.question, names, ep.tools)
        assert len(set(ep.tools)) == len(ep.tools)
        if ep.kind in ("no_tool", "no_fit"):
            assert not ep.calls and ep.answer
        else:
            # results are what the tools return for the scripted arguments, and the answer states the last one
            assert [fam.TOOLS[n](**a) for n, a in ep.calls] == ep.results
            last = ep.results[-1]
            if isinstance(last, (int, float)):
                assert str(last) in ep.answer or f"{last:,}" in ep.answer, (ep.question, last, ep.answer)
        if ep.kind == "chain":  # the second call takes (a number of) the first result
            first = json.dumps(ep.results[0]).replace(",", "")
            assert len(ep.calls) == 2 and any(str(v) in first for v in ep.calls[1][1].values()), ep
        if ep.kind == "two":  # two calls, each for its own entity or question
            assert len(ep.calls) == 2 and ep.calls[0] != ep.calls[1]
    assert kinds == {"single", "chain", "two", "no_tool", "no_fit"}


@pytest.mark.parametrize("mix", ["v2", "v5"])
def test_arguments_are_copied_from_the_question(mix):
    """A small model copies: every string argument of a first call appears in the question (search queries
    may be the topic word), so the data never asks it to invent one."""
    for ep in _episodes(300, seed=7, mix=mix):
        if not ep.calls:
            continue
        name, args = ep.calls[0]
        for key, value in args.items():
            if isinstance(value, str) and name != "search_docs" and key not in ("from_unit", "to_unit"):
                assert value.lower() in ep.question.lower(), (ep.question, args)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert str(value) in ep.question, (ep.question, args)


def test_distractor_and_uncovered_episodes_bind_tools_that_do_not_answer():
    for ep in _episodes(300, seed=11):
        if ep.kind == "no_fit":
            assert ep.tools and all(t in fam.TOOLS for t in ep.tools)
            assert all(t in ep.answer for t in ep.tools)  # the answer names what the tools can do instead


def test_lookup_chains_take_the_value_the_record_holds():
    """Mix v5's lookup-then-convert chains: the question names the record, never the value; the second
    call takes the value from the first result, and the answer states both."""
    from tools.tool_families import CHAIN_SOURCES, q_lookup_chain

    rng = random.Random(4)
    for _ in range(80):
        script = q_lookup_chain(rng)
        calls, results = fam.play(script)
        (first, _), (second, args) = calls
        assert first in fam.TOOLS and second in fam.TOOLS and script.kind == "chain"
        record = json.dumps(results[0])
        taken = [v for v in args.values() if str(v) in record and str(v) not in script.question]
        assert taken, (script.question, args, results[0])  # a value only the record holds
        assert str(results[1]) in script.answer(results)
    assert not set(CHAIN_SOURCES) & {t for ep in _episodes(300, mix="v5") if ep.kind != "chain" for t in ep.tools}


def test_parallel_mix_makes_independent_calls_in_one_turn():
    """Mix v4: the same draws as v2 (same questions, calls and answers), but each "two" episode whose calls
    need no earlier result makes them together; chains stay one call per step."""
    v2, v4 = _episodes(300, seed=13, mix="v2"), _episodes(300, seed=13, mix="v4")
    assert [(e.question, e.calls, e.answer) for e in v2] == [(e.question, e.calls, e.answer) for e in v4]
    assert not any(e.parallel for e in v2)
    assert all(e.kind == "two" for e in v4 if e.parallel)
    assert not any(e.parallel for e in v4 if e.kind == "chain")
    assert sum(e.parallel for e in v4) >= 0.6 * sum(e.kind == "two" for e in v4) > 0


@pytest.mark.parametrize("mix", ["v2", "v4"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_ids_equal_what_the_integration_sends_at_every_step(tiny_lm, framework, mix):
    """The identity test: each step's rendering by the integration (its own message conversion, the tool
    schemas its framework built) is a prefix of the training sample's ids, the sample is trained on exactly
    the assistant turns, and the JSONL round trip changes nothing. Mix v4 adds parallel calls (one turn
    with two calls, then both results)."""
    player = Player(tiny_lm)
    layout = Layout(tiny_lm)
    train_layout = Layout(tiny_lm)
    seen_kinds = set()
    episodes = _episodes(24, seed=5, mix=mix)
    if mix == "v4":
        episodes += [e for e in _episodes(60, seed=6, mix=mix) if e.parallel][:3]
        assert any(e.parallel for e in episodes)
    for ep in episodes:
        messages, tools = player.play(ep, framework)
        seen_kinds.add(ep.kind)
        if ep.parallel:
            turns = [m for m in messages if m.role == "assistant"]
            assert [len(m.tool_calls or []) for m in turns] == [len(ep.calls), 0]
            assert [m.role for m in messages].count("tool") == len(ep.calls)
        row = json.loads(json.dumps(to_openai(messages, tools)))
        conv = parse_conversation(row, source="episode")
        sample, truncated = conversation_sample(train_layout, conv, max_length=8192)
        assert sample is not None and not truncated
        steps = player.last_steps
        # one model call per tool call (or one for all parallel calls), then the answer
        assert len(steps) == (1 if ep.parallel else len(ep.calls)) + 1
        for k, (sent, step_tools, _choice) in enumerate(steps):
            ids = layout.render(sent, tools=step_tools)  # what ChatEngine._plan renders, generation prompt included
            assert sample.input_ids[:len(ids)] == ids
            if k == 0:
                assert all(label == IGNORE for label in sample.labels[:len(ids)])  # the prompt is not trained
            assert sample.labels[len(ids)] == sample.input_ids[len(ids)]  # the reply that follows is
        assert len([m for m in conv.messages if m.role == "assistant"]) == len(steps)
    assert {"single", "no_tool"} <= seen_kinds or {"single", "no_fit"} <= seen_kinds


def test_langchain_tool_results_carry_the_tool_name_and_llamaindex_ones_do_not(tiny_lm):
    """The frameworks word tool results differently; the data keeps each one's wording (no normalising)."""
    rng = random.Random(2)
    ep = next(e for e in (draw_episode(rng) for _ in range(100)) if e.kind == "single")
    player = Player(tiny_lm)
    lc, _ = player.play(ep, "langchain")
    li, _ = player.play(ep, "llamaindex")
    assert [m.name for m in lc if m.role == "tool"] == [ep.calls[0][0]]
    assert [m.name for m in li if m.role == "tool"] == [None]
