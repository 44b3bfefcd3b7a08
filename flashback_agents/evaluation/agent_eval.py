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

This module checks the options and runs the evaluation (:func:`evaluate_agents`); its parts are
``agent_scoring`` (records, scores), ``agent_runners`` (the two agent loops) and ``agent_report``
(aggregation, table). Their public names are re-exported here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..engines import release_engines
from ..errors import FlashBackError
from ..models import DEFAULT_MODEL, resolve_adapter
from .agent_questions import CATEGORIES, QUESTIONS, Question
from .agent_report import METRICS, TARGETS, AgentEvalResult, aggregate, format_table, must_show
from .agent_runners import RUNNERS, langchain_recursion_limit, run_langchain, run_llamaindex
from .agent_scoring import MAX_STEPS, NO_CALL_CATEGORIES, RunRecord, answer_ok, args_match, numbers_in, score_run

__all__ = ["AgentEvalError", "AgentEvalResult", "RunRecord", "FRAMEWORKS", "MAX_STEPS", "METRICS",
           "NO_CALL_CATEGORIES", "RUNNERS", "TARGETS", "adapter_arg", "aggregate", "answer_ok", "args_match",
           "default_llm", "evaluate_agents", "format_table", "langchain_recursion_limit", "must_show", "numbers_in",
           "run_langchain", "run_llamaindex", "score_run", "select_questions"]

FRAMEWORKS = ("langchain", "llamaindex")


class AgentEvalError(ValueError, FlashBackError):
    """Bad options for the agent evaluation (the message says which)."""


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
                    llm_factory: Callable[[str, str | None], Any] | None = None,
                    tools_for: Callable[[Question], Sequence[Callable[..., Any]]] | None = None) -> AgentEvalResult:
    """Run every question through every framework, once per adapter, and score the runs.

    ``adapters``: ``"auto"`` (the shipped default), ``"none"`` / None, or adapter directories; engines
    are released after each adapter. ``extra``: more fields for both LLM classes (e.g.
    ``{"repeat_calls": "forbid"}``; checked to exist). ``llm_factory(framework, adapter)``: build the
    LLM yourself (tests); then ``model``, ``max_tokens`` and ``extra`` are not used. ``tools_for(question)``:
    the functions to bind for a question not in :mod:`.agent_tools` (e.g. generator episodes).
    """
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
                    run = RUNNERS[fw](q, llm, max_steps=max_steps, system_prompt=system_prompt, adapter_label=label,
                                      tools=tools_for(q) if tools_for is not None else None)
                    run.scores = score_run(q, run)
                    result.runs.append(run)
                    bar.update(1)
            if llm_factory is None and len(specs) > 1:
                release_engines()
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result
