"""``flashback-agents bench context|decode`` (other benchmarks register from their own modules)."""

from __future__ import annotations

from typing import Optional

import typer

from ..models import DEFAULT_MODEL


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from ..cli import fail

        fail(f"expected comma-separated integers, got {text!r}")
        raise


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("context")(context)
    bench_app.command("decode")(decode)


def context(
    context: str = typer.Option("4096", "--context", help="Context length(s), comma-separated (a curve)."),
    append: int = typer.Option(64, "--append", help="Tokens appended per step."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    repeats: int = typer.Option(3, help="Timed repeats (median)."),
    json_out: bool = typer.Option(False, "--json"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of seconds vs context length."),
) -> None:
    """Cached append vs full recompute, measured in one run (the prize of keeping the cache)."""
    from ..cli import emit, fail
    from ..models import load_model
    from .common import save_plot
    from .context_bench import bench_context, points_to_dicts

    lm = load_model(model)
    try:
        points = bench_context(lm, _ints(context), append=append, repeats=repeats)
    except ValueError as exc:
        fail(str(exc))
    rows = points_to_dicts(points)
    last = rows[-1]
    data = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype), **last}
    if len(rows) > 1:
        data["curve"] = rows
    if plot:
        xs = [p.context_tokens for p in points]
        save_plot(plot, xs, {"full recompute": [p.full_recompute_s for p in points],
                             f"cached append of {append}": [p.cached_append_s for p in points]},
                  "context tokens", "seconds", f"{lm.name}: append vs recompute", logy=True)
        data["plot"] = plot
    emit(data, json_out)


def decode(
    context: str = typer.Option("512,4096", "--context", help="Context length(s), comma-separated."),
    tokens: int = typer.Option(32, help="Decoded tokens per measurement."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Milliseconds per decoded token vs the weight-streaming floor and vs transformers' DynamicCache."""
    from ..cli import emit
    from ..models import load_model
    from .context_bench import bench_decode

    lm = load_model(model)
    data = bench_decode(lm, _ints(context), tokens=tokens)
    if json_out:
        emit(data, True)
    else:
        typer.echo(f"{data['model']} {data['dtype']} threads={data['threads']} floor={data['floor_ms']:.1f} ms")
        for r in data["points"]:
            typer.echo(f"  context {r['context_tokens']:>5}: {r['ms_per_token']:.1f} ms/token "
                       f"({r['ratio_to_floor']:.2f}x floor), DynamicCache {r['dynamic_cache_ms_per_token']:.1f} ms "
                       f"({r['speedup_vs_dynamic_cache']:.2f}x slower)")
