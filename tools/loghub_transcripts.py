"""Build agent transcripts (docs/formats.md JSONL) from the Loghub structured CSVs, for adapter training.

Each conversation is a log-analysis episode with exact answers: the user asks a counting question,
the assistant calls a tool, the tool result (computed from the structured CSV, so it is exact)
comes back and is marker-wrapped at training time, and the assistant answers with the number from
the result. Training on these teaches the adapter to read tool results appended at the end.

    python -m tools.loghub_transcripts --data ../shared/data/loghub --out loghub.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from tools.logtools import name_set, read_structured

SYSTEM = "You are a log analysis agent. Call a tool, then answer from its result."


def _call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def episodes(system: str, rows: list[dict], rng: random.Random, n: int) -> list[dict]:
    """``n`` conversations about one system's log, each with an exact answer."""
    out = []
    fields = [f for f in ("Level", "Component", "Program", "EventId") if f in rows[0]]
    for i in range(n):
        field = rng.choice(fields)
        counts = Counter(r[field] for r in rows)
        value = rng.choice(sorted(counts))
        table = "\n".join(f"{k}: {v}" for k, v in counts.most_common(12))
        sample = [r for r in rows if r[field] == value][:3]
        lines = "\n".join(f"{r['LineId']}: {r['Content'][:160]}" for r in sample)
        result = f"{len(rows)} lines; counts by {field.lower()}:\n{table}\nexamples for {value}:\n{lines}"
        question = f"In the {system} log, how many lines have {field.lower()} {value}?"
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [_call(i, "count_values", {"by": field.lower()})]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": result},
            {"role": "assistant", "content": f"{counts[value]} lines of the {system} log have {field.lower()} "
                                             f"{value} (out of {len(rows)})."},
        ]
        out.append({"messages": messages})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "loghub"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-system", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", default="", help="Comma-separated systems left out (a validation split for the "
                                                  "log agent: its answers are measured on logs not trained on).")
    args = ap.parse_args(argv)
    root = Path(args.data)
    skip = name_set(args.exclude)
    csvs = sorted(p for p in root.glob("*/*_structured.csv") if p.parent.name.lower() not in skip)
    if not csvs:
        print(f"error: no Loghub *_structured.csv files under {root}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    n = 0
    with open(args.out, "w", encoding="utf-8") as fh:
        for path in csvs:
            rows = read_structured(path)
            for ep in episodes(path.parent.name, rows, rng, args.per_system):
                fh.write(json.dumps(ep) + "\n")
                n += 1
    print(f"wrote {n} conversations from {len(csvs)} systems to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
