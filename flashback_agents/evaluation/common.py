"""Small helpers shared by the benchmarks: where the data lives, timing, filler text, plots."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository (where the project keeps its data): the one place it is computed."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


_FILLER = (
    "2024-03-01 10:15:02 INFO  scheduler: job 4411 started on worker-3 (queue=batch, priority=5)\n"
    "2024-03-01 10:15:04 WARN  storage: volume /data/7 at 91% capacity, compaction scheduled\n"
    "2024-03-01 10:15:09 ERROR network: connection reset by peer 10.0.4.21:8020 after 3 retries\n"
    "The agent inspected the log, grouped similar lines and counted events by level and component.\n"
)


def filler_ids(lm, n: int) -> list[int]:
    """``n`` token ids of realistic log-like text (no network, no data files needed)."""
    ids: list[int] = []
    chunk = lm.encode(_FILLER)
    while len(ids) < n:
        ids += chunk
    return ids[:n]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs (GPU work included)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def save_plot(path: str | Path, xs: list, series: dict[str, list], xlabel: str, ylabel: str, title: str,
              logy: bool = False) -> None:
    """A line plot, one line per series (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(xs[: len(ys)], ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
