"""The validation split for choosing an agent adapter: generator episodes of a seed no training run used,
through the same real agent loops as ``flashback-agents eval agents``.

An adapter recipe (data mix, steps, checkpoint) is chosen here, never on the held-out questions of
``eval agents`` (those are the test the docs report). The episodes come from
:func:`tools.tool_episodes.draw_episode` with ``--seed`` (default 99; the training files use seeds 0-3) and
``--mix`` (default v2, the mix every candidate's data was built from), so every candidate meets the same
tool families it trained on, with questions, entities and numbers it never saw. Scores, by category, are
those of ``eval agents``: the first call's tool, every expected call made with its arguments, no call where
none is needed, the final answer holding each tool result, and the run ending within 6 model calls.

    python -m tools.agent_validation --adapter build/runD --adapter build/runE --framework langchain --n 60
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Sequence
from typing import Any, Callable

import torch

from flashback_agents.evaluation.agent_eval import evaluate_agents
from flashback_agents.evaluation.agent_questions import ExpectedCall, Question
from flashback_agents.evaluation.agent_report import aggregate
from tools.tool_episodes import DEFAULT_MIX, FRAMEWORKS, Episode, draw_episode
from tools.tool_families import TOOLS

#: generator kind -> the eval category it is scored as
CATEGORY = {"single": "single", "chain": "chain", "two": "two_entities", "no_tool": "no_tool_needed",
            "no_fit": "no_fit"}
VALIDATION_SEED = 99


def _requirements(result: Any) -> list[Any]:
    """What the final answer must hold for one tool result: the number, a date or a short word as written,
    or every number of a short text ("Oslo has 465,516 inhabitants": 465516); nothing for a record."""
    if isinstance(result, bool) or not isinstance(result, (int, float, str)):
        return []
    if isinstance(result, (int, float)):
        return [result]
    if result.startswith("Error") or len(result) > 80:
        return []
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", result) or not re.search(r"\d", result):
        return [result]
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", result)]


def episode_question(ep: Episode, index: int) -> Question:
    """``ep`` as an ``eval agents`` question: its tools, its expected calls, and the results the answer states
    (the last one for a chain, each one for two calls, the one for a single call)."""
    category = CATEGORY[ep.kind]
    if category == "single" and len(ep.tools) > 1:
        category = "choice"
    shown = ep.results[-1:] if ep.kind == "chain" else ep.results
    answer = tuple(r for x in shown for r in _requirements(x))
    return Question(f"val-{index:03d}-{ep.kind}", category, tuple(ep.tools), ep.question,
                    tuple(ExpectedCall(n, dict(a)) for n, a in ep.calls), answer)


def validation_set(n: int, seed: int = VALIDATION_SEED, mix: str = DEFAULT_MIX) -> list[Question]:
    rng = random.Random(seed)
    return [episode_question(draw_episode(rng, mix), i) for i in range(n)]


def _functions(question: Question) -> list[Callable[..., Any]]:
    return [TOOLS[name] for name in question.tools]


def validate(adapters: Sequence[str], frameworks: Sequence[str], questions: Sequence[Question],
             max_tokens: int = 256) -> dict:
    """Every question through every framework, once per adapter (``eval agents``' own loop, with the
    generator's tools bound): {adapter: {framework: summary}}."""
    result = evaluate_agents(questions, adapters=adapters, frameworks=frameworks, max_tokens=max_tokens,
                             tools_for=_functions)
    for run in result.runs:
        print(f"{run.adapter} {run.framework} {run.question}: {run.scores} {run.calls} {run.answer[:80]!r}",
              file=sys.stderr)
    return aggregate(result.runs)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", action="append", required=True, help="auto, none or a directory (repeat)")
    ap.add_argument("--framework", default="langchain", choices=[*FRAMEWORKS, "both"])
    ap.add_argument("--n", type=int, default=60, help="episodes")
    ap.add_argument("--seed", type=int, default=VALIDATION_SEED)
    ap.add_argument("--mix", default=DEFAULT_MIX)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the summaries as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    frameworks = list(FRAMEWORKS) if args.framework == "both" else [args.framework]
    result = validate(args.adapter, frameworks, validation_set(args.n, args.seed, args.mix))
    for label, per_fw in result.items():
        for fw, summary in per_fw.items():
            cells = {k: f"{v['answer']['right']}/{v['n']}" for k, v in summary.items()}
            print(f"{label} {fw}: answer right by category {cells}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
