"""``eval agents``, its report: the runs aggregated by adapter, framework and category, the three
must-show figures against their targets, and the markdown table (:class:`AgentEvalResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .agent_questions import CATEGORIES
from .agent_scoring import MAX_STEPS, NO_CALL_CATEGORIES, RunRecord

#: score keys, in table order, with their column titles
METRICS = {"tool": "right tool", "args": "args right", "no_call": "no call", "answer": "answer right",
           "ended": f"ended <= {MAX_STEPS}"}
#: the must-show targets: share of runs ended, of answers right, of no-call runs where none fits
TARGETS = {"ended": 0.90, "answer": 0.70, "no_call": 0.80}


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
