"""``flashback-agents bench ...``: the speed benchmarks (context, decode, agent, long, shift-drift, ralm)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .common import bad_input, check_choice, check_dir, check_int, check_out_dir, check_out_file, emit, fail, guarded


def _ints(text: str, option: str = "--context") -> list[int]:
    """Comma-separated token counts (each >= 1), or exit code 2 saying what to pass."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        bad_input(f"{option} expects comma-separated integers such as 512,4096; got {text!r}.")
        raise
    if not values or any(v < 1 for v in values):
        bad_input(f"{option} values must be token counts >= 1 such as 512,4096; got {text!r}.")
    return values


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    bench_app.command("context")(guarded(context))
    bench_app.command("pool")(guarded(pool))
    bench_app.command("decode")(guarded(decode))
    bench_app.command("agent")(guarded(agent))
    bench_app.command("long")(guarded(long))
    bench_app.command("shift-drift")(guarded(shift_drift_cmd))
    bench_app.command("ralm")(guarded(bench_ralm_cmd))


def shift_drift_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    budget: int = typer.Option(1200, help="Token budget; the conversation grows until it compacts."),
    tool_tokens: int = typer.Option(200, help="Tokens per tool result."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """How far on_overflow='shift' (no recompute) drifts from 'evict' (exact): logits and perplexity."""
    from ..evaluation.long_bench import shift_drift
    from ..models import load_model

    check_int("budget", budget, 1, hint="pass a token budget, e.g. --budget 1200.")
    check_int("tool_tokens", tool_tokens, 1, hint="pass the tokens per tool result, e.g. --tool-tokens 200.")
    lm = load_model(model, adapter=None)  # speed: the same weights as the baselines
    try:
        data = shift_drift(lm, steps=64, tool_tokens=tool_tokens, budget=budget)
    except ValueError as exc:
        fail(str(exc))
    emit({"model": lm.name, **data}, json_out)


def long(
    steps: int = typer.Option(60, help="Agent steps."),
    tool_tokens: int = typer.Option(256, help="Tokens per tool result (T)."),
    generate: int = typer.Option(24, help="Tokens generated per step (G), EOS ignored."),
    budget: Optional[int] = typer.Option(None, help="Token budget (default: the window minus reply room)."),
    shift: bool = typer.Option(False, help="Also run on_overflow='shift' (experimental)."),
    quick: bool = typer.Option(False, help="12 steps, T=128, G=8, budget 1536: a smoke run."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_out: bool = typer.Option(False, "--json"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG: seconds per step, one line per system."),
    no_speculation: bool = typer.Option(False, "--no-speculation", help="Also run ours with speculation and "
                                        "jump-forward off, in the same run (a comparison row)."),
) -> None:
    """A long agent run on a budget: ChatFlashBack (evict) vs ChatHuggingFace + trim_messages."""
    from ..evaluation.agent_bench import Scenario
    from ..evaluation.common import save_plot
    from ..evaluation.long_bench import bench_long
    from ..models import load_model

    for name, value in (("steps", steps), ("tool_tokens", tool_tokens), ("generate", generate), ("budget", budget)):
        check_int(name, value, 1)
    check_out_file("plot", plot)
    scenario = Scenario(12, 128, 8) if quick else Scenario(steps, tool_tokens, generate)
    budget = 1536 if quick and budget is None else budget
    lm = load_model(model, adapter=None)  # speed: the same weights as the baselines
    systems = ("flashback", "shift", "chathf") if shift else ("flashback", "chathf")
    if no_speculation:
        systems += ("no-speculation",)
    data = bench_long(lm, model, scenario, budget, systems)
    if plot:
        save_plot(plot, list(range(1, scenario.steps + 1)),
                  {s["system"]: [x["seconds"] for x in s["steps"]] for s in data["systems"]},
                  "agent step", "seconds", f"{lm.name}: {scenario.steps}-step agent on a {data['budget']}-token budget")
        data["plot"] = plot
    if json_out:
        emit(data, True)
        return
    typer.echo(f"{data['model']} budget={data['budget']} scenario={data['scenario']}")
    for s in data["systems"]:
        fpt = f"  {s['forwards_per_token']:.2f} forwards/token" if "forwards_per_token" in s else ""
        typer.echo(f"  {s['system']:<48} total {s['total_s']:8.2f}s  compactions {s['compactions']:3d}  "
                   f"recomputed {s['tokens_recomputed']:6d}  evicted {s['tokens_evicted']:6d}{fpt}")
        if s.get("compaction_steps"):
            typer.echo(f"    compacted at steps {s['compaction_steps']}; steps neither compacting nor a pure append: "
                       f"{s.get('non_append_steps') or 'none'}")
    if "speedup_vs_chathf_trim" in data:
        typer.echo(f"  FlashBack vs ChatHuggingFace + trim_messages: {data['speedup_vs_chathf_trim']:.2f}x")
    if "speedup_vs_chathf_trim_no_speculation" in data:
        typer.echo(f"  FlashBack without speculation vs ChatHuggingFace + trim_messages: "
                   f"{data['speedup_vs_chathf_trim_no_speculation']:.2f}x (speculation: "
                   f"{data['speedup_vs_no_speculation']:.2f}x)")


def agent(
    steps: int = typer.Option(12, help="Agent steps (N)."),
    tool_tokens: int = typer.Option(512, help="Tokens per tool result (T)."),
    generate: int = typer.Option(24, help="Tokens generated per step (G), EOS ignored."),
    systems: Optional[str] = typer.Option(None, help="Comma-separated subset: ideal, ChatHuggingFace, "
                                          "'LlamaIndex HuggingFaceLLM', ChatFlashBack, 'LlamaIndex FlashBackLLM'."),
    quick: bool = typer.Option(False, help="N=4, T=128, G=8: a smoke run in well under 2 minutes."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_out: bool = typer.Option(False, "--json"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG: seconds per step, one line per system."),
    backend: str = typer.Option("local", "--backend", help="local: in-process systems; server: append vs "
                                "prepend on a prefix-caching server (llama.cpp/vLLM/SGLang)."),
    server: Optional[str] = typer.Option(None, "--server", help="With --backend server: the server URL "
                                         "(http://HOST:PORT/v1); default: start the embedded llama.cpp server."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="With --backend server: tokenizer spec of "
                                            "the served model (default: found from the server)."),
    no_speculation: bool = typer.Option(False, "--no-speculation", help="Also run ours with speculation and "
                                        "jump-forward off, in the same run (rows '... (no speculation)')."),
    tool_calls: bool = typer.Option(False, "--tool-calls", help="Every step a required (grammar-constrained) "
                                    "search_logs call copying the pattern the previous tool result suggests, "
                                    "instead of G free-text tokens (ours, ideal, ChatHuggingFace)."),
) -> None:
    """Replay one agent run through the ideal loop, ChatHuggingFace, LlamaIndex HuggingFaceLLM and ours."""
    from ..evaluation.agent_bench import Scenario, bench_agent
    from ..evaluation.common import save_plot
    from ..models import load_model

    for name, value in (("steps", steps), ("tool_tokens", tool_tokens), ("generate", generate)):
        check_int(name, value, 1)
    check_out_file("plot", plot)
    if backend not in ("local", "server"):
        bad_input(f"--backend must be 'local' or 'server', got {backend!r}")
    scenario = Scenario(4, 128, 8) if quick else Scenario(steps, tool_tokens, generate)
    scenario.tool_calls = tool_calls
    if backend == "server":
        from ..backends.server import ServerError
        from ..evaluation.server_bench import bench_server, print_report

        try:
            data = bench_server(server, scenario, model=model, tokenizer=tokenizer)
        except ServerError as exc:
            fail(str(exc))
        if json_out:
            emit(data, True)
        else:
            print_report(data, typer.echo)
        return
    lm = load_model(model, adapter=None)  # speed: the same weights as the baselines
    only = [s.strip() for s in systems.split(",")] if systems else None
    data = bench_agent(lm, model, scenario, only, no_speculation=no_speculation)
    if plot:
        rows = [r for r in data["systems"] if r["steps"]]
        save_plot(plot, list(range(1, scenario.steps + 1)),
                  {r["system"]: [s["seconds"] for s in r["steps"]] for r in rows},
                  "agent step", "seconds", f"{lm.name}: seconds per agent step")
        data["plot"] = plot
    if json_out:
        emit(data, True)
        return
    typer.echo(f"{data['model']} {data['dtype']} threads={data['threads']} scenario={data['scenario']}")
    for r in data["systems"]:
        if r["error"]:
            typer.echo(f"  {r['system']:<28} {r['error']}")
            continue
        extra = ""
        if "vs_ideal_total" in r:
            extra += f"  {r['vs_ideal_total']:.2f}x ideal"
        if "speedup_vs_chathf_total" in r:
            extra += f"  {r['speedup_vs_chathf_total']:.2f}x faster than ChatHuggingFace (last step " \
                     f"{r['speedup_vs_chathf_last']:.2f}x)"
        if "forwards_per_token" in r:
            extra += f"  {r['forwards_per_token']:.2f} forwards/token"
        typer.echo(f"  {r['system']:<28} total {r['total_s']:7.2f}s  last step {r['last_step_s']:6.2f}s  "
                   f"computed {r['tokens_computed']:6d}  reused {r['tokens_reused']:6d}{extra}")


def context(
    context: str = typer.Option("4096", "--context", help="Context length(s), comma-separated (a curve)."),
    append: int = typer.Option(64, "--append", help="Tokens appended per step."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    repeats: int = typer.Option(3, help="Timed repeats (median)."),
    json_out: bool = typer.Option(False, "--json"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of seconds vs context length."),
    restore: bool = typer.Option(False, "--restore", help="Instead: restore the context from the disk KV store "
                                 "vs recompute it (next-token logits compared)."),
    store_dir: Optional[str] = typer.Option(None, "--store-dir", help="With --restore: the store directory "
                                            "(default: a temporary one, removed after)."),
) -> None:
    """Cached append vs full recompute, measured in one run (the prize of keeping the cache)."""
    from ..evaluation.common import save_plot
    from ..evaluation.context_bench import bench_context, bench_restore, points_to_dicts
    from ..models import load_model

    contexts = _ints(context)  # the options first: a bad one is refused before the model loads
    check_int("append", append, 1, hint="pass the tokens appended per step, e.g. --append 64.")
    check_int("repeats", repeats, 1, hint="pass the timed repeats, e.g. --repeats 3.")
    check_out_file("plot", plot)
    check_out_dir("store_dir", store_dir)
    lm = load_model(model, adapter=None)  # speed: the same weights as the baselines
    if restore:
        import torch

        try:
            rows = points_to_dicts(bench_restore(lm, contexts, repeats=repeats, store_dir=store_dir))
        except ValueError as exc:
            fail(str(exc))
        data = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype),
                "threads": torch.get_num_threads(), "scenario": "restore", **rows[-1]}
        if len(rows) > 1:
            data["curve"] = rows
        emit(data, json_out)
        return
    try:
        points = bench_context(lm, contexts, append=append, repeats=repeats)
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


def pool(
    conversations: int = typer.Option(32, help="Conversations, taking turns round-robin."),
    steps: int = typer.Option(12, help="Steps per conversation."),
    tokens: int = typer.Option(256, help="Tokens of tool observation appended per step (T)."),
    generate: int = typer.Option(8, help="Tokens generated per step (G), EOS ignored."),
    hold: int = typer.Option(4, help="Conversations (at their final length) the memory budget holds."),
    systems: str = typer.Option("memory,disk", help="Comma-separated: memory (no disk tier), disk."),
    store_dir: Optional[str] = typer.Option(None, "--store-dir", help="Disk tier directory (default: a "
                                            "temporary one, removed after)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Many conversations through one ChatFlashBack under a small memory budget, with and without the
    disk KV tier: tokens recomputed and seconds (issue 19)."""
    from ..evaluation.pool_bench import bench_pool

    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    if not chosen or any(s not in ("memory", "disk") for s in chosen):
        bad_input(f"--systems takes memory and/or disk, got {systems!r}")
    for name, v in (("conversations", conversations), ("steps", steps), ("tokens", tokens), ("hold", hold)):
        check_int(name, v, 1)
    check_int("generate", generate, 0, hint="pass the tokens generated per step, e.g. --generate 8.")
    check_out_dir("store_dir", store_dir)
    data = bench_pool(model, conversations, steps, tokens, generate, hold, store_dir, chosen,
                      progress=None if json_out else typer.echo)
    if json_out:
        emit(data, True)
        return
    typer.echo(f"{data['model']} {data['dtype']} threads={data['threads']}: {conversations} conversations x "
               f"{steps} steps, T={tokens}, G={generate}, memory for {hold} ({data['max_cached_bytes'] / 2**20:.0f} MiB)")
    for name, r in data["systems"].items():
        typer.echo(f"  {name:<7} {r['seconds']:8.1f}s  computed {r['tokens_computed']:>8}  recomputed "
                   f"{r['tokens_recomputed']:>8}  restored {r['tokens_restored']:>8}")
    if "speedup" in data:
        ratio = data["recomputed_ratio"]
        typer.echo(f"  disk tier: {data['speedup']:.2f}x fewer seconds, " + (
            f"{ratio:.1f}x fewer recomputed tokens" if ratio is not None else "no token recomputed"))


def decode(
    context: str = typer.Option("512,4096", "--context", help="Context length(s), comma-separated."),
    tokens: int = typer.Option(32, help="Decoded tokens per measurement."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_out: bool = typer.Option(False, "--json"),
    no_speculation: bool = typer.Option(False, "--no-speculation", help="Also time generate with prompt-lookup "
                                        "speculation vs without it (the same tokens), in the same run."),
) -> None:
    """Milliseconds per decoded token vs the weight-streaming floor and vs transformers' DynamicCache."""
    from ..evaluation.context_bench import bench_decode
    from ..models import load_model

    contexts = _ints(context)  # the options first: a bad one is refused before the model loads
    check_int("tokens", tokens, 1, hint="pass the tokens decoded per measurement, e.g. --tokens 32.")
    lm = load_model(model, adapter=None)  # speed: the same weights as the baselines
    data = bench_decode(lm, contexts, tokens=tokens, speculation=no_speculation)
    if json_out:
        emit(data, True)
    else:
        typer.echo(f"{data['model']} {data['dtype']} threads={data['threads']} floor={data['floor_ms']:.1f} ms")
        for r in data["points"]:
            typer.echo(f"  context {r['context_tokens']:>5}: {r['ms_per_token']:.1f} ms/token "
                       f"({r['ratio_to_floor']:.2f}x floor), DynamicCache {r['dynamic_cache_ms_per_token']:.1f} ms "
                       f"({r['speedup_vs_dynamic_cache']:.2f}x slower)")
            g = r.get("generate")
            if g:
                typer.echo(f"    generate: speculation {g['speculation_ms_per_token']:.1f} ms/token vs "
                           f"{g['no_speculation_ms_per_token']:.1f} without ({g['speedup']:.2f}x), "
                           f"{g['forwards_per_token']:.2f} forwards/token, drafts {g['accepted']}/{g['drafted']} "
                           f"kept, identical tokens: {g['identical_tokens']}")


def bench_ralm_cmd(
    quick: bool = typer.Option(False, "--quick", help="One stride window per size (under 2 minutes)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model"),
    data: Optional[Path] = typer.Option(None, "--data", help="WikiText-2 directory (valid.txt, test.txt)."),
    as_json: bool = typer.Option(False, "--json"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart of tokens/s."),
    lengths: str = typer.Option("512,1024,2048", "--lengths", help="Context sizes in tokens, comma-separated "
                                "(e.g. 512,1024,2048,4096)."),
    no_speculation: bool = typer.Option(False, "--no-speculation", help="Also run both patterns with "
                                        "speculation off, in the same run (forwards/token before and after; "
                                        "the tokens are identical)."),
) -> None:
    """FlashBack append vs In-Context RALM prepend: tokens/s and forwards per generated token at 512,
    1,024, 2,048 context tokens (--lengths), prompt-lookup speculation inside the loop."""
    import json

    from ..evaluation.ralm_bench import RalmBenchConfig, run_ralm_bench
    from ..models import ModelLoadError, load_model
    from ..retrieval.base import RetrievalError

    sizes = _ints(lengths, "--lengths")  # the options first: a bad one is refused before the model loads
    check_dir("data", data, "WikiText-2 directory")
    check_out_file("plot", plot)
    try:
        lm = load_model(model)
    except ModelLoadError as exc:
        bad_input(str(exc))
    try:
        result = run_ralm_bench(lm, quick=quick, data_dir=data, progress=not as_json,
                                config=RalmBenchConfig(sizes=tuple(sizes), compare_no_speculation=no_speculation))
    except RetrievalError as exc:
        fail(str(exc))
        return
    if plot is not None:
        try:
            _plot(result, plot)
        except ImportError:
            fail("--plot needs matplotlib: pip install 'flashback-agents[bench]'.", 1)
        result["plot"] = str(plot)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"model {result['model']}, BM25 over {result['corpus_chunks']} WikiText-2 valid chunks, "
               f"stride {result['config']['stride']}, top-k {result['config']['top_k']}, "
               f"{result['config']['new_tokens']} new tokens")
    for line in ralm_table(result["rows"]):
        typer.echo(line)


def ralm_table(rows: list[dict]) -> list[str]:
    """``bench ralm``'s table: per size, tokens/s, the ratio, forwards per generated token and drafts
    kept for both layouts (and, with --no-speculation, the same without speculation)."""
    lines = [f"{'context':>8}  {'':<8}  {'append tok/s':>12}  {'prepend tok/s':>13}  {'append/prepend':>14}  "
             f"{'forwards/token (append / prepend)':>33}  {'drafts kept (append / prepend)':>30}"]
    for r in rows:
        for tag, name in (("", "spec" if "append_no_spec_tokens_per_s" in r else ""), ("no_spec_", "no spec")):
            if f"append_{tag}tokens_per_s" not in r:
                continue
            ratio = r[f"append_over_prepend{'_' + tag.rstrip('_') if tag else ''}"]
            fpt = f"{r[f'append_{tag}forwards_per_token']:.2f} / {r[f'prepend_{tag}forwards_per_token']:.2f}"
            kept = (f"{r[f'append_{tag}accepted']}/{r[f'append_{tag}drafted']} / "
                    f"{r[f'prepend_{tag}accepted']}/{r[f'prepend_{tag}drafted']}")
            lines.append(f"{r['context_tokens']:>8}  {name:<8}  {r[f'append_{tag}tokens_per_s']:>12.2f}  "
                         f"{r[f'prepend_{tag}tokens_per_s']:>13.2f}  {ratio:>13.2f}x  {fpt:>33}  {kept:>30}")
        if "append_identical_tokens" in r:
            lines.append(f"{'':>8}  identical tokens with and without speculation: append "
                         f"{r['append_identical_tokens']}, prepend {r['prepend_identical_tokens']}")
    return lines


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([x - 0.2 for x in xs], [r["append_tokens_per_s"] for r in rows], 0.4, label="append (FlashBack)")
    ax.bar([x + 0.2 for x in xs], [r["prepend_tokens_per_s"] for r in rows], 0.4, label="prepend (In-Context RALM)")
    ax.set_xticks(list(xs), [str(r["context_tokens"]) for r in rows])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{result['model']}: retrieval every {result['config']['stride']} tokens")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["append_tokens_per_s"], r["prepend_tokens_per_s"]), f"{r['append_over_prepend']:.1f}x",
                ha="center", va="bottom")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
