"""``flashback-agents train|export``: train a FlashBack adapter, merge / export it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..training.ralm_corpus import CorpusError, read_corpus, read_ralm_corpus  # noqa: F401  (re-exported for callers)
from ..ralm_layout import RESTATE_TOKENS
from .common import (bad_input, check_choice, check_dir, check_file, check_float, check_int, check_out_dir,
                     check_out_file, check_threads, emit, fail, guarded)


def open_retriever(store: str) -> Any:
    """The retriever of an existing store (built with ``flashback-agents index``)."""
    from ..retrieval import open_store

    return open_store(store)


def train_cmd(
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Transcript file(s) (.jsonl / .json) or directories."),
    format: str = typer.Option("auto", "--format", help="openai | langchain | llamaindex | auto"),
    ralm_corpus: Optional[list[Path]] = typer.Option(None, "--ralm-corpus", help="Texts for RALM samples (file or "
                                                     "directory; repeatable; .jsonl lines may be retrieval-only "
                                                     "'store' articles)."),
    retriever_store: Optional[str] = typer.Option(None, "--retriever-store", help="Store to retrieve RALM evidence "
                                                  "from (default: BM25 over the corpus's own chunks, never a "
                                                  "text's own article)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model spec."),
    out: Path = typer.Option(..., "--out", help="Output adapter directory."),
    steps: int = typer.Option(200, "--steps"),
    lr: float = typer.Option(2e-4, "--lr"),
    batch_size: int = typer.Option(4, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    max_length: int = typer.Option(1024, "--max-length"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Default: 5% of steps."),
    eval_every: int = typer.Option(50, "--eval-every"),
    save_every: int = typer.Option(100, "--save-every"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip (and count) malformed conversations."),
    seed: int = typer.Option(0, "--seed"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: int = typer.Option(32, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    target_modules: str = typer.Option("auto", "--target-modules",
                                       help="LoRA targets; 'auto': the model's K/V projections (default_lora_targets)."),
    stride: int = typer.Option(16, "--stride", help="RALM: retrieve every N tokens."),
    query_tokens: int = typer.Option(32, "--query-tokens", help="RALM: query with the last N tokens."),
    top_k: int = typer.Option(2, "--top-k", help="RALM: chunks appended per retrieval (1..N per point)."),
    ralm_window: int = typer.Option(512, "--ralm-window", help="RALM: clean text tokens per sample."),
    ralm_branches: int = typer.Option(6, "--ralm-branches", help="RALM: retrieval points packed per sample "
                                      "(0: one plain sample per point)."),
    chunk_tokens: int = typer.Option(128, "--chunk-tokens", help="RALM: chunk size of the default retriever."),
    restate: int = typer.Option(RESTATE_TOKENS, "--restate", help="RALM: text tokens restated after the evidence "
                                "(0: the paper's layout; ralm_layout.py)."),
    eval_max_samples: int = typer.Option(64, "--eval-max-samples", help="Held-out samples for the eval loss."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (1 on a busy machine)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop after N steps of this run, with a "
                                             "checkpoint (a usable adapter) and the schedule of --steps; "
                                             "--resume continues."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no | bf16 | fp16"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a FlashBack adapter (LoRA on K/V + marker rows) from transcripts and/or a RALM corpus."""
    from ..models import load_model
    from ..training.samples import RalmSampleConfig, conversation_samples, ralm_samples
    from ..training.trainer import TrainConfig, TrainError, train
    from ..training.transcripts import FORMATS, TranscriptError, read_transcripts

    if not data and not ralm_corpus:
        fail("nothing to train on: pass --data FILE.jsonl and/or --ralm-corpus DIR_OR_FILE.")
    if format not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}.")
    _check_train_options(locals())
    if threads:
        import torch
        torch.set_num_threads(threads)
    transcripts = None
    if data:
        try:
            transcripts = read_transcripts(list(data), format=format, skip_invalid=skip_invalid)
        except TranscriptError as exc:
            fail(str(exc))
        except (OSError, ValueError) as exc:  # unreadable file: one line, no traceback
            fail(f"cannot read {', '.join(map(str, data))}: {exc}")
        if transcripts.n_skipped:
            typer.secho(f"skipped {transcripts.n_skipped} malformed conversation(s); first: "
                        f"{transcripts.skipped[0]}", fg=typer.colors.YELLOW, err=True)
    config = TrainConfig(
        model=model, output_dir=str(out), steps=steps, learning_rate=lr, batch_size=batch_size,
        grad_accum=grad_accum, max_length=max_length, warmup_steps=warmup_steps, eval_every=eval_every,
        save_every=save_every, resume=resume, seed=seed, gradient_checkpointing=gradient_checkpointing,
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=(target_modules.strip() if target_modules.strip() == "auto"
                        else [t.strip() for t in target_modules.split(",") if t.strip()]),
        mixed_precision=mixed_precision, eval_max_samples=eval_max_samples, max_steps_this_run=stop_after)
    from ..models import ModelLoadError

    try:
        lm = load_model(model, adapter=None, device="cpu", dtype=config.dtype)  # accelerate moves it
    except ModelLoadError as exc:
        bad_input(str(exc))
    samples = []
    summary: dict[str, Any] = {}
    if transcripts is not None:
        conv, stats = conversation_samples(lm, transcripts, max_length=max_length)
        samples += conv
        summary.update({"conversations": len(transcripts), "skipped_invalid": transcripts.n_skipped,
                        "conversation_samples": len(conv), "truncated": stats.truncated,
                        "dropped_empty": stats.dropped})
    if ralm_corpus:
        from ..training.ralm_corpus import chunk_retriever

        try:
            corpus = read_ralm_corpus(ralm_corpus)
            if not corpus.texts:
                raise CorpusError(f"no RALM training text in {', '.join(map(str, ralm_corpus))} "
                                  "(only retrieval-only 'store' articles).")
            retriever = (open_retriever(retriever_store) if retriever_store
                         else chunk_retriever(lm.tokenizer, corpus.articles, chunk_tokens, chunk_tokens // 8))
            rcfg = RalmSampleConfig(stride=stride, query_tokens=query_tokens, top_k=top_k, window=ralm_window,
                                    branches=ralm_branches, seed=seed, restate=restate)
            rcfg.check()
        except (OSError, ValueError, RuntimeError) as exc:
            fail(str(exc))
        ralm, rstats = ralm_samples(lm, corpus.texts, retriever, rcfg, progress=True)
        samples += ralm
        summary.update({"ralm_texts": len(corpus.texts), "ralm_store_articles": len(corpus.store),
                        "ralm_samples": len(ralm), "retrievals": rstats.retrievals,
                        "ralm_trained_tokens": rstats.trained_tokens})
    try:
        result = train(config, samples, lm=lm)
    except TrainError as exc:  # a damaged checkpoint under --out included: exit 2 with one error line
        fail(str(exc))
    summary.update({"output_dir": result.output_dir, "step": result.step, "finished": result.finished,
                    "resumed_from": result.resumed_from,
                    "first_loss": result.train_loss[0][1] if result.train_loss else None,
                    "last_loss": result.train_loss[-1][1] if result.train_loss else None,
                    "last_eval_loss": result.eval_loss[-1][1] if result.eval_loss else None})
    emit(summary, as_json)


def _check_train_options(o: dict[str, Any]) -> None:
    """The options of ``train``, checked before any file is read or a model is loaded (exit code 2)."""
    for path in o["data"] or []:
        if not path.expanduser().exists():
            bad_input(f"--data: no such file or directory: {path}; pass transcript files (.jsonl / .json) or "
                      "directories.")
    for path in o["ralm_corpus"] or []:
        if not path.expanduser().exists():
            bad_input(f"--ralm-corpus: no such file or directory: {path}; pass text files or directories.")
    if o["retriever_store"] is not None:
        check_dir("retriever_store", o["retriever_store"], "store directory")
    check_out_dir("out", o["out"])
    for name in ("steps", "batch_size", "grad_accum", "lora_r", "lora_alpha", "stride", "query_tokens", "top_k",
                 "ralm_window", "chunk_tokens"):
        check_int(name, o[name], 1)
    check_int("max_length", o["max_length"], 16, hint="pass the tokens per sample, e.g. --max-length 1024.")
    for name in ("warmup_steps", "eval_every", "save_every", "ralm_branches", "restate", "eval_max_samples"):
        check_int(name, o[name], 0)
    check_int("seed", o["seed"], 0, 2**32 - 1)
    check_int("stop_after", o["stop_after"], 1, hint="pass the steps to run now, e.g. --stop-after 50 (then --resume).")
    check_threads(o["threads"])
    check_float("lr", o["lr"], above=0, hint="pass a learning rate such as --lr 2e-4.")
    check_float("lora_dropout", o["lora_dropout"], minimum=0, below=1, hint="pass e.g. --lora-dropout 0.05.")
    check_choice("mixed_precision", o["mixed_precision"], ("no", "bf16", "fp16"))


def _check_adapter_dir(adapter: Path) -> None:
    """An adapter directory written by ``train``: its JSON files must be readable JSON objects (exit code 2)."""
    import json

    check_dir("adapter", adapter, "adapter directory")
    config = adapter / "adapter_config.json"
    if not config.is_file():
        bad_input(f"--adapter: {adapter} is not an adapter directory (no adapter_config.json); pass a directory "
                  "written by `flashback-agents train`.")
    for path in (config, adapter / "flashback_adapter.json"):
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            bad_input(f"--adapter: {path} is not readable JSON ({str(exc)[:120]}); retrain the adapter or restore "
                      "the file.")
        else:
            if not isinstance(data, dict):
                bad_input(f"--adapter: {path} must hold a JSON object, got {type(data).__name__}; retrain the "
                          "adapter or restore the file.")


def export_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory written by `train`."),
    out: Path = typer.Option(..., "--out", help="Where to write the merged Hugging Face model."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model spec (default: the one recorded in the adapter)."),
    dtype: str = typer.Option("float32", "--dtype"),
    as_json: bool = typer.Option(False, "--json"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Also write a GGUF (Llama family) with the "
                                        "marker tokens, for llama.cpp / `flashback-agents serve`."),
    gguf_base: Optional[Path] = typer.Option(None, "--gguf-base", help="The base model's GGUF (metadata and "
                                             "tokenizer are copied from it; default: the base spec's GGUF)."),
    gguf_dtype: str = typer.Option("f16", "--gguf-dtype", help="f16 or f32 tensors in the GGUF."),
) -> None:
    """Merge an adapter into its base model: a plain HF directory loadable with load_model(OUT)."""
    from ..models import ModelLoadError, resolve_dtype, resolve_spec
    from ..training.trainer import TrainError, export_merged, read_adapter_meta

    _check_adapter_dir(adapter)
    check_out_dir("out", out)
    if out.expanduser().resolve() == adapter.expanduser().resolve():
        bad_input("--out must not be the adapter directory (it is replaced by the merged model); pass a new directory.")
    try:
        resolve_dtype(dtype, "cpu")
    except ModelLoadError as exc:
        bad_input(f"--dtype: {exc}")
    try:
        if base is not None:
            resolve_spec(base)
    except ModelLoadError as exc:
        bad_input(f"--base: {exc}")
    if gguf is not None:
        check_out_file("gguf", gguf)
        check_file("gguf_base", gguf_base, "GGUF file")
        check_choice("gguf_dtype", gguf_dtype, ("f16", "f32"))
    try:
        path = export_merged(adapter, out, base=base, dtype=dtype)
    except TrainError as exc:
        fail(str(exc))
    result = {"merged_model": str(path)}
    if gguf is not None:
        from ..export_gguf import GGUFExportError, base_gguf_for, export_gguf
        from ..models import ModelLoadError

        try:
            source = gguf_base or base_gguf_for(base or read_adapter_meta(adapter).get("base_model"))
            result["gguf"] = str(export_gguf(path, gguf, source, dtype=gguf_dtype))
        except (GGUFExportError, ModelLoadError) as exc:
            fail(str(exc))
    emit(result, as_json)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:  # noqa: ARG001 - no bench commands here
    app.command("train")(guarded(train_cmd))
    app.command("export")(guarded(export_cmd))
