"""Measure the log-analysis agent on Loghub: questions from the structured CSVs, answers checked.

Run:  python -m tools.log_agent_eval --eval ../shared/data/loghub --threads 1 --json eval.json
      python -m tools.log_agent_eval --eval DIR --threads 1 --no-route --no-repair   (the model alone)
      python -m tools.log_agent_eval --log /var/log/syslog --question "Which component logs most?"

``--eval DIR`` generates questions from every Loghub-style ``*_structured.csv`` under DIR (busiest
component, the count at each level, the most frequent template), runs the agent
(:func:`tools.log_agent.run_agent`) on each and prints the share of answers that hold the truth:
overall, for answers the model wrote, and for composed ones. Without ``--eval`` it runs the agent on
one log and question (the sample log by default), printing every step.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tools.log_agent import _NUM, DEFAULT_QUESTION, AgentConfig, AgentResult, _fmt_args, _llm, run_agent
from tools.logformat import LETTER_LEVELS, is_severity
from tools.logtools import SAMPLE_LOG, LogError, LogFile, ReadLimits, component_column, read_log, read_structured


# ------------------------------------------------------------------------------------ --eval
@dataclass
class EvalQuestion:
    """A question whose answer a Loghub structured CSV gives exactly."""

    system: str
    log: str
    kind: str  # busiest_component / level_count / top_template
    question: str
    truth: str  # the value the answer must hold (a name, a count, a template)
    accept: list[str] = field(default_factory=list)  # other spellings that also hold it


def _is_level_column(values: Sequence[str]) -> bool:
    """A CSV 'Level' column that holds severities (Loghub's Linux 'Level' holds the host name)."""
    vals = [v for v in values if v]
    ok = sum(1 for v in vals if is_severity(v) or v in LETTER_LEVELS)
    return bool(vals) and ok >= 0.95 * len(vals)


def eval_questions(root: str | os.PathLike, per_system: int | None = None) -> list[EvalQuestion]:
    """Questions from every ``*_structured.csv`` under ``root`` whose raw log sits beside it.

    Per system: the busiest component (when the CSV has a component column with 2+ values), the count
    at each level present (when its Level column holds severities), the most frequent template
    (EventTemplate, counted by EventId). ``per_system`` keeps the first N of each system's questions,
    taking one of each kind first.
    """
    import collections

    out: list[EvalQuestion] = []
    for path in sorted(Path(root).rglob("*_structured.csv")):
        log = path.with_name(path.name.replace("_structured.csv", ""))
        if not log.is_file():
            continue
        rows = read_structured(path)
        if not rows:
            continue
        system = path.name.split("_")[0]
        qs: list[EvalQuestion] = []
        col = component_column(rows)
        if col:
            c = collections.Counter(r[col] for r in rows)
            (top, n), *rest = c.most_common()
            if rest and n > rest[0][1]:  # a clear busiest component (no tie)
                tail = top.rsplit(":", 1)[-1]  # Loghub's [thread:Class@line] split leaves the thread tail
                qs.append(EvalQuestion(system, str(log), "busiest_component",
                                       "Which component logs the most lines?", top, [tail] if tail != top else []))
        if "Level" in rows[0] and _is_level_column([r["Level"] for r in rows]):
            for level, n in sorted(collections.Counter(r["Level"] for r in rows).items(), key=lambda kv: -kv[1]):
                qs.append(EvalQuestion(system, str(log), "level_count", f"How many lines have level {level}?", str(n)))
        if "EventTemplate" in rows[0]:
            key = "EventId" if "EventId" in rows[0] else "EventTemplate"
            top_id = collections.Counter(r[key] for r in rows).most_common(1)[0][0]
            template = next(r["EventTemplate"] for r in rows if r[key] == top_id)
            qs.append(EvalQuestion(system, str(log), "top_template", "What is the most frequent message template?",
                                   template))
        if per_system is not None:
            firsts = {q.kind: q for q in reversed(qs)}
            order = [firsts[k] for k in ("busiest_component", "level_count", "top_template") if k in firsts]
            qs = (order + [q for q in qs if q not in order])[:per_system]
        out.extend(qs)
    return out


def _words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z0-9_$.-]*", text.replace("<*>", " "))]


def holds_truth(q: EvalQuestion, answer: str) -> bool:
    """Whether an answer holds the truth: the count as a number, the component's name, or the template
    (60% of its fixed words; its count alone, "476 of 2000 lines, first L848", does not say which)."""
    if q.kind == "level_count":  # the count is the answer's first number ("2000 lines ... FATAL: 2" is not it)
        first = _NUM.search(answer or "")
        return first is not None and first.group(0).replace(",", "") == q.truth
    if q.kind == "busiest_component":
        a = answer.lower()
        return any(re.search(rf"(?<![\w.]){re.escape(t.lower())}(?![\w.])", a) for t in [q.truth, *q.accept] if t)
    if q.kind == "top_template":
        want = set(_words(q.truth))
        got = set(_words(answer))
        return bool(want) and len(want & got) >= 0.6 * len(want)
    return False


def _adapter_in_use(cfg: AgentConfig) -> str:
    """The adapter the shared engine loaded (the core's default when none was asked for)."""
    try:
        lm = _llm(cfg).engine.lm
        return str(getattr(lm, "adapter", None) or "none")
    except Exception:
        return str(cfg.adapter or ("none" if cfg.no_adapter else "default"))


def run_eval(root: str, cfg: AgentConfig, per_system: int | None = None, json_out: str | None = None,
             out=print) -> dict:
    """Run the agent on every generated question; print and return the rates of answers holding the truth."""
    import json

    questions = eval_questions(root, per_system)
    if not questions:
        raise LogError(f"No Loghub-style *_structured.csv with its log beside it under {root}.")
    records = []
    logs: dict[str, LogFile] = {}
    for i, q in enumerate(questions, 1):
        log = logs.get(q.log) or read_log(q.log, ReadLimits(max_bytes=cfg.max_bytes, max_lines=cfg.max_lines))
        logs[q.log] = log
        qcfg = replace(cfg, log=q.log, question=q.question, quiet=True)
        res = run_agent(qcfg, log)
        ok = holds_truth(q, res.answer)
        records.append({**asdict(q), "answer": res.answer, "source": res.answer_source, "basis": res.basis,
                        "model_answer": res.model_answer, "holds": ok,
                        "model_answer_holds": holds_truth(q, res.model_answer), "seconds": round(res.seconds, 2),
                        "steps": [f"{s.tool}({_fmt_args(s.args)})" + (f" [repaired: {s.repaired}]" if s.repaired else "")
                                  for s in res.steps],
                        "tokens": [{"input": s.input_tokens, "cache_read": s.cache_read, "computed": s.computed}
                                   for s in res.steps]})
        out(f"[{i}/{len(questions)}] {q.system} {q.kind}: {'OK ' if ok else 'MISS'} ({res.answer_source}) "
            f"truth={q.truth[:60]!r} answer={res.answer[:110]!r}")

    def rate(rs: list[dict]) -> str:
        return f"{sum(r['holds'] for r in rs)}/{len(rs)} ({sum(r['holds'] for r in rs) / len(rs):.0%})" if rs else "0/0"

    adapter = _adapter_in_use(cfg)
    out(f"model {cfg.model}, adapter: {adapter}")
    model = [r for r in records if r["source"] == "model"]
    composed = [r for r in records if r["source"] == "composed"]
    summary = {"model": cfg.model, "adapter": adapter, "route": cfg.route_first, "questions": len(records), "holds": sum(r["holds"] for r in records),
               "rate": sum(r["holds"] for r in records) / len(records),
               "model_written": len(model), "model_written_holds": sum(r["holds"] for r in model),
               "composed": len(composed), "composed_holds": sum(r["holds"] for r in composed),
               "model_text_holds": sum(r["model_answer_holds"] for r in records)}
    out("")
    out(f"answers holding the truth: {rate(records)} overall; model-written {rate(model)}; "
        f"composed from tool results {rate(composed)}")
    out(f"(the model's own final_answer text held it in {summary['model_text_holds']}/{len(records)} questions)")
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    out("by kind: " + "; ".join(f"{k} {rate(v)}" for k, v in by_kind.items()))
    if json_out:
        Path(json_out).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
        out(f"per-question records: {json_out}")
    return {"summary": summary, "records": records}


def parse_args(argv: Sequence[str] | None) -> tuple[AgentConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", help="log file to analyse (default: the sample log in examples/sample_data)")
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see flashback_agents.load_model)")
    ad = ap.add_mutually_exclusive_group()
    ad.add_argument("--adapter", help="directory of a trained FlashBack adapter (passed through to ChatFlashBack)")
    ad.add_argument("--no-adapter", action="store_true", help="run the bare model (adapter=None passed explicitly)")
    ap.add_argument("--max-steps", type=int, default=5, help="model calls at most (the last one is final_answer)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--store", help="Chroma directory for semantic search (default: a cache directory)")
    ap.add_argument("--max-bytes", type=int, default=ReadLimits.max_bytes, help="read at most this many bytes")
    ap.add_argument("--max-lines", type=int, default=ReadLimits.max_lines, help="read at most this many lines")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy, shared CPU)")
    ap.add_argument("--no-route", action="store_true",
                    help="let the model pick the first tool too (by default a keyword route picks it)")
    ap.add_argument("--no-repair", action="store_true",
                    help="run tool calls exactly as the model wrote them (no field/filter repair from the question)")
    ap.add_argument("--eval", metavar="DIR",
                    help="answer questions generated from every Loghub-style *_structured.csv under DIR and "
                         "print the rate of answers holding the truth")
    ap.add_argument("--per-system", type=int, help="with --eval: at most N questions per system")
    ap.add_argument("--json", metavar="OUT", help="with --eval: write per-question records to OUT")
    a = ap.parse_args(argv)
    if a.max_steps < 2:
        ap.error("--max-steps must be at least 2 (one tool call, then final_answer)")
    if a.max_bytes < 1 or a.max_lines < 1:
        ap.error("--max-bytes and --max-lines must be positive")
    if (a.json or a.per_system) and not a.eval:
        ap.error("--json and --per-system go with --eval DIR")
    cfg = AgentConfig(a.log, a.question, a.model, a.adapter, a.max_steps, a.max_tokens, a.store,
                      a.max_bytes, a.max_lines, not a.no_route, a.threads, no_adapter=a.no_adapter,
                      repair=not a.no_repair)
    return cfg, a


def main(argv: Sequence[str] | None = None) -> AgentResult | dict | None:
    """Command-line entry point; returns the result (for tests) or exits with a clear message."""
    cfg, a = parse_args(argv)
    try:
        if a.eval:
            if not Path(a.eval).is_dir():
                raise LogError(f"No such folder: {a.eval}. Pass a folder of Loghub-style *_structured.csv files.")
            return run_eval(a.eval, cfg, a.per_system, a.json)
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
