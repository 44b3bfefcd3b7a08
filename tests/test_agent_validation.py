"""The adapter-selection split (tools/agent_validation.py): generator episodes of an unused seed, scored
as ``eval agents`` scores its questions."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain.agents")

from flashback_agents.evaluation.agent_scoring import RunRecord, score_run  # noqa: E402
from tools.agent_validation import VALIDATION_SEED, _requirements, validation_set  # noqa: E402


def test_requirements_read_what_a_right_answer_states():
    assert _requirements(42) == [42] and _requirements(2.5) == [2.5]
    assert _requirements("Oslo has 465,516 inhabitants") == [465516.0]
    assert _requirements("Tiro clock: 383.42 USD") == [383.42]
    assert _requirements("2018-02-20") == ["2018-02-20"] and _requirements("Wednesday") == ["Wednesday"]
    assert _requirements({"amount": 3}) == [] and _requirements(True) == []
    assert _requirements("Error: dates must be written YYYY-MM-DD") == []


def test_validation_set_is_fixed_and_not_a_training_seed():
    a, b = validation_set(40), validation_set(40)
    assert [q.text for q in a] == [q.text for q in b]
    assert VALIDATION_SEED not in (0, 1, 2)  # the seeds of build/tools*.jsonl (Makefile, docs)
    assert {q.category for q in a} >= {"choice", "chain", "two_entities", "no_fit", "no_tool_needed"}
    for q in a:
        assert bool(q.calls) == (q.category not in ("no_fit", "no_tool_needed"))


def test_a_validation_question_is_scored_like_an_eval_question():
    q = next(q for q in validation_set(40) if q.category == "chain" and q.answer)
    run = RunRecord(q.id, q.category, "langchain", "x")
    run.calls = [{"name": c.name, "args": dict(c.args)} for c in q.calls]
    run.ended, run.answer = True, f"The result is {q.answer[0]}."
    assert score_run(q, run) == {"tool": True, "args": True, "no_call": None, "answer": True, "ended": True}
    run.calls = run.calls[:1]
    run.answer = "I do not know."
    assert score_run(q, run)["args"] is False and score_run(q, run)["answer"] is False
