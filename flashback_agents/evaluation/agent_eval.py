"""``flashback-agents eval agents``: the held-out agent questions (:mod:`.agent_questions`) through real
agent loops, scored by category.

Each question runs through

- LangChain v1 ``langchain.agents.create_agent(ChatFlashBack(...), tools)`` (tools wrapped with
  ``langchain_core.tools.tool``), streamed with ``stream_mode="values"`` so that a run stopped by the
  recursion limit still shows what it did. The graph is ``model -> tools -> model -> ...``, one
  LangGraph step per node run; ``recursion_limit = 2 * max_steps`` lets the model be called at most
  ``max_steps`` times and a ``max_steps``-th reply without calls still finish (measured with a
  scripted model: 2 * max_steps - 1 raises ``GraphRecursionError`` after a final ``max_steps``-th
  reply, 2 * max_steps + 1 allows a 7th model call). A 6th reply that still calls a tool raises
  ``GraphRecursionError`` before the tools run: the run did not end;
- LlamaIndex ``FunctionAgent(tools=[FunctionTool.from_defaults(fn)...], llm=FlashBack(...))`` run with
  ``max_iterations=max_steps`` (asyncio.run). LlamaIndex counts every model reply, the final one
  too, and raises on reaching the limit before looking at the reply; so a run whose ``max_steps``-th
  reply has no tool call ended (within the limit), and one whose ``max_steps``-th reply calls a tool
  did not. Neither framework makes a model call past ``max_steps``.

No system prompt is sent unless one is given (what a user writing the two-line agent gets).

Scores per run (``None``: does not apply to the category):

- ``tool``: the first call names the expected tool (categories that expect calls);
- ``args``: every expected call was made with the expected arguments (numbers compared numerically,
  strings case- and space-insensitively; an extra argument equal to the parameter's default is
  ignored), in any order, each matched to a distinct call;
- ``no_call``: no call at all (``no_tool_needed`` and ``no_fit``);
- ``answer``: the final answer passes the question's check (``no_fit``: no call and a non-empty answer);
- ``ended``: the run ended with a reply without tool calls within ``max_steps`` model calls.

The three must-show figures per framework: runs ended, final answers right, and no call over the
``no_tool_needed`` + ``no_fit`` questions.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..errors import FlashBackError
from ..models import DEFAULT_MODEL, resolve_adapter
from .agent_questions import CATEGORIES, QUESTIONS, TOOLS, Question, tool_functions, tool_signature

__all__ = ["AgentEvalError", "AgentEvalResult", "RunRecord", "FRAMEWORKS", "MAX_STEPS", "METRICS", "TARGETS",
           "aggregate", "answer_ok", "args_match", "evaluate_agents", "format_table", "langchain_recursion_limit",
           "numbers_in", "run_langchain", "run_llamaindex", "score_run", "select_questions"]

FRAMEWORKS = ("langchain", "llamaindex")
MAX_STEPS = 6
#: score keys, in table order, with their column titles
METRICS = {"tool": "right tool", "args": "args right", "no_call": "no call", "answer": "answer right",
           "ended": f"ended <= {MAX_STEPS}"}
#: the must-show targets: share of runs ended, of answers right, of no-call runs where none fits
TARGETS = {"ended": 0.90, "answer": 0.70, "no_call": 0.80}
NO_CALL_CATEGORIES = ("no_tool_needed", "no_fit")


class AgentEvalError(ValueError, FlashBackError):
    """Bad options for the agent evaluation (the message says which)."""


# ---------------------------------------------------------------------------- checks
_NUMBER = re.compile(r"(?<![\w.])(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?![\d])")


def numbers_in(text: str) -> list[float]:
    """Every number written in ``text``: ``1,234.50`` is 1234.5; a number glued to letters (``QX418``)
    or a minus after a letter (``UTC-5``) is not read as a (signed) number."""
    out = []
    for m in _NUMBER.finditer(text.replace("\u2212", "-")):
        try:
            out.append(float(m.group(1).replace(",", "")))
        except ValueError:  # pragma: no cover - the pattern only matches numbers
            continue
    return out


def _number_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.005)


def _text_in(needle: str, text: str) -> bool:
    """Case-insensitive; whole words at an end that is a letter or digit (``ff`` is not in ``off``)."""
    needle = needle.strip()
    if not needle:
        return True
    left = r"(?<!\w)" if needle[0].isalnum() else ""
    right = r"(?!\w)" if needle[-1].isalnum() else ""
    return re.search(left + re.escape(needle) + right, text.replace("\u2212", "-"), re.IGNORECASE) is not None


def _accepts(item: Any, text: str, numbers: list[float]) -> bool:
    if isinstance(item, tuple):
        return any(_accepts(alt, text, numbers) for alt in item)
    if isinstance(item, bool):  # pragma: no cover - not a number here
        raise TypeError("a bool is not an answer check")
    if isinstance(item, (int, float)):
        return any(_number_close(n, float(item)) for n in numbers)
    return _text_in(str(item), text)


def answer_ok(question: Question, answer: str, calls: Sequence[dict] = ()) -> bool:
    """The question's answer check on a final answer (``no_fit``: no call and a non-empty answer)."""
    text = (answer or "").strip()
    if not text:
        return False
    if question.category == "no_fit":
        return not calls
    numbers = numbers_in(text)
    return all(_accepts(item, text, numbers) for item in question.answer)


def _value_match(expected: Any, got: Any) -> bool:
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected == got
    if isinstance(expected, (int, float)):
        try:
            return _number_close(float(str(got).replace(",", "").strip()), float(expected))
        except (TypeError, ValueError):
            return False
    if isinstance(got, (dict, list)):
        return False
    return " ".join(str(expected).split()).casefold() == " ".join(str(got).split()).casefold()


def args_match(name: str, expected: dict, got: Any) -> bool:
    """Whether a call's arguments are the expected ones (see the module docstring)."""
    if not isinstance(got, dict):
        return False
    params = tool_signature(name).parameters if name in TOOLS else {}
    extra = set(got) - set(expected)
    for key in extra:
        p = params.get(key)
        if p is None or p.default is p.empty or not _value_match(p.default, got[key]):
            return False
    return all(key in got and _value_match(value, got[key]) for key, value in expected.items())


def _all_expected_made(question: Question, calls: Sequence[dict]) -> bool:
    free = list(calls)
    for exp in question.calls:
        hit = next((i for i, c in enumerate(free)
                    if c.get("name") == exp.name and args_match(exp.name, exp.args, c.get("args"))), None)
        if hit is None:
            return False
        free.pop(hit)
    return True


def score_run(question: Question, run: "RunRecord") -> dict[str, bool | None]:
    """The five scores of one run (``None`` where a score does not apply to the question's category)."""
    expects = question.expects_call
    first = run.calls[0]["name"] if run.calls else None
    return {
        "tool": (first == question.calls[0].name) if expects else None,
        "args": _all_expected_made(question, run.calls) if expects else None,
        "no_call": (not run.calls) if question.category in NO_CALL_CATEGORIES else None,
        "answer": bool(run.ended) and answer_ok(question, run.answer, run.calls),
        "ended": bool(run.ended),
    }


# ---------------------------------------------------------------------------- records
@dataclass
class RunRecord:
    """One question through one framework with one adapter."""
    question: str
    category: str
    framework: str
    adapter: str
    calls: list[dict] = field(default_factory=list)  # {"name", "args"} in the order the model made them
    steps: int = 0           # model calls
    ended: bool = False      # a reply without tool calls within max_steps model calls
    answer: str = ""         # the last reply's text (the final answer if the run ended; scored only then)
    error: str | None = None
    seconds: float = 0.0
    scores: dict = field(default_factory=dict)


def _call(name: Any, args: Any) -> dict:
    return {"name": str(name), "args": dict(args) if isinstance(args, dict) else args}


def langchain_recursion_limit(max_steps: int = MAX_STEPS) -> int:
    """LangGraph ``recursion_limit`` for at most ``max_steps`` model calls (model, tools, ..., model):
    the last model step may end the run, a call it makes raises ``GraphRecursionError``."""
    return 2 * max_steps


def run_langchain(question: Question, llm: Any, *, max_steps: int = MAX_STEPS, system_prompt: str | None = None,
                  adapter_label: str = "") -> RunRecord:
    """``question`` through ``langchain.agents.create_agent(llm, tools)``."""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool as as_tool
    from langgraph.errors import GraphRecursionError

    rec = RunRecord(question.id, question.category, "langchain", adapter_label)
    t0 = time.perf_counter()
    state: dict = {}
    limited = False
    try:
        agent = create_agent(llm, [as_tool(fn) for fn in tool_functions(question.tools)],
                             system_prompt=system_prompt)
        for state in agent.stream({"messages": [("user", question.text)]},
                                  {"recursion_limit": langchain_recursion_limit(max_steps)}, stream_mode="values"):
            pass
    except GraphRecursionError:
        limited = True
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, not a crash of the evaluation
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.seconds = time.perf_counter() - t0
    replies = [m for m in (state or {}).get("messages", []) if isinstance(m, AIMessage)]
    rec.steps = len(replies)
    rec.calls = [_call(tc["name"], tc["args"]) for m in replies for tc in m.tool_calls]
    rec.calls += [_call(tc.get("name"), tc.get("args")) for m in replies for tc in m.invalid_tool_calls]
    last = replies[-1] if replies else None
    rec.ended = (not limited and rec.error is None and last is not None and not last.tool_calls
                 and not last.invalid_tool_calls and rec.steps <= max_steps)
    if limited:
        rec.error = f"no final answer within {max_steps} model calls (GraphRecursionError)"
    if last is not None:
        rec.answer = last.text if isinstance(last.text, str) else str(last.text)
    return rec


async def _llamaindex_run(question: Question, llm: Any, max_steps: int, system_prompt: str | None,
                          rec: RunRecord) -> None:
    from llama_index.core.agent.workflow import AgentOutput, FunctionAgent
    from llama_index.core.base.llms.types import ChatResponse
    from llama_index.core.tools import FunctionTool

    steps: list[list[Any]] = []  # the calls of each model reply
    last_text = ""
    limited = False
    try:
        agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn) for fn in tool_functions(question.tools)],
                              llm=llm, system_prompt=system_prompt)
        handler = agent.run(user_msg=question.text, max_iterations=max_steps)
        try:
            async for ev in handler.stream_events():
                if isinstance(ev, AgentOutput):
                    # read the calls off the reply message: the agent later appends the run's earlier
                    # calls to the final AgentOutput's tool_calls (the same object as the streamed one)
                    steps.append(list(llm.get_tool_calls_from_response(ChatResponse(message=ev.response),
                                                                       error_on_no_tool_call=False) or []))
                    last_text = ev.response.content or ""
            await handler
        except Exception as exc:  # WorkflowRuntimeError("Max iterations of N reached! ...")
            if "Max iterations" not in str(exc):
                raise
            limited = True
    except Exception as exc:  # noqa: BLE001 - a failed run is a result
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.steps = len(steps)
    rec.calls = [_call(tc.tool_name, tc.tool_kwargs) for calls in steps for tc in calls]
    # the limit is checked on the max_steps-th reply before it is read: a final reply there still ended
    rec.ended = rec.error is None and bool(steps) and not steps[-1] and rec.steps <= max_steps
    if limited and not rec.ended:
        rec.error = f"no final answer within {max_steps} model calls (max_iterations)"
    rec.answer = last_text


def run_llamaindex(question: Question, llm: Any, *, max_steps: int = MAX_STEPS, system_prompt: str | None = None,
                   adapter_label: str = "") -> RunRecord:
    """``question`` through LlamaIndex ``FunctionAgent(tools, llm).run(max_iterations=max_steps)``."""
    rec = RunRecord(question.id, question.category, "llamaindex", adapter_label)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # workflows lists an agent's methods with inspect.getmembers, which touches pydantic's deprecated
        # attributes (PydanticDeprecatedSince20/211, attributed to inspect): not ours, and noise
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="inspect")
        asyncio.run(_llamaindex_run(question, llm, max_steps, system_prompt, rec))
    rec.seconds = time.perf_counter() - t0
    return rec


RUNNERS: dict[str, Callable[..., RunRecord]] = {"langchain": run_langchain, "llamaindex": run_llamaindex}


# ---------------------------------------------------------------------------- aggregation
def _rate(values: Iterable[bool | None]) -> dict:
    vals = [v for v in values if v is not None]
    right = sum(1 for v in vals if v)
    return {"right": right, "of": len(vals), "rate": (right / len(vals)) if vals else None}


def aggregate(runs: Sequence[RunRecord]) -> dict:
    """``{adapter: {framework: {category | "all": {"n": runs, metric: {"right", "of", "rate"}}}}}``."""
    out: dict = {}
    for run in runs:
        out.setdefault(run.adapter, {}).setdefault(run.framework, {})
    for adapter, fws in out.items():
        for fw in fws:
            mine = [r for r in runs if r.adapter == adapter and r.framework == fw]
            rows: dict = {}
            for cat in (*CATEGORIES, "all"):
                sel = [r for r in mine if cat == "all" or r.category == cat]
                if sel:
                    rows[cat] = {"n": len(sel), **{m: _rate(r.scores.get(m) for r in sel) for m in METRICS}}
            fws[fw] = rows
    return out


def must_show(runs: Sequence[RunRecord]) -> dict:
    """Per adapter and framework: ended, answer right, no call (no_tool_needed + no_fit), with the targets."""
    out: dict = {}
    for run in runs:
        out.setdefault(run.adapter, {}).setdefault(run.framework, None)
    for adapter, fws in out.items():
        for fw in fws:
            mine = [r for r in runs if r.adapter == adapter and r.framework == fw]
            figs = {"ended": _rate(r.scores["ended"] for r in mine),
                    "answer": _rate(r.scores["answer"] for r in mine),
                    "no_call": _rate(r.scores["no_call"] for r in mine if r.category in NO_CALL_CATEGORIES)}
            for k, fig in figs.items():
                fig["target"] = TARGETS[k]
                fig["met"] = fig["rate"] is not None and fig["rate"] >= TARGETS[k]
            fws[fw] = figs
    return out


@dataclass
class AgentEvalResult:
    model: str
    adapters: list[dict]          # {"label", "adapter" (as passed to the LLM classes), "path"}
    frameworks: list[str]
    max_steps: int
    max_tokens: int
    extra: dict
    system_prompt: str | None
    threads: int | None
    questions: list[str]
    runs: list[RunRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def summary(self) -> dict:
        return aggregate(self.runs)

    @property
    def must_show(self) -> dict:
        return must_show(self.runs)

    def as_dict(self) -> dict:
        return {"model": self.model, "adapters": self.adapters, "frameworks": self.frameworks,
                "max_steps": self.max_steps, "max_tokens": self.max_tokens, "extra": self.extra,
                "system_prompt": self.system_prompt, "threads": self.threads,
                "questions": len(self.questions), "seconds": round(self.seconds, 2),
                "must_show": self.must_show, "summary": self.summary,
                "runs": [asdict(r) for r in self.runs]}


def _pct(cell: dict | None) -> str:
    if not cell or cell["rate"] is None:
        return "-"
    return f"{100 * cell['rate']:.0f}% ({cell['right']}/{cell['of']})"


def format_table(result: AgentEvalResult | dict) -> str:
    """Markdown: per adapter, one table per framework (rows: categories and all; columns: the five
    scores), then the must-show figures."""
    data = result.as_dict() if isinstance(result, AgentEvalResult) else result
    lines: list[str] = []
    summary, figs = data["summary"], data["must_show"]
    for adapter, fws in summary.items():
        for fw, rows in fws.items():
            lines.append(f"### adapter {adapter}, {fw}")
            lines.append("")
            lines.append("| category | n | " + " | ".join(METRICS.values()) + " |")
            lines.append("|---|---:|" + "---:|" * len(METRICS))
            for cat, row in rows.items():
                name = f"**{cat}**" if cat == "all" else cat
                lines.append(f"| {name} | {row['n']} | " + " | ".join(_pct(row[m]) for m in METRICS) + " |")
            f = figs[adapter][fw]
            lines.append("")
            lines.append("must-show: " + ", ".join(
                f"{label} {_pct(f[k])} (target {100 * TARGETS[k]:.0f}%: {'met' if f[k]['met'] else 'NOT met'})"
                for k, label in (("ended", "ended"), ("answer", "answers right"), ("no_call", "no call"))))
            lines.append("")
    return "\n".join(lines).rstrip()


# ---------------------------------------------------------------------------- the evaluation
def select_questions(ids: Sequence[str] | None = None, limit: int | None = None,
                     categories: Sequence[str] | None = None) -> list[Question]:
    """Questions by id (in the given order), category, then the first ``limit``."""
    qs = list(QUESTIONS)
    if categories:
        bad = [c for c in categories if c not in CATEGORIES]
        if bad:
            raise AgentEvalError(f"unknown categories {bad}; known: {', '.join(CATEGORIES)}")
        qs = [q for q in qs if q.category in categories]
    if ids:
        by_id = {q.id: q for q in qs}
        unknown = [i for i in ids if i not in {q.id for q in QUESTIONS}]
        if unknown:
            raise AgentEvalError(f"unknown question ids {unknown}; see flashback_agents/evaluation/agent_questions.py")
        qs = [by_id[i] for i in ids if i in by_id]
    if limit is not None:
        if limit < 1:
            raise AgentEvalError(f"limit must be >= 1, got {limit}")
        qs = qs[:limit]
    if not qs:
        raise AgentEvalError("no question selected")
    return qs


def adapter_arg(spec: str | None) -> tuple[str, str | None]:
    """``"auto"`` / ``"none"`` / a directory -> (label, what the LLM classes take as ``adapter=``)."""
    if spec is None or str(spec).strip().lower() in ("none", "off", ""):
        return "none", None
    if str(spec).strip().lower() == "auto":
        return "auto", "auto"
    from pathlib import Path

    path = Path(str(spec)).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise AgentEvalError(f"{spec} is not an adapter directory (no adapter_config.json); "
                             "use auto, none or a trained adapter's directory")
    return str(spec), str(path)


def _check_extra(extra: dict) -> None:
    if not extra:
        return
    from langchain_flashback import ChatFlashBack
    from llama_index.llms.flashback import FlashBack

    for cls in (ChatFlashBack, FlashBack):
        missing = [k for k in extra if k not in cls.model_fields]
        if missing:
            raise AgentEvalError(f"{cls.__name__} has no field {', '.join(missing)} in this version")


def default_llm(framework: str, model: str, adapter: str | None, max_tokens: int, extra: dict) -> Any:
    """``ChatFlashBack`` / LlamaIndex ``FlashBack`` with these settings (weights loaded now)."""
    if framework == "langchain":
        from langchain_flashback import ChatFlashBack

        llm = ChatFlashBack(model=model, adapter=adapter, max_tokens=max_tokens, **extra)
        llm.engine  # noqa: B018 - load now: a bad model or adapter fails here, not once per question
        return llm
    from llama_index.llms.flashback import FlashBack

    return FlashBack(model, adapter=adapter, max_tokens=max_tokens, **extra)


def evaluate_agents(questions: Sequence[Question] | None = None, *, adapters: Sequence[str | None] = ("auto",),
                    frameworks: Sequence[str] = FRAMEWORKS, model: str | None = None, max_tokens: int = 256,
                    max_steps: int = MAX_STEPS, extra: dict | None = None, system_prompt: str | None = None,
                    threads: int | None = None, progress: bool = True,
                    llm_factory: Callable[[str, str | None], Any] | None = None) -> AgentEvalResult:
    """Run every question through every framework, once per adapter, and score the runs.

    ``adapters``: ``"auto"`` (the shipped default), ``"none"`` / None, or adapter directories; engines
    are released after each adapter. ``extra``: more fields for both LLM classes (e.g.
    ``{"repeat_calls": "forbid"}``; checked to exist). ``llm_factory(framework, adapter)``: build the
    LLM yourself (tests); then ``model``, ``max_tokens`` and ``extra`` are not used.
    """
    from tqdm.auto import tqdm

    qs = list(questions) if questions is not None else list(QUESTIONS)
    fws = list(dict.fromkeys(frameworks))
    bad = [f for f in fws if f not in FRAMEWORKS]
    if bad or not fws:
        raise AgentEvalError(f"frameworks must be among {', '.join(FRAMEWORKS)}, got {list(frameworks)}")
    if max_steps < 1:
        raise AgentEvalError(f"max_steps must be >= 1, got {max_steps}")
    if max_tokens < 1:
        raise AgentEvalError(f"max_tokens must be >= 1, got {max_tokens}")
    extra = dict(extra or {})
    model = model or DEFAULT_MODEL
    specs = [adapter_arg(a) for a in (adapters or [None])]
    if llm_factory is None:
        _check_extra(extra)
    if threads is not None:
        if threads < 1:
            raise AgentEvalError(f"threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    adapter_rows = []
    for label, arg in specs:
        resolved = resolve_adapter(model, arg)
        adapter_rows.append({"label": label, "adapter": arg, "path": str(resolved) if resolved is not None else None})
    result = AgentEvalResult(model=model, adapters=adapter_rows, frameworks=fws, max_steps=max_steps,
                             max_tokens=max_tokens, extra=extra, system_prompt=system_prompt, threads=threads,
                             questions=[q.id for q in qs])
    t0 = time.perf_counter()
    bar = tqdm(total=len(specs) * len(fws) * len(qs), desc="eval agents", disable=not progress, unit="run")
    try:
        for label, arg in specs:
            for fw in fws:
                llm = (llm_factory(fw, arg) if llm_factory is not None
                       else default_llm(fw, model, arg, max_tokens, extra))
                for q in qs:
                    bar.set_postfix_str(f"{label} {fw} {q.id}", refresh=False)
                    run = RUNNERS[fw](q, llm, max_steps=max_steps, system_prompt=system_prompt, adapter_label=label)
                    run.scores = score_run(q, run)
                    result.runs.append(run)
                    bar.update(1)
            if llm_factory is None and len(specs) > 1:
                from ..engines import release_engines

                release_engines()
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result
