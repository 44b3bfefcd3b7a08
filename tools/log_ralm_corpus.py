"""Build a RALM training corpus from raw logs (JSONL for ``flashback-agents train --ralm-corpus``).

``eval ppl --data loghub:SYSTEM`` scores a log's second half with BM25 evidence from its first half.
This writes the same situation for logs you train on: each log's first half as a retrieval-only
``store`` article, and ``--excerpts`` random excerpts of its second half (about ``--excerpt-chars``
characters each, whole lines) as training texts, so the adapter learns to read appended log lines
without the corpus swamping the rest of the mix (a 2k-line log is about 100k-200k tokens).

    python -m tools.log_ralm_corpus --data ../shared/data/loghub --out build/logs_ralm.jsonl \\
        --exclude Hadoop,Linux,Spark --excerpts 32
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tools.logtools import name_set


def excerpts(lines: list[str], n: int, chars: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n`` non-overlapping ``(start, end)`` line ranges of about ``chars`` characters, in order."""
    blocks, start, size = [], 0, 0
    for i, line in enumerate(lines):
        size += len(line)
        if size >= chars:
            blocks.append((start, i + 1))
            start, size = i + 1, 0
    return sorted(rng.sample(blocks, min(n, len(blocks))))


def log_articles(path: Path, name: str, n: int, chars: int, rng: random.Random) -> list[dict]:
    """The store (first half) and the excerpts (second half) of one log, as JSONL objects."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    half = len(lines) // 2
    if half == 0:
        return []
    out = [{"source": f"{name}[:{half}]", "store": True, "text": "".join(lines[:half])}]
    for a, b in excerpts(lines[half:], n, chars, rng):
        out.append({"source": f"{name}[{half + a}:{half + b}]", "text": "".join(lines[half + a:half + b])})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "loghub"),
                    help="A log file or a directory searched for *.log files.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--excerpts", type=int, default=32, help="Training excerpts per log.")
    ap.add_argument("--excerpt-chars", type=int, default=1000, help="Characters per excerpt (whole lines).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", default="", help="Comma-separated logs left out, by file stem or parent "
                                                  "directory (the systems held out for validation).")
    args = ap.parse_args(argv)
    if args.excerpts < 1 or args.excerpt_chars < 1:
        print("error: --excerpts and --excerpt-chars must be positive", file=sys.stderr)
        return 2
    root = Path(args.data)
    skip = name_set(args.exclude)
    logs = [root] if root.is_file() else sorted(root.rglob("*.log")) if root.is_dir() else []
    logs = [p for p in logs if p.parent.name.lower() not in skip and p.stem.lower() not in skip]
    if not logs:
        print(f"error: no *.log files under {root} (after --exclude)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    n_text = 0
    with open(args.out, "w", encoding="utf-8") as fh:
        for path in logs:
            name = path.stem if path.parent == root or root.is_file() else f"{path.parent.name}/{path.stem}"
            for art in log_articles(path, name, args.excerpts, args.excerpt_chars, rng):
                fh.write(json.dumps(art) + "\n")
                n_text += not art.get("store")
    print(f"wrote {n_text} excerpts and {len(logs)} stores from {len(logs)} logs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
