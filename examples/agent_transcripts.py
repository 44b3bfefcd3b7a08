"""Training transcripts from the log agent's own loop: its tools, prompts and final_answer call.

``loghub_transcripts.py`` writes generic counting episodes (a ``count_values`` tool, a free-text
answer). The log agent (``log_analysis_agent.py``) asks differently: its own system prompt and user
message, ``count_lines`` / ``top_templates`` results, a ``final_answer`` call capped at 100
characters, and, when the step budget ends, a user turn quoting the result before the forced answer.
An adapter trained on the generic episodes answered the agent with fragments ("2000 lines",
"top_templates"). These transcripts come from :func:`log_analysis_agent.run_agent` itself, driven by a
scripted model that plays an ideal agent (the routed tool with the right arguments, then
``final_answer`` quoting the answer from the result), so training renders exactly what the agent
sends at inference (``tests/test_examples.py`` compares the token ids).

    python examples/agent_transcripts.py --data ../shared/data/loghub --out agent.jsonl --exclude Hadoop,Linux,Spark

Questions are those of the agent's ``--eval`` (busiest component, count per level, most frequent
template) in several phrasings; ``--exclude`` keeps the systems the agent is validated on out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import log_analysis_agent as agent  # noqa: E402
from logtools import ReadLimits, read_log  # noqa: E402

#: paraphrases per question kind ({level} is filled in); the first is the agent's --eval wording
PHRASINGS = {
    "level_count": ["How many lines have level {level}?", "How many {level} lines are in this log?",
                    "Count the lines at level {level}.", "What number of log lines have level {level}?"],
    "busiest_component": ["Which component logs the most lines?", "Which component is the busiest?",
                          "Which component writes the most log lines?"],
    "top_template": ["What is the most frequent message template?", "Which kind of message is the most common?",
                     "What is the most common type of log message?"],
}
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


class ScriptedModel:
    """A stand-in for ChatFlashBack in :func:`run_agent`: the ideal call at each step, prompts recorded.

    Step 1 calls the routed tool with the arguments the question needs (``by`` the field it names, no
    filter); the next step calls ``final_answer`` with :func:`ideal_answer` of that result.
    """

    def __init__(self, box: Any, question: str, kind: str):
        self.box, self.question, self.kind = box, question, kind
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
            name = agent.route(self.question)
            args = ({"by": "component" if self.kind == "busiest_component" else "level", "pattern": ""}
                    if name == "count_lines" else {"pattern": ""})
            self._out = self.box.call(name, args)
        else:
            name, args = "final_answer", {"answer": ideal_answer(self.question, self._out)}
        reply = AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}])
        self.replies.append(reply)
        return reply


def episode(log_path: str, question: str, kind: str, max_steps: int, store: Path) -> list[Any]:
    """One agent run with the scripted model; returns the LangChain messages of the whole conversation."""
    log = read_log(log_path, ReadLimits())
    box = agent.LogToolbox(log, store)
    model = ScriptedModel(box, question, kind)
    cfg = agent.AgentConfig(log=log_path, question=question, max_steps=max_steps, quiet=True, store=str(store))
    agent.run_agent(cfg, log=log, llm=model)
    return model.prompts[-1] + [model.replies[-1]]


def episodes(root: str | Path, exclude: set[str], rng: random.Random, per_question: int, store: Path) -> list[dict]:
    """Transcripts for every eval-style question of every system under ``root`` not in ``exclude``.

    Each question appears ``per_question`` times in random phrasings; half the runs have a budget of
    two steps, so the last call is forced with the agent's final-answer prompt (as at inference when
    the budget runs out), the other half let the scripted model answer on its own at step 2.
    """
    from langchain_core.messages import messages_to_dict  # the trainer reads this format (docs/formats.md)

    out = []
    for q in agent.eval_questions(root):
        if q.system.lower() in exclude:
            continue
        level = q.question.removeprefix("How many lines have level ").rstrip("?")
        for _ in range(per_question):
            question = rng.choice(PHRASINGS[q.kind]).format(level=level)
            msgs = episode(q.log, question, q.kind, rng.choice([2, 5]), store)
            out.append({"tools": agent.TOOLS, "messages": messages_to_dict(msgs), "source": f"{q.system}:{q.kind}"})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "loghub"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-question", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", default="", help="Comma-separated systems left out (the agent's validation split).")
    ap.add_argument("--store", help="Chroma directory for the agent's semantic index (default: a cache directory)")
    args = ap.parse_args(argv)
    root = Path(args.data)
    if not any(root.rglob("*_structured.csv")):
        print(f"error: no Loghub *_structured.csv files under {root}", file=sys.stderr)
        return 2
    skip = {s.strip().lower() for s in args.exclude.split(",") if s.strip()}
    store = Path(args.store) if args.store else agent.default_store()
    rows = episodes(root, skip, random.Random(args.seed), args.per_question, store)
    with open(args.out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "source"}) + "\n")
    print(f"wrote {len(rows)} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
