"""``eval agents``, its scoring: the record of one run (:class:`RunRecord`) and the five scores of
a run against its question (:func:`score_run`: right tool, arguments right, no call, answer right,
ended within ``MAX_STEPS`` model calls)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .agent_questions import TOOLS, Question, tool_signature

MAX_STEPS = 6
NO_CALL_CATEGORIES = ("no_tool_needed", "no_fit")


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
