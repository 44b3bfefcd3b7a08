"""Training transcripts from the log agent's own loop: its tools, prompts and final_answer call.

``tools/loghub_transcripts.py`` writes generic counting episodes (a ``count_values`` tool, a free-text
answer). The log agent (``tools/log_agent.py``) asks differently: its own system prompt and user
message, ``count_lines`` / ``top_templates`` results, a ``final_answer`` call capped at 100
characters, and, when the step budget ends, a user turn quoting the result before the forced answer.
An adapter trained on the generic episodes answered the agent with fragments ("2000 lines",
"top_templates"). These transcripts come from :func:`tools.log_agent.run_agent` itself, driven by a
scripted model that plays an ideal agent (the routed tool with the right arguments, then
``final_answer`` quoting the answer from the result), so training renders exactly what the agent
sends at inference (``tests/test_transcripts.py`` compares the token ids).

    python -m tools.agent_transcripts --data ../shared/data/loghub --out agent.jsonl --exclude Hadoop,Linux,Spark

Questions are those of the agent's ``--eval`` (busiest component, count per level, most frequent
template) in several phrasings, plus the count of a component that is *not* the busiest;
``--exclude`` keeps the systems the agent is validated on out. Adapters trained on the first version
(most answers the top value, the result's first number) learned to copy that first number whatever
was asked, so the episodes now vary what the answer rests on:

- half the episodes read a random head of the log (``--no-slices``: never), so the counts and their
  order change;
- count questions are asked about every value, not only the top one, and the first call filters on
  the value the question names (``pattern`` = the level or component), so the result leads with the
  asked count (a second run that filtered in a quarter of the episodes still answered the top count:
  a 135M model copies a word of the question, it did not learn to find one count in a list);
- a quarter of the episodes start with arguments the agent repairs, so the tool result carries the
  ``repaired:`` note the model meets at inference.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools import log_agent as agent
from tools.log_agent_eval import eval_questions
from tools.logtools import ReadLimits, component_column, name_set, read_log, read_structured

#: paraphrases per question kind ({level} is filled in); the first is the agent's --eval wording
PHRASINGS = {
    "level_count": ["How many lines have level {level}?", "How many {level} lines are in this log?",
                    "Count the lines at level {level}.", "What number of log lines have level {level}?"],
    "busiest_component": ["Which component logs the most lines?", "Which component is the busiest?",
                          "Which component writes the most log lines?"],
    "top_template": ["What is the most frequent message template?", "Which kind of message is the most common?",
                     "What is the most common type of log message?"],
    "component_count": ["How many lines does component {value} log?", "How many lines has component {value} written?",
                        "Count the lines of component {value}."],
}
#: how the scripted model fills the first call (:func:`first_call`): the ideal arguments, or arguments
#: the agent's ``repair_args`` fixes (so the result carries the note seen at inference)
STYLES = ("ideal", "ideal", "ideal", "repaired")
_FILTERABLE = re.compile(r"^[A-Za-z][\w-]{0,31}$")
ANSWER_MAX = 100  # final_answer's maxLength in the agent's tool schema


def _cut(text: str, n: int = ANSWER_MAX) -> str:
    if len(text) <= n:
        return text
    return text[:n].rsplit(" ", 1)[0].rstrip(",;:") if " " in text[:n] else text[:n]


def ideal_answer(question: str, out: Any) -> str:
    """What a good final_answer says for this result: the count or the name it asks for, quoted."""
    templates = out.data.get("templates")
    if templates:
        t = templates[0]
        return _cut(f"{t['count']} lines (first L{t['first_line']}): {t['template']}")
    return _cut(agent.direct_answer(question, out))


def first_call(question: str, kind: str, style: str, value: str | None) -> tuple[str, dict]:
    """The scripted model's first call: the routed tool, filtered on the value the question names.

    A count question that names a value (a level, a component) filters on it (``pattern`` = the value),
    so the result leads with the asked count: copying a word of the question is what a small model
    learns; finding one count in a list it did not (an adapter trained without the filter answered the
    top count whatever was asked). Style ``repaired`` starts with a wrong field or a stray filter word
    that the agent's ``repair_args`` fixes, so the result carries the note seen at inference.
    """
    name = agent.route(question)
    if name != "count_lines":
        return name, {"pattern": "level" if style == "repaired" else ""}
    by = "component" if kind in ("busiest_component", "component_count") else "level"
    pattern = value if value and _FILTERABLE.match(value) else ""
    if style == "repaired":
        if agent.question_field(question) == by:  # a wrong field is repaired when the question names its own
            return name, {"by": "component" if by == "level" else "level", "pattern": pattern}
        if not pattern:
            return name, {"by": by, "pattern": "pattern"}
    return name, {"by": by, "pattern": pattern}


class ScriptedModel:
    """A stand-in for ChatFlashBack in :func:`run_agent`: the ideal call at each step, prompts recorded.

    Step 1 calls the routed tool (arguments per ``style``, :func:`first_call`); the next step calls
    ``final_answer`` with :func:`ideal_answer` of the result the agent got (after its repairs).
    """

    def __init__(self, box: Any, question: str, kind: str, style: str = "ideal", value: str | None = None):
        self.box, self.question, self.kind, self.style, self.value = box, question, kind, style, value
        self.prompts: list[list[Any]] = []
        self.replies: list[Any] = []
        self._out: Any = None

    def bind_tools(self, tools: Sequence[dict], tool_choice: Any = None) -> ScriptedModel:
        return self

    def invoke(self, messages: Sequence[Any]) -> Any:
        from langchain_core.messages import AIMessage

        self.prompts.append(list(messages))
        n = len(self.replies)
        if self._out is None:
            name, args = first_call(self.question, self.kind, self.style, self.value)
            self._out = self.box.call(name, agent.repair_args(name, args, self.question)[0])
        else:
            name, args = "final_answer", {"answer": ideal_answer(self.question, self._out)}
        reply = AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}])
        self.replies.append(reply)
        return reply


def episode(log_path: str, question: str, kind: str, max_steps: int, store: Path, *, style: str = "ideal",
            value: str | None = None, max_lines: int | None = None) -> list[Any]:
    """One agent run with the scripted model; returns the LangChain messages of the whole conversation.

    ``max_lines``: read only the log's head (other counts, another order); ``value``: the level or
    component the question names (the first call filters on it).
    """
    log = read_log(log_path, ReadLimits(max_lines=max_lines) if max_lines else ReadLimits())
    box = agent.LogToolbox(log, store)
    model = ScriptedModel(box, question, kind, style, value)
    cfg = agent.AgentConfig(log=log_path, question=question, max_steps=max_steps, quiet=True, store=str(store))
    agent.run_agent(cfg, log=log, llm=model)
    return model.prompts[-1] + [model.replies[-1]]


def component_questions(q: Any, ranks: range = range(1, 4)) -> list[tuple[str, str]]:
    """(kind, value) for components other than the busiest one of ``q``'s log (ranks 2-4 by count) whose
    names can be a filter (plain words: ``dfs.DataNode$PacketResponder`` is a regex, not a word)."""
    import collections

    rows = read_structured(q.log + "_structured.csv")
    col = component_column(rows)
    if not col:
        return []
    ranked = [v for v, _ in collections.Counter(r[col] for r in rows).most_common() if v]
    return [("component_count", ranked[i]) for i in ranks if i < len(ranked) and _FILTERABLE.match(ranked[i])]


def _first_number(text: str) -> str | None:
    m = agent._NUM.search(text)
    return m.group(0).replace(",", "") if m else None


def episodes(root: str | Path, exclude: set[str], rng: random.Random, per_question: int, store: Path,
             slices: bool = True) -> list[dict]:
    """Transcripts for every eval-style question of every system under ``root`` not in ``exclude``.

    Each question appears ``per_question`` times in random phrasings, styles and (with ``slices``) log
    heads; half the runs have a budget of two steps, so the last call is forced with the agent's
    final-answer prompt (as at inference when the budget runs out), the other half let the scripted
    model answer on its own at step 2.
    """
    from langchain_core.messages import messages_to_dict  # the trainer reads this format (docs/formats.md)

    out = []
    for q in eval_questions(root):
        if q.system.lower() in exclude:
            continue
        asks: list[tuple[str, str | None]] = [(q.kind, None)]
        if q.kind == "level_count":
            asks = [(q.kind, q.question.removeprefix("How many lines have level ").rstrip("?"))]
        elif q.kind == "busiest_component":
            asks += component_questions(q)
        for kind, value in asks:
            for _ in range(per_question):
                question = rng.choice(PHRASINGS[kind]).format(level=value, value=value)
                style = rng.choice(STYLES)
                head = rng.randrange(300, 2000) if slices and rng.random() < 0.5 else None
                msgs = episode(q.log, question, kind, rng.choice([2, 5]), store, style=style, value=value,
                               max_lines=head)
                answer = msgs[-1].tool_calls[0]["args"]["answer"]
                if value and head and value not in answer:  # that head lacks the value: use the whole log
                    msgs = episode(q.log, question, kind, rng.choice([2, 5]), store, style=style, value=value)
                    answer = msgs[-1].tool_calls[0]["args"]["answer"]
                if value and value not in answer:  # the tool parses this component otherwise: no episode
                    continue
                result = next(m.content for m in msgs if m.type == "tool")
                first = _first_number(result.split(")\n", 1)[-1] if result.startswith("(") else result)
                out.append({"tools": agent.TOOLS, "messages": messages_to_dict(msgs), "source": f"{q.system}:{kind}",
                            "first_number": first is not None and first == _first_number(answer)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "loghub"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-question", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", default="", help="Comma-separated systems left out (the agent's validation split).")
    ap.add_argument("--store", help="Chroma directory for the agent's semantic index (default: a cache directory)")
    ap.add_argument("--no-slices", action="store_true", help="Always read the whole log (no random heads).")
    args = ap.parse_args(argv)
    root = Path(args.data)
    if not any(root.rglob("*_structured.csv")):
        print(f"error: no Loghub *_structured.csv files under {root}", file=sys.stderr)
        return 2
    skip = name_set(args.exclude)
    store = Path(args.store) if args.store else agent.default_store()
    rows = episodes(root, skip, random.Random(args.seed), args.per_question, store, slices=not args.no_slices)
    with open(args.out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: v for k, v in row.items() if k not in ("source", "first_number")}) + "\n")
    first = sum(r["first_number"] for r in rows)
    print(f"wrote {len(rows)} conversations to {args.out}; {first} answers ({first / max(len(rows), 1):.0%}) "
          "are the first number of their tool result")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
