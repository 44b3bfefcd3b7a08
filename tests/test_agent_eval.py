"""The held-out agent evaluation (``flashback-agents eval agents``): the question set is well formed and
its answer checks follow from the tools, the scoring, and the harness end to end on scripted models
(the real default model only in the ``model``-marked test, on 2 questions)."""

from __future__ import annotations

import inspect
import json
from collections import Counter
from typing import Any

import pytest

from flashback_agents.evaluation import agent_eval as ae
from flashback_agents.evaluation.agent_questions import CATEGORIES, QUESTIONS, TOOLS, questions_by_id

#: the generator's tool families and names: none of our tools may look like them
FORBIDDEN_NAME_PARTS = ("add", "subtract", "multiply", "divide", "power", "sqrt", "square", "percentage",
                        "length", "weight_conv", "volume", "price_table", "employee", "population", "profile",
                        "invoice", "ticket", "weekday", "add_days", "days_between", "date", "uppercase",
                        "count_letters", "reverse", "word_count", "search_docs", "handbook", "weather",
                        "lookup_order")
COUNTS = {"single": (12, 14), "choice": (14, 16), "no_tool_needed": (10, 10), "no_fit": (10, 10),
          "chain": (8, 9), "two_entities": (8, 9)}


# ---------------------------------------------------------------------------- the question set
def test_question_set_shape():
    assert 64 <= len(QUESTIONS) <= 72
    ids = [q.id for q in QUESTIONS]
    assert len(ids) == len(set(ids))
    counts = Counter(q.category for q in QUESTIONS)
    assert set(counts) == set(CATEGORIES)
    for cat, (lo, hi) in COUNTS.items():
        assert lo <= counts[cat] <= hi, (cat, counts[cat])
    assert len({q.text for q in QUESTIONS}) == len(QUESTIONS)


def test_tools_are_plain_typed_functions_outside_the_generator_families():
    from langchain_core.tools import tool as as_tool
    from llama_index.core.tools import FunctionTool

    for name, fn in TOOLS.items():
        assert fn.__name__ == name
        assert not any(part in name for part in FORBIDDEN_NAME_PARTS), name
        doc = inspect.getdoc(fn)
        assert doc and "\n" not in doc.strip()
        sig = inspect.signature(fn)
        assert all(p.annotation is not p.empty for p in sig.parameters.values()) and sig.return_annotation
        lc = as_tool(fn)
        assert lc.name == name and set(lc.args) == set(sig.parameters)
        li = FunctionTool.from_defaults(fn)
        assert li.metadata.name == name
        assert set(li.metadata.get_parameters_dict()["properties"]) == set(sig.parameters)


def test_bound_tools_and_expected_calls_fit_the_signatures():
    for q in QUESTIONS:
        assert q.tools and all(t in TOOLS for t in q.tools), q.id
        assert len(set(q.tools)) == len(q.tools), q.id
        if q.category == "single":
            assert len(q.tools) == 1 and len(q.calls) == 1
        if q.category == "choice":
            assert 3 <= len(q.tools) <= 4 and len(q.calls) == 1
        if q.category in ("no_tool_needed", "no_fit"):
            assert not q.calls, q.id
        if q.category == "chain":
            assert len(q.calls) == 2 and q.calls[0].name != q.calls[1].name, q.id
        if q.category == "two_entities":
            assert len(q.calls) == 2 and q.calls[0].name == q.calls[1].name and q.calls[0].args != q.calls[1].args
        if q.category != "no_fit" and q.category != "no_tool_needed":
            assert q.answer, q.id
        for call in q.calls:
            assert call.name in q.tools, (q.id, call.name)
            sig = inspect.signature(TOOLS[call.name])
            sig.bind(**call.args)  # raises on a missing or unknown argument
            required = {n for n, p in sig.parameters.items() if p.default is p.empty}
            assert required <= set(call.args), q.id


def test_arguments_are_copyable_from_the_question():
    """The first call's arguments are written in the question (numbers as written, names any case)."""
    for q in QUESTIONS:
        if not q.calls:
            continue
        calls = q.calls if q.category == "two_entities" else q.calls[:1]
        for call in calls:
            for key, value in call.args.items():
                if isinstance(value, str):
                    assert value.lower() in q.text.lower(), (q.id, key, value)
                else:
                    assert value in ae.numbers_in(q.text), (q.id, key, value)


def _flatten(result: Any) -> str:
    return json.dumps(result) if isinstance(result, (dict, list)) else str(result)


def test_expected_calls_run_and_the_answer_follows_from_the_results():
    for q in QUESTIONS:
        results = []
        for i, call in enumerate(q.calls):
            out = call.run()
            text = _flatten(out)
            assert "error" not in text.lower(), (q.id, out)
            if q.category == "chain" and i == 1:
                # the second call's arguments come from the first result
                first = _flatten(results[0]).lower()
                assert any(_flatten(v).lower() in first or (isinstance(v, (int, float))
                                                             and v in ae.numbers_in(first))
                           for v in call.args.values()), q.id
            results.append(out)
        if q.category in ("single", "choice"):
            composed = _flatten(results[0])
        elif q.category == "chain":
            composed = _flatten(results[1])
        elif q.category == "two_entities":
            composed = _flatten(results[0]) + " and " + _flatten(results[1])
        else:
            continue
        assert ae.answer_ok(q, f"The answer: {composed}.", calls=[{"name": c.name, "args": c.args} for c in q.calls]), \
            (q.id, composed)
        # and a wrong answer is not accepted
        assert not ae.answer_ok(q, "I do not know.", calls=[]), q.id


def test_unknown_keys_are_an_error_string_not_an_exception():
    from flashback_agents.evaluation import agent_tools as aq

    assert "unknown ticker" in aq.get_stock_quote("XXXX")["error"]
    assert aq.get_utc_offset("Atlantis").startswith("Error")
    assert aq.convert_currency(5, "usd", "zzz").startswith("Error")
    assert aq.shipping_cost(2, "Q").startswith("Error")
    assert aq.find_book("  the SALT orchard ")["author"] == "Mirela Vance"
    assert aq.get_flight_status("qx 418")["status"] == "delayed"
    assert aq.room_availability("Cedar room")["capacity"] == 4
    assert aq.convert_number_base(-10, 2) == "-1010" and aq.convert_number_base(0, 16) == "0"


# ---------------------------------------------------------------------------- checks and scoring
def test_numbers_are_normalised():
    assert ae.numbers_in("It costs $1,234.50 today") == [1234.5]
    assert ae.numbers_in("QX418 leaves at gate B12") == []
    assert ae.numbers_in("UTC-5, or -3.5 and 93,750") == [5.0, -3.5, 93750.0]
    assert ae.numbers_in("8,12") == [8.0, 12.0]
    q = questions_by_id()["choice-currency"]
    assert ae.answer_ok(q, "500 GBP is 93,750.00 JPY.") and ae.answer_ok(q, "That is 93750 yen")
    assert not ae.answer_ok(q, "That is 93,700 yen")
    b = questions_by_id()["single-base"]
    assert ae.answer_ok(b, "255 in base 16 is FF.") and ae.answer_ok(b, "0xFF")
    assert not ae.answer_ok(b, "I cannot, the tool is off")
    u = questions_by_id()["two-utc"]
    assert ae.answer_ok(u, "Tokyo is UTC+09:00 and Lima is UTC−05:00.")
    assert not ae.answer_ok(u, "Tokyo is UTC+09:00.")


def test_args_match():
    assert ae.args_match("convert_currency", {"amount": 200, "from_currency": "EUR", "to_currency": "USD"},
                         {"amount": "200.0", "from_currency": "eur", "to_currency": " USD"})
    assert not ae.args_match("convert_currency", {"amount": 200, "from_currency": "EUR", "to_currency": "USD"},
                             {"amount": 20, "from_currency": "EUR", "to_currency": "USD"})
    assert not ae.args_match("get_utc_offset", {"city": "Lima"}, {"city": "Lima", "country": "Peru"})
    assert not ae.args_match("get_utc_offset", {"city": "Lima"}, {})
    assert not ae.args_match("get_utc_offset", {"city": "Lima"}, "Lima")
    assert ae.args_match("lookup_postal_code", {"postal_code": "40213"}, {"postal_code": 40213})


def _run(q_id: str, calls: list[tuple[str, dict]], answer: str, ended: bool = True) -> tuple[Any, ae.RunRecord]:
    q = questions_by_id()[q_id]
    rec = ae.RunRecord(q.id, q.category, "langchain", "none", calls=[{"name": n, "args": a} for n, a in calls],
                       steps=len(calls) + 1, ended=ended, answer=answer)
    return q, rec


def test_score_run_right_and_wrong():
    q, rec = _run("single-currency", [("convert_currency", {"amount": 200, "from_currency": "EUR",
                                                            "to_currency": "USD"})], "200 EUR is 250.00 USD.")
    assert ae.score_run(q, rec) == {"tool": True, "args": True, "no_call": None, "answer": True, "ended": True}
    q, rec = _run("single-currency", [("convert_currency", {"amount": 200, "from_currency": "USD",
                                                            "to_currency": "EUR"})], "200 USD is 160 EUR.")
    assert ae.score_run(q, rec) == {"tool": True, "args": False, "no_call": None, "answer": False, "ended": True}
    # a right answer in a run that did not end is not a right final answer
    q, rec = _run("single-currency", [], "250", ended=False)
    assert ae.score_run(q, rec)["answer"] is False and ae.score_run(q, rec)["tool"] is False
    # two entities: both calls, any order
    q, rec = _run("two-utc", [("get_utc_offset", {"city": "lima"}), ("get_utc_offset", {"city": "Tokyo"})],
                  "Lima: -05:00, Tokyo: +09:00")
    assert ae.score_run(q, rec) == {"tool": True, "args": True, "no_call": None, "answer": True, "ended": True}
    q, rec = _run("two-utc", [("get_utc_offset", {"city": "Tokyo"}), ("get_utc_offset", {"city": "Tokyo"})],
                  "Tokyo: +09:00")
    assert ae.score_run(q, rec)["args"] is False and ae.score_run(q, rec)["answer"] is False
    # chain: the second call's arguments come from the first result
    q, rec = _run("chain-flight-eur", [("get_flight_status", {"flight_number": "QX418"}),
                                       ("convert_currency", {"amount": 420.0, "from_currency": "USD",
                                                             "to_currency": "EUR"})], "It costs 336 EUR.")
    assert all(ae.score_run(q, rec)[k] for k in ("tool", "args", "answer", "ended"))
    # no_fit: no call and any non-empty text; a call makes the answer wrong too
    q, rec = _run("nofit-stock", [], "I can't look up share prices with these tools.")
    assert ae.score_run(q, rec) == {"tool": None, "args": None, "no_call": True, "answer": True, "ended": True}
    q, rec = _run("nofit-stock", [("convert_currency", {"amount": 1, "from_currency": "USD", "to_currency": "EUR"})],
                  "Apple is at 0.8.")
    assert ae.score_run(q, rec)["no_call"] is False and ae.score_run(q, rec)["answer"] is False
    q, rec = _run("none-sky", [], "   ")
    assert ae.score_run(q, rec)["answer"] is False
    q, rec = _run("none-sky", [], "It is blue.")
    assert ae.score_run(q, rec)["answer"] is True and ae.score_run(q, rec)["no_call"] is True


def test_aggregate_and_table():
    runs = []
    for q_id, calls, answer in (("single-currency", [("convert_currency", {"amount": 200, "from_currency": "EUR",
                                                                           "to_currency": "USD"})], "250"),
                                ("nofit-stock", [], "No tool for that."),
                                ("none-sky", [("get_utc_offset", {"city": "x"})], "blue")):
        q, rec = _run(q_id, calls, answer)
        rec.scores = ae.score_run(q, rec)
        runs.append(rec)
    agg = ae.aggregate(runs)["none"]["langchain"]
    assert agg["all"]["n"] == 3 and agg["all"]["answer"]["right"] == 3
    assert agg["all"]["no_call"] == {"right": 1, "of": 2, "rate": 0.5}
    assert agg["single"]["no_call"]["rate"] is None
    figs = ae.must_show(runs)["none"]["langchain"]
    assert figs["ended"]["met"] and figs["answer"]["met"] and not figs["no_call"]["met"]
    result = ae.AgentEvalResult("m", [{"label": "none", "adapter": None, "path": None}], ["langchain"], 6, 64, {},
                                None, 1, [r.question for r in runs], runs)
    table = ae.format_table(result)
    assert "| single | 1 | 100% (1/1) | 100% (1/1) | - | 100% (1/1) | 100% (1/1) |" in table
    assert "no call 50% (1/2) (target 80%: NOT met)" in table
    json.dumps(result.as_dict())


def test_select_questions():
    assert [q.id for q in ae.select_questions(ids=["two-utc", "none-sky"])] == ["two-utc", "none-sky"]
    assert len(ae.select_questions(limit=3)) == 3
    assert {q.category for q in ae.select_questions(categories=["chain"])} == {"chain"}
    with pytest.raises(ae.AgentEvalError, match="unknown question ids"):
        ae.select_questions(ids=["nope"])
    with pytest.raises(ae.AgentEvalError, match="limit"):
        ae.select_questions(limit=0)
    with pytest.raises(ae.AgentEvalError, match="not an adapter directory"):
        ae.adapter_arg("/nonexistent/adapter")
    assert ae.adapter_arg("none") == ("none", None) and ae.adapter_arg("auto") == ("auto", "auto")


# ---------------------------------------------------------------------------- scripted models, both loops
def _oracle_answer(q) -> str:
    parts = [str(a[0] if isinstance(a, tuple) else a) for a in q.answer]
    return "Here you go: " + ", ".join(parts) + "." if parts else "Hello! I can answer that without tools."


def _script(q, n_results: int, policy: str) -> tuple[str, list[tuple[str, dict]]]:
    """What the scripted model says after ``n_results`` tool results: ("text", calls)."""
    if policy == "loop":  # never stops calling
        name = q.tools[0]
        args = {p: 1 for p in inspect.signature(TOOLS[name]).parameters}
        return "", [(name, args)]
    if policy == "late":  # five calls, then the answer at the sixth model call
        if n_results < ae.MAX_STEPS - 1:
            return "", [(q.calls[0].name, dict(q.calls[0].args))]
        return _oracle_answer(q), []
    if n_results < len(q.calls):
        c = q.calls[n_results]
        return "", [(c.name, dict(c.args))]
    return _oracle_answer(q), []


class _ScriptedChat:
    """A LangChain chat model that plays a script (GenericFakeChatModel cannot bind tools)."""

    @staticmethod
    def make(policy: str = "oracle"):
        from langchain_core.language_models.chat_models import BaseChatModel
        from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
        from langchain_core.outputs import ChatGeneration, ChatResult

        class Scripted(BaseChatModel):
            policy: str = "oracle"
            calls_seen: int = 0

            @property
            def _llm_type(self) -> str:
                return "scripted"

            def bind_tools(self, tools, **kwargs):
                return self.bind(tools=tools, **kwargs)

            def _generate(self, messages, stop=None, run_manager=None, **kwargs):
                self.calls_seen += 1
                question = next(m.content for m in messages if isinstance(m, HumanMessage))
                q = next(q for q in QUESTIONS if q.text == question)
                n = sum(isinstance(m, ToolMessage) for m in messages)
                text, calls = _script(q, n, self.policy)
                msg = AIMessage(content=text, tool_calls=[{"name": c, "args": a, "id": f"call_{n}_{i}"}
                                                          for i, (c, a) in enumerate(calls)])
                return ChatResult(generations=[ChatGeneration(message=msg)])

        return Scripted(policy=policy)


def _scripted_llamaindex(policy: str = "oracle"):
    from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
    from llama_index.core.llms.mock import MockFunctionCallingLLM

    seen = {"calls": 0}

    def respond(messages, **kwargs):
        seen["calls"] += 1
        question = next(m.content for m in messages if m.role == MessageRole.USER)
        q = next(q for q in QUESTIONS if q.text == question)
        n = sum(m.role == MessageRole.TOOL for m in messages)
        text, calls = _script(q, n, policy)
        if not calls:
            return ChatMessage(role=MessageRole.ASSISTANT, content=text)
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[
            ToolCallBlock(tool_call_id=f"call_{n}_{i}", tool_name=c, tool_kwargs=a) for i, (c, a) in enumerate(calls)])

    llm = MockFunctionCallingLLM(response_generator=respond, is_chat_model=True)
    return llm, seen


@pytest.mark.parametrize("framework", ["langchain", "llamaindex"])
def test_harness_end_to_end_with_a_scripted_model(framework):
    ids = ["single-currency", "chain-flight-eur", "two-utc", "nofit-stock", "none-sky"]

    def factory(fw, adapter):
        return _ScriptedChat.make() if fw == "langchain" else _scripted_llamaindex()[0]

    result = ae.evaluate_agents(ae.select_questions(ids=ids), adapters=["none"], frameworks=[framework],
                                llm_factory=factory, progress=False)
    assert [r.question for r in result.runs] == ids
    for run in result.runs:
        q = questions_by_id()[run.question]
        assert run.error is None, run
        assert run.ended and run.steps == len(q.calls) + 1, run
        assert [c["name"] for c in run.calls] == [c.name for c in q.calls]
        assert all(v in (True, None) for v in run.scores.values()), run
    figs = result.must_show["none"][framework]
    assert figs["ended"]["rate"] == figs["answer"]["rate"] == figs["no_call"]["rate"] == 1.0
    assert "### adapter none, " + framework in ae.format_table(result)


@pytest.mark.parametrize("framework", ["langchain", "llamaindex"])
def test_a_run_that_never_stops_ends_after_six_model_calls(framework):
    q = questions_by_id()["single-currency"]
    if framework == "langchain":
        llm = _ScriptedChat.make("loop")
        run = ae.run_langchain(q, llm)
        assert llm.calls_seen == ae.MAX_STEPS
    else:
        llm, seen = _scripted_llamaindex("loop")
        run = ae.run_llamaindex(q, llm)
        assert seen["calls"] == ae.MAX_STEPS
    assert not run.ended and run.steps == ae.MAX_STEPS and len(run.calls) == ae.MAX_STEPS
    assert "within 6 model calls" in run.error
    assert ae.score_run(q, run)["ended"] is False


@pytest.mark.parametrize("framework", ["langchain", "llamaindex"])
def test_a_final_answer_at_the_sixth_call_ended(framework):
    """Five calls then an answer: six model calls, ended (LlamaIndex counts the final reply too)."""
    q = questions_by_id()["single-currency"]
    if framework == "langchain":
        run = ae.run_langchain(q, _ScriptedChat.make("late"))
    else:
        run = ae.run_llamaindex(q, _scripted_llamaindex("late")[0])
    assert run.error is None and run.ended and run.steps == ae.MAX_STEPS, run
    assert ae.score_run(q, run)["answer"] is True


def test_extra_fields_must_exist():
    with pytest.raises(ae.AgentEvalError, match="no field"):
        ae._check_extra({"no_such_field_xyz": 1})


# ---------------------------------------------------------------------------- the CLI
def test_cli_errors_are_one_line_and_exit_2():
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    runner = CliRunner()
    for args, needle in ((["--ids", "nope"], "unknown question ids"), (["--framework", "crewai"], "--framework"),
                         (["--repeat-calls", "sometimes"], "--repeat-calls"), (["--limit", "0"], "limit"),
                         (["--adapter", "/nonexistent/dir"], "not an adapter directory"),
                         (["--threads", "0"], "threads")):
        res = runner.invoke(app, ["eval", "agents", *args])
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output, (args, res.output)


# ---------------------------------------------------------------------------- the real default model
@pytest.mark.model
@pytest.mark.parametrize("framework", ["langchain", "llamaindex"])
def test_real_loops_run_and_stop_on_the_default_model(framework):
    qs = ae.select_questions(ids=["single-currency", "none-sky"])
    result = ae.evaluate_agents(qs, adapters=["none"], frameworks=[framework], max_tokens=64, threads=1,
                                progress=False)
    assert len(result.runs) == 2
    for run in result.runs:
        assert run.steps <= ae.MAX_STEPS and (run.ended or run.error), run
        assert set(run.scores) == set(ae.METRICS)
