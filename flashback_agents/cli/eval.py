"""``flashback-agents eval ppl``: the FlashBack paper's perplexity table; ``eval agents``: the held-out
agent questions through LangChain and LlamaIndex agent loops, scored by category; ``eval docqa``: invented-fact
document QA through the FlashBack query engine and LlamaIndex's default one on the same LLM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from ..models import DEFAULT_MODEL
from ..ralm_layout import RESTATE_TOKENS
from .common import bad_input, check_int, check_out_file, check_threads, emit, fail, guarded


QUICK = {"tokens": 512, "window": 256, "train_steps": 20, "train_max_length": 256}
FULL = {"tokens": 8192, "window": 512, "train_steps": 100, "train_max_length": 512}


def register(app: typer.Typer, bench_app: typer.Typer) -> None:  # noqa: ARG001 - no bench commands here
    eval_app = typer.Typer(help="Quality evaluations (perplexity with retrieval: prepend vs append vs adapter; "
                           "held-out agent questions; document QA through the LlamaIndex query engines).",
                           no_args_is_help=True)
    eval_app.command("ppl")(guarded(ppl))
    eval_app.command("agents")(guarded(agents))
    eval_app.command("docqa")(guarded(docqa))
    app.add_typer(eval_app, name="eval")


def _top_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"--top-k expects comma-separated integers such as 1,2; got {text!r}")
        raise
    if not ks or any(k < 1 for k in ks):
        fail(f"--top-k values must be integers >= 1, got {text!r}")
    return tuple(sorted(set(ks)))


def ppl(
    data: str = typer.Option("wikitext", "--data", help="wikitext (test; retrieval from valid) or loghub:SYSTEM "
                             "(second half of SYSTEM_2k.log; retrieval from its first half)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Tokens evaluated per setting [8192; quick 512]."),
    window: Optional[int] = typer.Option(None, "--window", help="Max tokens of text so far per block [512; quick 256]."),
    stride: int = typer.Option(16, "--stride", help="Retrieve every N tokens."),
    query_tokens: int = typer.Option(32, "--query-tokens", help="Query with the last N tokens."),
    restate: int = typer.Option(RESTATE_TOKENS, "--restate", help="Text tokens restated after appended evidence "
                                "(0: the paper's layout; ralm_layout.py)."),
    top_k: str = typer.Option("1,2", "--top-k", help="Comma-separated top-k values (table columns)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Trained FlashBack adapter directory "
                                           "[default: the adapter shipped for the model]."),
    train_adapter_steps: Optional[int] = typer.Option(
        None, "--train-adapter-steps", help="For a model without a shipped adapter and no --adapter: train a quick "
        "adapter on WikiText-2 valid for N steps (cached; 0 skips the adapter rows) [100; quick 20]."),
    quick: bool = typer.Option(False, "--quick", help="512 tokens, 256-token blocks: a few minutes."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is faster on a busy CPU)."),
    json_out: bool = typer.Option(False, "--json"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG: perplexity vs top-k, one line per setting."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    settings: Optional[str] = typer.Option(None, "--settings", help="Comma-separated rows to run (default: all): "
                                           "none, none+adapter, prepend, prepend+adapter, append-plain, append, "
                                           "append+adapter-paper, flashback."),
) -> None:
    """Perplexity without retrieval, with prepended evidence (In-Context RALM), with appended marked
    evidence (FlashBack) without and with an adapter, on the same tokens."""
    import torch

    from ..evaluation.perplexity import (
        AdapterTrainConfig,
        PerplexityError,
        PplConfig,
        evaluate_perplexity,
        format_table,
        parse_data,
        train_ralm_adapter,
    )
    from ..models import ModelLoadError, load_model, shipped_adapter

    # the options first (exit code 2): a bad one is refused before any data or model loads
    for name, value in (("tokens", tokens), ("window", window), ("stride", stride), ("query_tokens", query_tokens)):
        check_int(name, value, 1)
    check_int("train_adapter_steps", train_adapter_steps, 0, hint="pass 0 to skip the adapter rows or e.g. "
              "--train-adapter-steps 100.")
    check_threads(threads)
    check_out_file("plot", plot)
    preset = QUICK if quick else FULL
    ks = _top_ks(top_k)
    cfg = PplConfig(tokens=tokens if tokens is not None else preset["tokens"],
                    window=window if window is not None else preset["window"],
                    stride=stride, query_tokens=query_tokens, top_ks=ks, restate=restate)
    steps = train_adapter_steps if train_adapter_steps is not None else preset["train_steps"]
    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        cfg.check()
        if steps < 0:
            raise PerplexityError(f"--train-adapter-steps must be >= 0, got {steps}.")
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise PerplexityError(f"{adapter} is not an adapter directory (no adapter_config.json).")
        ds = parse_data(data)
        training: dict[str, Any] | None = None
        note = ""
        lm = load_model(model, adapter=None)
        shipped = shipped_adapter(lm.name)
        adapter_dir = str(adapter) if adapter is not None else (str(shipped) if shipped else None)
        if adapter_dir is None and steps > 0:
            tcfg = AdapterTrainConfig(steps=steps, max_length=preset["train_max_length"], top_k=max(ks))
            training = train_ralm_adapter(model, cfg, tcfg, progress=progress)
            adapter_dir = training["adapter"]
        elif adapter_dir is None:
            note = "adapter rows skipped: no --adapter and --train-adapter-steps 0"
        adapter_lm = load_model(model, adapter=adapter_dir) if adapter_dir else None
        only = [x.strip() for x in settings.split(",") if x.strip()] if settings is not None else None
        result = evaluate_perplexity(lm, ds, cfg, adapter_lm=adapter_lm, progress=progress, settings=only)
    except (PerplexityError, ModelLoadError) as exc:
        fail(str(exc))
        return
    if training is not None:
        result["adapter_training"] = training
        result["seconds"] += training.get("seconds", 0.0)
    if note:
        result["note"] = note
    result["threads"] = torch.get_num_threads()
    if plot:
        from ..evaluation.common import save_plot

        save_plot(plot, list(cfg.top_ks), {r["setting"]: [r[f"ppl_top{k}"] for k in cfg.top_ks] for r in result["rows"]},
                  "top-k", "perplexity", f"{result['model']}: {result['data']}")
        result["plot"] = plot
    if json_out:
        emit(result, True)
        return
    typer.echo(f"{result['model']} on {result['data']}: {result['tokens_evaluated']} tokens evaluated, "
               f"stride {cfg.stride}, query {cfg.query_tokens} tokens, blocks of <= {cfg.window} tokens")
    if training is not None:
        typer.echo(f"adapter: {training['adapter']} ({training['steps']} steps, "
                   f"{'reused' if training.get('reused') else 'trained now'})")
    elif adapter_dir:
        typer.echo(f"adapter: {adapter_dir}")
    typer.echo(format_table(result))
    if note:
        typer.echo(f"note: {note}")
    typer.echo(f"total {result['seconds']:.1f}s")


def _csv(text: Optional[str]) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def agents(
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="auto (the shipped default), none, or a "
                                                "trained adapter directory; repeat to compare adapters in one run "
                                                "(default: auto)."),
    framework: str = typer.Option("both", "--framework", help="both, langchain (create_agent + ChatFlashBack) or "
                                  "llamaindex (FunctionAgent + FlashBack)."),
    repeat_calls: Optional[str] = typer.Option(None, "--repeat-calls", help="allow or forbid: passed to both LLM "
                                               "classes as repeat_calls= (not given: their default)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (after --ids/--category)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated question ids (agent_questions.py)."),
    category: Optional[str] = typer.Option(None, "--category", help="Comma-separated categories: single, choice, "
                                           "no_tool_needed, no_fit, chain, two_entities."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="max_tokens of each model reply."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Agent system prompt (default: none)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is faster on a busy CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result (every run) as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the whole result as JSON to this file."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Held-out agent questions (tool families the training data never had) through real LangChain
    create_agent and LlamaIndex FunctionAgent loops (at most 6 model calls), scored per category:
    right tool, arguments right, no call when none fits, final answer right, ended within 6 steps."""
    import json

    from ..evaluation.agent_eval import (FRAMEWORKS, MAX_STEPS, AgentEvalError, evaluate_agents, format_table,
                                         select_questions)
    from ..models import ModelLoadError

    fw = framework.strip().lower()
    if fw not in ("both", *FRAMEWORKS):
        fail(f"--framework must be both, langchain or llamaindex, got {framework!r}")
    extra: dict[str, Any] = {}
    if repeat_calls is not None:
        if repeat_calls not in ("allow", "forbid"):
            fail(f"--repeat-calls must be allow or forbid, got {repeat_calls!r}")
        extra["repeat_calls"] = repeat_calls
    if threads is not None and threads < 1:
        fail(f"--threads must be >= 1, got {threads}")
    if max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    check_out_file("out", out)
    try:
        questions = select_questions(ids=_csv(ids) or None, limit=limit, categories=_csv(category) or None)
        # adapters, frameworks and extra fields are checked before any model is loaded
        result = evaluate_agents(questions, adapters=adapter or ["auto"],
                                 frameworks=list(FRAMEWORKS) if fw == "both" else [fw], model=model,
                                 max_tokens=max_tokens, max_steps=MAX_STEPS, extra=extra,
                                 system_prompt=system_prompt, threads=threads, progress=progress)
    except (AgentEvalError, ModelLoadError) as exc:
        fail(str(exc))
        return
    data = result.as_dict()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    if json_out:
        emit(data, True)
        return
    adapters = ", ".join(f"{a['label']}" + (f" ({a['path']})" if a["path"] and a["path"] != a["label"] else "")
                         for a in result.adapters)
    typer.echo(f"{result.model}: {len(result.questions)} questions x {', '.join(result.frameworks)}; "
               f"adapters: {adapters}; max_tokens {result.max_tokens}"
               + (f"; {', '.join(f'{k}={v}' for k, v in extra.items())}" if extra else ""))
    typer.echo("")
    typer.echo(format_table(result))
    if out is not None:
        typer.echo(f"wrote {out}")
    typer.echo(f"total {result.seconds:.1f}s")


def docqa(
    adapter: str = typer.Option("auto", "--adapter", help="auto (the shipped default), none, or a trained adapter "
                                "directory."),
    top_k: int = typer.Option(2, "--top-k", help="similarity_top_k of both query engines."),
    max_tokens: int = typer.Option(48, "--max-tokens", help="max_tokens of each answer."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is faster on a busy CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result (every answer) as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the whole result as JSON to this file."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Print each answer as it comes."),
) -> None:
    """Invented-fact document QA: the FlashBack query engine against LlamaIndex's default one, same LLM.

    The FlashBack query engine (question first, retrieved documents appended and marked) and
    index.as_query_engine (LlamaIndex's default templates, documents before the question) answer the
    questions of evaluation/doc_qa.py on the same LLM, index and retrieval; right answers per engine."""
    import json

    from ..evaluation.doc_qa import DocQAError, adapter_arg, format_table, run_doc_qa
    from ..models import ModelLoadError

    # the options first (exit code 2): a bad one is refused before the index or the model loads
    check_int("top_k", top_k, 1)
    check_int("max_tokens", max_tokens, 1)
    check_threads(threads)
    check_out_file("out", out)
    try:
        adapter_arg(adapter)
    except DocQAError as exc:
        bad_input(str(exc))
    try:
        result = run_doc_qa(model=model, adapter=adapter, top_k=top_k, max_tokens=max_tokens, threads=threads,
                            progress=progress and not json_out)
    except (DocQAError, ModelLoadError) as exc:
        bad_input(str(exc))
        return
    except ImportError as exc:
        fail(str(exc), 1)
        return
    if out is not None:
        out = Path(os.path.expanduser(str(out)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if json_out:
        emit(result, True)
        return
    a = result["adapter"]
    typer.echo(f"{result['model']}: {result['questions']} questions over {result['documents']} invented documents; "
               f"adapter {a['label']}" + (f" ({a['path']})" if a["path"] and a["path"] != a["label"] else "")
               + f"; top_k {result['top_k']}; max_tokens {result['max_tokens']}")
    typer.echo("")
    typer.echo(format_table(result))
    if result.get("must_show"):
        typer.echo("")
        typer.echo(result["must_show"])
    if out is not None:
        typer.echo(f"wrote {out}")
    typer.echo(f"total {result['seconds']:.1f}s")
