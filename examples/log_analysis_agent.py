"""Log-analysis agent: a LangChain tool loop over ChatFlashBack, offline on the default model.

Run:  python examples/log_analysis_agent.py                     (the sample log in sample_data/app.log)
      python examples/log_analysis_agent.py --log /var/log/syslog --question "Which component logs most?"

Tools: ``search_logs`` (regex, numbered lines), ``count_lines`` (by level / component / time window),
``top_templates`` (similar lines grouped with Drain, drain3), ``semantic_search`` (log chunks in Chroma,
indexed on first use) and ``final_answer``. Every tool result goes back to the model as a ToolMessage,
which ChatFlashBack appends marker-wrapped at the end of the context (FlashBack append layout), so each
step computes only the new tokens: the console shows tokens computed vs reused per step.

How a weak model (SmolLM2-135M) is kept honest:

- Every call is grammar-constrained (``bind_tools(tool_choice="any")``): it always parses, and it
  always names one of the tools. The last step is forced to ``final_answer``, so the loop ends
  within ``--max-steps``.
- The first tool is picked by a keyword route from the question (count / templates / meaning /
  regex search; ``--no-route`` lets the model pick it); the model fills its arguments under the
  grammar and picks every later tool itself. If it wants to answer before any tool ran, that reply
  is dropped and the routed tool is forced. A repeated identical call ends the loop (final_answer).
- Before the final call a short user turn asks for a one-sentence answer with the numbers
  (appended at the end, so the cache stays valid).
- The answer must come from tool results. If the model's ``final_answer`` text quotes no number,
  or a number no tool returned, the printed answer is *composed from the tool results* (their
  one-line summaries, most recent last) and the model's own text is shown beside it, labelled.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from logtools import (SAMPLE_LOG, LogError, LogFile, ReadLimits, SemanticIndex, ToolOutput,  # noqa: E402
                      count_lines, count_values, read_log, search_logs, top_templates)

DEFAULT_QUESTION = "How many ERROR lines are in this log, and which component reports them most?"
# The system block (and the tool schemas rendered after it) is the same for every log and question, so
# it stays cached across runs in one process; what is specific to the log goes in the user message.
SYSTEM = ("You are a log analyst. Use a tool to get facts, for example search_logs with pattern \"ERROR\", "
          "or count_lines by \"level\". Then call final_answer quoting the numbers and line numbers "
          "(like L12) from the tool results.")
USER = "Log {name}: {n} lines. Levels in it: {levels}. Components: {components}.\nQuestion: {question}"


def user_message(log: LogFile, question: str) -> str:
    """The question, preceded by what the log contains (names only, no counts: numbers come from tools)."""
    def names(by: str) -> str:
        c = count_values(log, by)
        c.pop("(none)", None)
        return ", ".join(str(k) for k, _ in c.most_common(6)) or "none"

    return USER.format(name=log.path.name, n=len(log.lines), levels=names("level"),
                       components=names("component"), question=question)


def _fn(name: str, description: str, properties: dict, required: Sequence[str] = ()) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(required), "additionalProperties": False}}}


TOOLS: list[dict] = [
    _fn("search_logs", "Regex search (case-sensitive if it has capitals): how many lines match, and the first ones with line numbers.",
        {"pattern": {"type": "string", "maxLength": 32, "description": "regular expression, e.g. ERROR"}}, ["pattern"]),
    _fn("count_lines", "Exact line counts by level, component or time window, optionally only lines matching a regex.",
        {"by": {"type": "string", "enum": ["level", "component", "time"]},
         "pattern": {"type": "string", "maxLength": 32, "description": "optional regex filter ('' = all lines)"}},
        ["by", "pattern"]),
    _fn("top_templates", "Group similar lines into templates; the most frequent templates with counts.",
        {"pattern": {"type": "string", "maxLength": 32, "description": "optional regex filter ('' = all lines)"}},
        ["pattern"]),
    _fn("semantic_search", "Find the log lines closest in meaning to a description.",
        {"query": {"type": "string", "maxLength": 80}}, ["query"]),
    _fn("final_answer", "Give the final answer, quoting numbers and line numbers from the tool results.",
        {"answer": {"type": "string", "maxLength": 100}}, ["answer"]),
]
ANALYSIS_TOOLS = [t["function"]["name"] for t in TOOLS if t["function"]["name"] != "final_answer"]


@dataclass
class AgentConfig:
    """Options of one run (the command-line flags)."""

    log: str | None = None
    question: str = DEFAULT_QUESTION
    model: str = "smollm2-135m-instruct"
    adapter: str | None = None
    max_steps: int = 5
    max_tokens: int = 256
    store: str | None = None  # Chroma directory for semantic search (default: a cache directory)
    max_bytes: int = ReadLimits.max_bytes
    max_lines: int = ReadLimits.max_lines
    route_first: bool = True  # step 1 calls the tool a keyword route picks (the model fills its arguments)
    threads: int | None = None  # torch CPU threads (1 is faster on a busy, shared CPU)
    quiet: bool = False


@dataclass
class StepRecord:
    """One model call: the tool it called, what it cost and what the tool said."""

    step: int
    tool: str
    args: dict
    input_tokens: int
    cache_read: int
    computed: int
    output_tokens: int
    seconds: float
    forced: str = ""  # why the tool choice was forced ("" when the model chose freely among all tools)
    summary: str = ""
    lines: list[int] = field(default_factory=list)
    dropped: bool = False  # a repeated call, left out of the conversation (its generation prompt is not reused)


@dataclass
class AgentResult:
    """The answer, where it came from, and per-step accounting."""

    answer: str
    answer_source: str  # "model" (its final_answer text was grounded) or "composed" (from tool results)
    model_answer: str
    steps: list[StepRecord]
    log_description: str
    cited_lines: list[int]
    seconds: float

    @property
    def tokens_computed(self) -> int:
        return sum(s.computed for s in self.steps)

    @property
    def tokens_reused(self) -> int:
        return sum(s.cache_read for s in self.steps)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_computed=self.tokens_computed, tokens_reused=self.tokens_reused)
        return d


# ------------------------------------------------------------------------------------ helpers
_NUM = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def numbers(text: str) -> set[str]:
    return {m.group(0).replace(",", "") for m in _NUM.finditer(text or "")}


def grounded(answer: str, outputs: Sequence[ToolOutput], echoed: str = "") -> bool:
    """True when the answer quotes at least one number and every number it quotes came from a tool.

    Numbers the model itself put in its tool arguments (``echoed``) do not count as tool facts.
    """
    quoted = numbers(answer)
    if not answer.strip() or not quoted:
        return False
    seen = set().union(*(numbers(o.text) for o in outputs)) if outputs else set()
    return quoted <= seen and not (quoted & numbers(echoed))


def compose_answer(outputs: Sequence[tuple[str, dict, ToolOutput]], limit: int = 3) -> str:
    """An answer built from the tool results' one-line summaries (most recent last)."""
    parts, seen = [], set()
    for name, args, out in list(outputs)[-limit:]:
        if out.summary in seen:
            continue
        seen.add(out.summary)
        parts.append(out.summary)
    return " ".join(parts) if parts else "No tool result to answer from."


def route(question: str) -> str:
    """A tool for the first step when the model wants to answer before using any tool."""
    q = question.lower()
    if re.search(r"\b(how many|count|number of|per (hour|minute|day)|most|least|which (level|component)|"
                 r"distribution|breakdown)\b", q):
        return "count_lines"
    if re.search(r"\b(template|kinds? of|types? of|common|frequent|group|summar)", q):
        return "top_templates"
    if re.search(r"\b(about|related|similar|mention|why|cause)\b", q):
        return "semantic_search"
    return "search_logs"


def default_store() -> Path:
    from flashback_agents import cache_dir

    return Path(cache_dir()) / "examples" / "log-index"


class LogToolbox:
    """Binds the tools to one log; dispatches a call by name; unknown args are ignored, not fatal."""

    def __init__(self, log: LogFile, store: Path):
        self.log = log
        self.semantic = SemanticIndex(log, store)

    def call(self, name: str, args: dict) -> ToolOutput:
        args = args or {}
        try:
            if name == "search_logs":
                return search_logs(self.log, str(args.get("pattern", "")))
            if name == "count_lines":
                return count_lines(self.log, str(args.get("by") or "level"), str(args.get("pattern") or ""),
                                   int(args.get("window_minutes") or 60))
            if name == "top_templates":
                return top_templates(self.log, 5, str(args.get("pattern") or ""))
            if name == "semantic_search":
                return self.semantic.search(str(args.get("query", "")))
        except Exception as exc:  # a tool failure goes back to the model as a result, not a crash
            msg = f"{name} failed: {type(exc).__name__}: {exc}"
            return ToolOutput(msg, msg)
        msg = f"Unknown tool {name!r}; use one of {ANALYSIS_TOOLS + ['final_answer']}."
        return ToolOutput(msg, msg)


def _usage(ai: Any) -> tuple[int, int, int, int]:
    u = ai.usage_metadata or {}
    inp = int(u.get("input_tokens", 0))
    read = int((u.get("input_token_details") or {}).get("cache_read", 0))
    computed = int((ai.response_metadata or {}).get("computed_tokens", inp - read))
    return inp, read, computed, int(u.get("output_tokens", 0))


def _memo_entry(llm: Any, ai: Any) -> dict[str, list[int]]:
    """The engine's remembered token ids for this reply (keyed as the engine keys them)."""
    from langchain_flashback.chat_models import to_flashback_messages

    try:
        key = to_flashback_messages([ai])[0].key()
        ids = llm.engine.layout.memo.get(key)
    except Exception:  # noqa: BLE001 - an optimisation only
        return {}
    return {key: list(ids)} if ids else {}


def _restore_memo(llm: Any, ai: Any, memo: dict[str, list[int]]) -> None:
    from langchain_flashback.chat_models import to_flashback_messages

    try:
        key = to_flashback_messages([ai])[0].key()
        if key in memo:
            llm.engine.layout.memo.put(key, memo[key])
    except Exception:  # noqa: BLE001
        pass


def _fmt_args(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (args or {}).items())


# ------------------------------------------------------------------------------------ the loop
def run_agent(cfg: AgentConfig, log: LogFile | None = None, out=print) -> AgentResult:
    """Run the tool loop; ``out`` receives the console lines (``print`` by default)."""
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_flashback import ChatFlashBack

    if cfg.max_steps < 2:
        raise ValueError("--max-steps must be at least 2 (one tool call, then final_answer).")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if log is None:
        log = read_log(cfg.log or SAMPLE_LOG, ReadLimits(max_bytes=cfg.max_bytes, max_lines=cfg.max_lines))
    box = LogToolbox(log, Path(cfg.store) if cfg.store else default_store())
    say = (lambda *a: None) if cfg.quiet else out
    say(f"log: {log.describe()}")
    say(f"question: {cfg.question}")
    llm = ChatFlashBack(model=cfg.model, adapter=cfg.adapter, max_tokens=cfg.max_tokens)
    messages: list = [SystemMessage(SYSTEM), HumanMessage(user_message(log, cfg.question))]
    steps: list[StepRecord] = []
    outputs: list[tuple[str, dict, ToolOutput]] = []
    calls_seen: dict[str, int] = {}
    force_final = False
    model_answer = ""
    memo: dict[str, list[int]] = {}
    for step in range(1, cfg.max_steps + 1):
        forced = ""
        choice = "any"
        if step == cfg.max_steps or force_final:
            choice, forced = "final_answer", ("step budget" if step == cfg.max_steps else "repeated call")
            messages.append(HumanMessage(f"Now call final_answer: answer \"{cfg.question}\" in one sentence "
                                         "with the numbers from the tool results."))
        elif step == 1 and cfg.route_first:
            choice = route(cfg.question)
            forced = f"first tool by keyword route -> {choice}"
        t1 = time.perf_counter()
        ai = llm.bind_tools(TOOLS, tool_choice=choice).invoke(messages)
        calls = ai.tool_calls or []
        if (not outputs and choice == "any" and (not calls or calls[0]["name"] == "final_answer")):
            # The model wants to answer before any tool ran: drop that reply, force a tool (still constrained).
            choice = route(cfg.question)
            forced = f"no tool used yet -> {choice} (keyword route)"
            ai = llm.bind_tools(TOOLS, tool_choice=choice).invoke(messages)
            calls = ai.tool_calls or []
        seconds = time.perf_counter() - t1
        inp, read, computed, out_toks = _usage(ai)
        messages.append(ai)
        call = calls[0] if calls else {"name": "final_answer", "args": {"answer": ai.content or ""}, "id": ""}
        name, args = call["name"], dict(call.get("args") or {})
        rec = StepRecord(step, name, args, inp, read, computed, out_toks, seconds, forced)
        steps.append(rec)
        say(f"step {step}: {name}({_fmt_args(args)})" + (f"  [forced: {forced}]" if forced else ""))
        say(f"   tokens: computed {computed}, reused {read} of {inp} prompt tokens; generated {out_toks}"
            f"  ({seconds:.2f}s)")
        if name == "final_answer":
            model_answer = str(args.get("answer", ""))
            break
        key = f"{name}|{sorted(args.items())}"
        if key in calls_seen:
            # A repeated identical call: drop it and answer next. (Workaround: the engine's reply memo is
            # keyed by text, so a second identical reply would overwrite the first one's token ids and
            # the next prompt would miss the cache at the first reply; restore the first ids.)
            messages.pop()
            _restore_memo(llm, ai, memo)
            rec.summary = f"same call as step {calls_seen[key]}: not run again"
            rec.dropped = True
            force_final = True
        else:
            calls_seen[key] = step
            memo.update(_memo_entry(llm, ai))
            for extra in calls:  # the grammar allows one call; answer every call the message carries anyway
                result = box.call(extra["name"], dict(extra.get("args") or {}))
                outputs.append((extra["name"], dict(extra.get("args") or {}), result))
                messages.append(ToolMessage(result.text, tool_call_id=extra.get("id") or "", name=extra["name"]))
                if extra is call:
                    rec.summary, rec.lines = result.summary, list(result.lines)
        say(f"   result: {rec.summary}")
    tool_outputs = [o for _, _, o in outputs]
    echoed = " ".join(str(v) for _, args, _ in outputs for v in args.values())
    if grounded(model_answer, tool_outputs, echoed):
        answer, source = model_answer, "model"
    else:
        answer, source = compose_answer(outputs), "composed"
    cited = sorted({int(m) for m in re.findall(r"\bL(\d+)\b", answer)} |
                   ({ln for o in tool_outputs[-1:] for ln in o.lines[:5]} if source == "composed" else set()))
    result = AgentResult(answer, source, model_answer, steps, log.describe(), cited, time.perf_counter() - t0)
    say("")
    say(f"final answer: {answer}")
    if source == "composed":
        say(f"   (composed from the tool results: the model's final_answer text {model_answer!r} "
            "quoted no number from them)")
    say(f"total: {len(steps)} model calls, computed {result.tokens_computed} tokens, "
        f"reused {result.tokens_reused} from the cache, {result.seconds:.1f}s")
    return result


def parse_args(argv: Sequence[str] | None) -> AgentConfig:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", help="log file to analyse (default: the sample log in examples/sample_data)")
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see flashback_agents.load_model)")
    ap.add_argument("--adapter", help="directory of a trained FlashBack adapter")
    ap.add_argument("--max-steps", type=int, default=5, help="model calls at most (the last one is final_answer)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--store", help="Chroma directory for semantic search (default: a cache directory)")
    ap.add_argument("--max-bytes", type=int, default=ReadLimits.max_bytes, help="read at most this many bytes")
    ap.add_argument("--max-lines", type=int, default=ReadLimits.max_lines, help="read at most this many lines")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy, shared CPU)")
    ap.add_argument("--no-route", action="store_true",
                    help="let the model pick the first tool too (by default a keyword route picks it)")
    a = ap.parse_args(argv)
    if a.max_steps < 2:
        ap.error("--max-steps must be at least 2 (one tool call, then final_answer)")
    if a.max_bytes < 1 or a.max_lines < 1:
        ap.error("--max-bytes and --max-lines must be positive")
    return AgentConfig(a.log, a.question, a.model, a.adapter, a.max_steps, a.max_tokens, a.store,
                       a.max_bytes, a.max_lines, not a.no_route, a.threads)


def main(argv: Sequence[str] | None = None) -> AgentResult | None:
    """Command-line entry point; returns the result (for tests) or exits with a clear message."""
    cfg = parse_args(argv)
    try:
        log = read_log(cfg.log or SAMPLE_LOG, ReadLimits(max_bytes=cfg.max_bytes, max_lines=cfg.max_lines))
        return run_agent(cfg, log)
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:
        from flashback_agents import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
