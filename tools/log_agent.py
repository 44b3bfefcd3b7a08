"""The full log-analysis agent behind the evaluation: a LangChain tool loop over ChatFlashBack.

``examples/log_analysis_agent.py`` is the short version to read; this one adds what the measured
runs use (``python -m tools.log_agent_eval``, docs/benchmarks.md) and what the adapter's transcripts
are recorded from (``tools/agent_transcripts.py``).

Tools: ``search_logs`` (regex, numbered lines), ``count_lines`` (by level / component / time window),
``top_templates`` (similar lines grouped with Drain, drain3), ``semantic_search`` (log chunks in Chroma,
indexed on first use) and ``final_answer``. Every tool result goes back to the model as a ToolMessage,
which ChatFlashBack appends marker-wrapped at the end of the context (FlashBack append layout), so each
step computes only the new tokens: the console shows tokens computed vs reused per step.

The log's format is inferred from the log itself (``tools/logformat.py``: timestamp, level, component,
pid, ...); the first line printed says which format and how many lines fit it.

How a weak model (SmolLM2-135M) is kept honest:

- Every call is grammar-constrained (``bind_tools(tool_choice="any")``): it always parses, and it
  always names one of the tools. The last step is forced to ``final_answer``, so the loop ends
  within ``--max-steps``.
- The first tool is picked by a keyword route from the question (templates / count / meaning /
  regex search; ``--no-route`` lets the model pick it); the model fills its arguments under the
  grammar and picks every later tool itself. If it wants to answer before any tool ran, that reply
  is dropped and the routed tool is forced.
- Tools forgive: filters are case-insensitive, an invalid regex comes back as a short error, a
  filter that matches nothing is reported and all lines are counted, and every result leads with
  the answer (the top value and its count). ``count_lines`` takes the field the question names and
  drops a filter word the question does not contain (printed as ``repaired:``; ``--no-repair``).
- A repeated identical call is answered from the earlier result (not run again), and the model is
  then asked for the final answer with that result quoted in the last user turn.
- The answer must come from tool results. If the model's ``final_answer`` text quotes no number of a
  result, or a number no tool returned, the printed answer is *composed* from the result that
  answers the question. The printout says which source answered ("model" or "composed") and which
  tool result the answer rests on.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tools.logformat import SEVERITIES  # noqa: E402
from tools.logtools import (  # noqa: E402
    SAMPLE_LOG,
    LogError,
    LogFile,
    ReadLimits,
    SemanticIndex,
    ToolOutput,
    count_lines,
    count_values,
    read_log,
    search_logs,
    top_templates,
)

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
    no_adapter: bool = False  # --no-adapter: ask for the bare model (adapter=None passed explicitly)
    repair: bool = True  # set count_lines' field / drop invented filters from the question (reported)


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
    dropped: bool = False  # a repeated call: not run again, answered from the earlier result
    repaired: str = ""  # arguments set from the question (what changed and why)
    result_index: int = -1  # index of this step's result among the tool results


@dataclass
class AgentResult:
    """The answer, where it came from, and per-step accounting."""

    answer: str
    answer_source: str  # "model" (its final_answer text was grounded) or "composed" (from tool results)
    model_answer: str
    basis: str  # the tool result the answer rests on ("step 1: count_lines(by='component', pattern='')")
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
    facts = set().union(*(numbers(o.summary) for o in outputs)) if outputs else set()
    # every number from a tool, at least one of them a result's own finding (not e.g. the format note's "100%")
    return quoted <= seen and bool(quoted & facts) and not (quoted & numbers(echoed))


_FIELD_WORDS = {
    "component": r"component|components|program|module|service|source|process|daemon|class|logger",
    "level": r"level|levels|severity",
    "time": r"per (?:hour|minute|day)|hourly|time window|over time|busiest (?:hour|time)",
}


def clean_answer(text: str) -> str:
    """The model's answer without stray tool-call markup a small model copies into it."""
    text = re.sub(r"</?tool_call>", " ", text)
    return re.sub(r"^[^\w<]+", "", text).strip()


def question_field(question: str) -> str | None:
    """The one field (level / component / time) a question asks about, if it names exactly one."""
    q = question.lower()
    hits = [f for f, rx in _FIELD_WORDS.items() if re.search(rf"\b(?:{rx})\b", q)]
    return hits[0] if len(hits) == 1 else None


def route(question: str) -> str:
    """A tool for the first step (the model fills its arguments under the grammar)."""
    q = question.lower()
    if re.search(r"\b(template|kinds? of|types? of|common|frequent|group|summar|pattern of)", q):
        return "top_templates"
    if re.search(r"\b(how many|count|number of|per (hour|minute|day)|most|least|which (level|component)|"
                 r"distribution|breakdown|busiest)\b", q):
        return "count_lines"
    if re.search(r"\b(about|related|similar|mention|why|cause)\b", q):
        return "semantic_search"
    return "search_logs"


# Words of a question that are no filter: the fields and what every question says ("how many lines ...").
_NOT_FILTERS = frozenset("""level levels severity component components program module service source time
line lines log logs count counts number many much most least top which what how have has is are the a of
in per template templates message messages frequent common kind kinds type types event events""".split())


def repair_args(name: str, args: dict, question: str) -> tuple[dict, str]:
    """Arguments a small model got wrong, set from the question; returns (args, what was changed).

    ``count_lines``: ``by`` follows the field the question names; a filter pattern the question does
    not contain (an invented word such as 'log_level_name') or that names a field ('component') is
    replaced with the severity the question names in capitals ('ERROR'), else dropped.
    ``top_templates``: the same for its filter. Every change is reported in the step's record and
    printout.
    """
    fixed, notes = dict(args), []
    q = question.lower()
    if name == "count_lines":
        want = question_field(question)
        if want and fixed.get("by") != want:
            notes.append(f"by {fixed.get('by')!r} -> {want!r} (the question asks about {want})")
            fixed["by"] = want
    if name in ("count_lines", "top_templates"):
        pat = str(fixed.get("pattern") or "")
        why = None
        if pat and not re.search(rf"(?<!\w){re.escape(pat.lower())}(?!\w)", q):
            why = "not in the question"
        elif pat and pat.lower() in _NOT_FILTERS:
            why = "it names a field, not a value to filter on"
        if why:
            level = question_level(question)
            fixed["pattern"] = level or ""
            notes.append(f"pattern {pat!r} -> {level!r} ({why}; the question names level {level})" if level
                         else f"pattern {pat!r} dropped ({why})")
    return fixed, "; ".join(notes)


def question_level(question: str) -> str | None:
    """A severity the question names in capitals ("How many ERROR lines ..."), as written: the filter
    a wrong pattern is replaced with (lower-case words such as "note" or "fail" are plain English)."""
    return next((w for w in re.findall(r"(?<![\w.])[A-Z]{2,}(?![\w.])", question) if w in SEVERITIES), None)


def _question_values(question: str, counts: dict) -> list[str]:
    """The counted values (levels, components) that the question names, as whole words."""
    q = question.lower()
    named = [k for k in counts if k != "(none)" and re.search(rf"(?<![\w.]){re.escape(str(k).lower())}(?![\w.])", q)]
    # "chrome.exe *64" names chrome.exe *64, not also chrome.exe: drop names inside a longer named one
    return [k for k in named if not any(k != o and str(k).lower() in str(o).lower() for o in named)]


def direct_answer(question: str, out: ToolOutput) -> str:
    """The sentence of a tool result that answers this question (a named value's count, else the top)."""
    counts = out.data.get("counts")
    if counts:
        n, by = out.data.get("total", 0), out.data.get("by", "value")
        named = _question_values(question, counts)
        if named:
            return "; ".join(f"{counts[k]} of {n} lines have {by} {k}" for k in named) + "."
        ranked = sorted(((k, v) for k, v in counts.items() if k != "(none)"), key=lambda kv: -kv[1])
        if ranked:
            return f"The top {by} is {ranked[0][0]} with {ranked[0][1]} of {n} lines."
    return out.summary


def answer_key(question: str, out: ToolOutput) -> tuple[set[str], str | None]:
    """What an answer to this question from this result must quote: its numbers, and the name it
    finds (the top component, the template) unless the question itself names the value."""
    counts = out.data.get("counts")
    if counts:
        named = _question_values(question, counts)
        if named:
            return {str(counts[k]) for k in named}, None
        ranked = sorted(((k, v) for k, v in counts.items() if k != "(none)"), key=lambda kv: -kv[1])
        if ranked:
            return {str(ranked[0][1])}, str(ranked[0][0])
    templates = out.data.get("templates")
    if templates:
        return {str(templates[0]["count"])}, templates[0]["template"]
    return numbers(out.summary), None


def _names_it(answer: str, name: str) -> bool:
    """The answer names the value: the whole name, or most words of a template."""
    a = answer.lower()
    if re.search(rf"(?<![\w.]){re.escape(name.lower())}(?![\w.])", a):
        return True
    words = set(re.findall(r"[a-z][a-z0-9_$.-]*", name.lower().replace("<", " ").replace(">", " ")))
    words -= {"num", "ip", "hex", "blk", "hostport", "*"}
    return len(words) >= 2 and len(words & set(re.findall(r"[a-z][a-z0-9_$.-]*", a))) >= 0.6 * len(words)


def answers_question(answer: str, question: str, out: ToolOutput) -> bool:
    """A model's answer that quotes the result's key number and, where the result finds a name, the name."""
    nums, name = answer_key(question, out)
    if name is None:  # "How many lines have level X?": the count must be the answer's first number
        first = _NUM.search(answer or "")
        return first is not None and first.group(0).replace(",", "") in nums
    return bool(numbers(answer) & nums) and _names_it(answer, name)


def relevant(outputs: Sequence[tuple[str, dict, ToolOutput]], question: str) -> list[ToolOutput]:
    """The results of the kind the question asks for: templates for a template question, counts by the
    field it names for a count question (all results for other questions)."""
    want_tool, want_field = route(question), question_field(question)
    if want_tool == "top_templates":
        return [o for _, _, o in outputs if o.data.get("templates")]
    if want_tool == "count_lines" and want_field:
        return [o for _, _, o in outputs if o.data.get("counts") and o.data.get("by") == want_field]
    return [o for _, _, o in outputs]


def pick_result(outputs: Sequence[tuple[str, dict, ToolOutput]], question: str) -> int:
    """Index of the tool result that best answers the question (a count naming the asked value, a count
    by the asked field, the routed tool), the latest among equals."""
    want_field, want_tool = question_field(question), route(question)

    def score(i: int) -> tuple:
        name, args, out = outputs[i]
        counts = out.data.get("counts") or {}
        return (bool(counts) and bool(_question_values(question, counts)),
                bool(counts) and out.data.get("by") == want_field,
                name == want_tool, not out.summary.startswith(("No line", "Invalid")), i)

    return max(range(len(outputs)), key=score)


def compose_answer(outputs: Sequence[tuple[str, dict, ToolOutput]], question: str = "", limit: int = 2) -> str:
    """An answer built from the tool results: the one that answers the question first, then the latest."""
    if not outputs:
        return "No tool result to answer from."
    best = pick_result(outputs, question)
    parts = [direct_answer(question, outputs[best][2])]
    seen = {parts[0], outputs[best][2].summary}
    for name, args, out in reversed(list(outputs)):
        if len(parts) >= limit:
            break
        if out.summary not in seen and not out.summary.startswith(("No line", "Invalid", "search_logs needs")):
            seen.add(out.summary)
            parts.append(out.summary)
    return " ".join(parts)


def answer_basis(answer: str, outputs: Sequence[tuple[str, dict, ToolOutput]], fallback: int) -> int:
    """Index of the tool result an answer rests on: the one holding most of its numbers (else ``fallback``)."""
    if not outputs:
        return -1
    quoted = numbers(answer)
    best = max(range(len(outputs)), key=lambda i: (len(quoted & numbers(outputs[i][2].text)), i == fallback))
    return best if quoted & numbers(outputs[best][2].text) else fallback


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


def _fmt_args(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (args or {}).items())


# ------------------------------------------------------------------------------------ the loop
def _llm(cfg: AgentConfig) -> Any:
    """The chat model; ``adapter=`` is passed through only when asked (the default is the core's)."""
    from langchain_flashback import ChatFlashBack

    kwargs: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.max_tokens}
    if cfg.adapter:
        kwargs["adapter"] = cfg.adapter
    elif cfg.no_adapter:
        kwargs["adapter"] = None
    return ChatFlashBack(**kwargs)


def final_prompt(question: str, outputs: Sequence[tuple[str, dict, ToolOutput]], steps: Sequence[StepRecord],
                 repeated: int | None = None) -> str:
    """The user turn before the forced final_answer: the result it should rest on, in view, then the ask."""
    lead = f"You asked for the same call as step {repeated}; its result is above. " if repeated else ""
    if not outputs:
        return lead + f"Now call final_answer: answer \"{question}\" in one sentence."
    best = pick_result(outputs, question)
    step = next((s.step for s in steps if s.result_index == best), best + 1)
    return (f"{lead}The tool result of step {step} says: {direct_answer(question, outputs[best][2])}\n"
            f"Question: {question}\nCall final_answer with the answer in one sentence, quoting the numbers "
            "and names from that result.")


def run_agent(cfg: AgentConfig, log: LogFile | None = None, out=print, llm: Any = None) -> AgentResult:
    """Run the tool loop; ``out`` receives the console lines (``print`` by default).

    ``llm``: the chat model (default: ChatFlashBack per ``cfg``); ``tools/agent_transcripts.py`` passes a
    scripted one to record the agent's own prompts as training data.
    """
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage

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
    llm = _llm(cfg) if llm is None else llm
    messages: list = [SystemMessage(SYSTEM), HumanMessage(user_message(log, cfg.question))]
    steps: list[StepRecord] = []
    outputs: list[tuple[str, dict, ToolOutput]] = []
    calls_seen: dict[str, int] = {}
    repeated: int | None = None
    model_answer = ""
    for step in range(1, cfg.max_steps + 1):
        forced = ""
        choice = "any"
        if step == cfg.max_steps or repeated is not None:
            choice, forced = "final_answer", ("step budget" if repeated is None else "repeated call")
            messages.append(HumanMessage(final_prompt(cfg.question, outputs, steps, repeated)))
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
            model_answer = clean_answer(str(args.get("answer", "")))
            break
        key = f"{name}|{sorted(args.items())}"
        if key in calls_seen:
            # A repeated identical call is answered from the earlier result (not run again), and the next
            # step asks for the final answer with that result in view. (Both replies keep their own
            # generated ids: the engine's reply memo is keyed by the ids a reply followed too.)
            first = calls_seen[key]
            earlier = next(s for s in steps if s.step == first)
            prev = outputs[earlier.result_index][2]
            rec.summary, rec.dropped, rec.result_index = f"same call as step {first}: {prev.summary}", True, earlier.result_index
            for extra in calls:
                messages.append(ToolMessage(f"Same call as step {first}; its result: {prev.text}",
                                            tool_call_id=extra.get("id") or "", name=extra["name"]))
            repeated = first
        else:
            calls_seen[key] = step
            for extra in calls:  # the grammar allows one call; answer every call the message carries anyway
                xargs = dict(extra.get("args") or {})
                run_args, note = repair_args(extra["name"], xargs, cfg.question) if cfg.repair else (xargs, "")
                result = box.call(extra["name"], run_args)
                outputs.append((extra["name"], run_args, result))
                text = result.text if not note else f"({note})\n{result.text}"
                messages.append(ToolMessage(text, tool_call_id=extra.get("id") or "", name=extra["name"]))
                if extra is call:
                    rec.summary, rec.lines, rec.repaired = result.summary, list(result.lines), note
                    rec.result_index = len(outputs) - 1
            if rec.repaired:
                say(f"   repaired: {rec.repaired}")
        say(f"   result: {rec.summary}")
    tool_outputs = [o for _, _, o in outputs]
    echoed = " ".join(str(v) for _, args, _ in outputs for v in args.values())
    best = pick_result(outputs, cfg.question) if outputs else -1
    if (grounded(model_answer, tool_outputs, echoed)
            and any(answers_question(model_answer, cfg.question, o) for o in relevant(outputs, cfg.question))):
        answer, source = model_answer, "model"
        used = answer_basis(answer, outputs, best)
    else:
        answer, source, used = compose_answer(outputs, cfg.question), "composed", best
    if used >= 0:
        uname, uargs, uout = outputs[used]
        ustep = next((s.step for s in steps if s.result_index == used and not s.dropped), used + 1)
        basis = f"step {ustep}: {uname}({_fmt_args(uargs)})"
    else:
        basis, uout = "no tool result", None
    cited = sorted({int(m) for m in re.findall(r"\bL(\d+)\b", answer)} |
                   ({ln for ln in uout.lines[:5]} if source == "composed" and uout else set()))
    result = AgentResult(answer, source, model_answer, basis, steps, log.describe(), cited, time.perf_counter() - t0)
    say("")
    say(f"final answer ({source}, from {basis}): {answer}")
    if source == "composed":
        say(f"   (composed from the tool results: the model's final_answer text {model_answer!r} "
            "quoted no number from them)")
    say(f"total: {len(steps)} model calls, computed {result.tokens_computed} tokens, "
        f"reused {result.tokens_reused} from the cache, {result.seconds:.1f}s")
    return result
