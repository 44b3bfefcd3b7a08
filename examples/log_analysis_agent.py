"""Log-analysis agent: a LangChain tool loop over ChatFlashBack, offline on the default model.

Run from the repository root (``make demo`` runs the first line):

    python -m examples.log_analysis_agent                      (the sample log, examples/sample_data/app.log)
    python -m examples.log_analysis_agent --log /var/log/syslog --question "Which component logs most?"

The model calls tools that compute exact answers (``tools/logtools.py``: regex search, line counts by
level / component / time window, line templates; the log's format is inferred from the log itself),
then ``final_answer``. Each tool result goes back as a ``ToolMessage``, which ChatFlashBack appends
marker-wrapped at the end of the cached context (the FlashBack append layout): every step computes
only the new tokens, and the console shows tokens computed vs reused per step.

A 135M model needs guard rails; three are enough here: every call is grammar-constrained
(``bind_tools(..., tool_choice=...)``: it always parses and names a tool), the first tool is picked
from the question's words, and the last step is forced to ``final_answer``. An answer that quotes
no number of the tool results is replaced by the result itself (printed as "composed").

The measured agent (argument repair, answer composition, ``--eval`` on Loghub) is
``tools/log_agent.py``; see docs/guide.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_flashback import ChatFlashBack

from tools.logtools import SAMPLE_LOG, LogError, LogFile, ToolOutput, count_lines, read_log, search_logs, top_templates

# One question, one tool: questions that need two tool calls (count, then group) are where the
# default 135M model still fails (docs/benchmarks.md, section 9); ask one with --question to see it.
DEFAULT_QUESTION = "Which component reports the most ERROR lines?"
SYSTEM = ("You are a log analyst. Use a tool to get facts, for example search_logs with pattern \"ERROR\", "
          "or count_lines by \"level\". Then call final_answer quoting the numbers and line numbers "
          "(like L12) from the tool results.")


def _fn(name: str, description: str, properties: dict) -> dict:
    """An OpenAI-style tool schema (every argument required; ChatFlashBack constrains the call to it)."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}


PATTERN = {"type": "string", "maxLength": 32, "description": "optional regex filter ('' = all lines)"}
TOOLS = [
    _fn("search_logs", "Regex search: how many lines match, and the first ones with line numbers.",
        {"pattern": {"type": "string", "maxLength": 32, "description": "regular expression, e.g. ERROR"}}),
    _fn("count_lines", "Exact line counts by level, component or time window, optionally only lines matching a regex.",
        {"by": {"type": "string", "enum": ["level", "component", "time"]}, "pattern": PATTERN}),
    _fn("top_templates", "Group similar lines into templates; the most frequent templates with counts.",
        {"pattern": PATTERN}),
    _fn("final_answer", "Give the final answer, quoting numbers and line numbers from the tool results.",
        {"answer": {"type": "string", "maxLength": 100}}),
]


def run_tool(log: LogFile, name: str, args: dict) -> ToolOutput:
    """Run one tool call on the log (a tool error is a result the model reads, not a crash)."""
    pattern = str(args.get("pattern") or "")
    if name == "search_logs":
        return search_logs(log, pattern)
    if name == "count_lines":
        return count_lines(log, str(args.get("by") or "level"), pattern)
    if name == "top_templates":
        return top_templates(log, 5, pattern)
    return ToolOutput(f"Unknown tool {name!r}.", f"Unknown tool {name!r}.")


def first_tool(question: str) -> str:
    """The tool for the first step, from the question's words (the model fills in its arguments)."""
    q = question.lower()
    if re.search(r"\b(template|kinds? of|types? of|common|frequent|group)", q):
        return "top_templates"
    if re.search(r"\b(how many|count|number of|per (hour|minute|day)|most|least|which|busiest)\b", q):
        return "count_lines"
    return "search_logs"


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", text or "")}


@dataclass
class Step:
    """One model call: the tool it called, what it cost and what the tool said."""

    tool: str
    args: dict
    input_tokens: int
    reused: int
    computed: int
    seconds: float
    result: str = ""


@dataclass
class Result:
    answer: str
    source: str  # "model" (its final_answer quotes the tool results' numbers) or "composed" (a tool result)
    steps: list[Step] = field(default_factory=list)

    @property
    def tokens_computed(self) -> int:
        return sum(s.computed for s in self.steps)

    @property
    def tokens_reused(self) -> int:
        return sum(s.reused for s in self.steps)


def run_agent(log: LogFile, question: str = DEFAULT_QUESTION, max_steps: int = 4,
              llm: ChatFlashBack | None = None, out=print) -> Result:
    """The tool loop: at most ``max_steps`` model calls, the last one ``final_answer``."""
    llm = llm or ChatFlashBack(max_tokens=256)
    out(f"log: {log.describe()}")
    out(f"question: {question}")
    messages: list = [SystemMessage(SYSTEM), HumanMessage(f"Log {log.path.name}: {len(log.lines)} lines.\n"
                                                          f"Question: {question}")]
    steps: list[Step] = []
    results: list[ToolOutput] = []
    model_answer = ""
    for n in range(1, max_steps + 1):
        if n == max_steps:  # the step budget ends: ask for the answer, and force final_answer
            choice = "final_answer"
            messages.append(HumanMessage(f"Question: {question}\nCall final_answer with the answer in one "
                                         "sentence, quoting the numbers and names from the tool results."))
        else:  # step 1: the routed tool; later steps: any tool, final_answer included
            choice = first_tool(question) if n == 1 else "any"
        t0 = time.perf_counter()
        ai = llm.bind_tools(TOOLS, tool_choice=choice).invoke(messages)
        messages.append(ai)
        usage = ai.usage_metadata or {}
        step = Step("final_answer", {}, usage.get("input_tokens", 0),
                    (usage.get("input_token_details") or {}).get("cache_read", 0),
                    ai.response_metadata.get("computed_tokens", 0), time.perf_counter() - t0)
        steps.append(step)
        call = (ai.tool_calls or [{"name": "final_answer", "args": {"answer": ai.content}, "id": ""}])[0]
        step.tool, step.args = call["name"], dict(call.get("args") or {})
        args = ", ".join(f"{k}={v!r}" for k, v in step.args.items())
        out(f"step {n}: {step.tool}({args})" + (f"  [tool chosen for it: {choice}]" if choice != "any" else ""))
        out(f"   tokens: computed {step.computed}, reused {step.reused} of {step.input_tokens} prompt tokens "
            f"({step.seconds:.2f}s)")
        if step.tool == "final_answer":
            model_answer = str(step.args.get("answer", "")).strip()
            break
        result = run_tool(log, step.tool, step.args)
        results.append(result)
        step.result = result.summary
        out(f"   result: {result.summary}")
        messages.append(ToolMessage(result.text, tool_call_id=call.get("id") or "", name=step.tool))
    # The answer must rest on the tools: every number it quotes comes from a result, and it quotes one.
    facts = set().union(*(numbers(r.text) for r in results)) if results else set()
    if numbers(model_answer) and numbers(model_answer) <= facts:
        res = Result(model_answer, "model", steps)
    else:
        res = Result(results[-1].summary if results else "No tool result to answer from.", "composed", steps)
        out(f"   (the model's answer {model_answer!r} quotes no number of the tool results: "
            "the answer is the last tool result)")
    out(f"\nfinal answer ({res.source}): {res.answer}")
    out(f"total: {len(steps)} model calls, computed {res.tokens_computed} tokens, reused {res.tokens_reused} "
        "from the cache")
    return res


def main(argv: Sequence[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=str(SAMPLE_LOG), help="log file to analyse (default: the sample log)")
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see flashback_agents.load_model)")
    ap.add_argument("--max-steps", type=int, default=4, help="model calls at most (the last one is final_answer)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy, shared CPU)")
    a = ap.parse_args(argv)
    if a.max_steps < 2:
        ap.error("--max-steps must be at least 2 (one tool call, then final_answer)")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        log = read_log(a.log)
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return run_agent(log, a.question, a.max_steps, ChatFlashBack(model=a.model, max_tokens=256))


if __name__ == "__main__":
    main()
