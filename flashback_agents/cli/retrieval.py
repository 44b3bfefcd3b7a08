"""``flashback-agents index|search|generate``: build a retrieval store, query it, run the FlashBack loop over it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import bad_input, check_choice, check_dir, check_int, check_out_dir, emit, fail, guarded


def index_cmd(
    paths: List[Path] = typer.Argument(..., help="Files and directories to index (directories recursively)."),
    store: Path = typer.Option(..., "--store", help="Store directory (created if needed)."),
    retriever: Optional[str] = typer.Option(None, "--retriever", help="chroma (default for a new store) or bm25."),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="Tokens per chunk (default 128)."),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="Tokens shared by neighbouring chunks (default 16)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="HF tokenizer for chunking (default: the default model's)."),
    embedding_model: Optional[str] = typer.Option(None, "--embedding-model", help="sentence-transformers name or path (chroma)."),
    chroma_host: Optional[str] = typer.Option(None, "--chroma-host", help="Use a `chroma run` server instead of an embedded Chroma."),
    chroma_port: int = typer.Option(8000, "--chroma-port"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Index files into a store; re-indexing updates changed files and drops deleted ones."""
    from ..retrieval.base import RetrievalError
    from ..retrieval.store import index_paths

    for p in paths:
        if not p.expanduser().exists():
            bad_input(f"no such file or directory to index: {p}; pass existing files or directories.")
    check_out_dir("store", store)
    if retriever is not None:
        check_choice("retriever", retriever, ("chroma", "bm25"))
    check_int("chunk_tokens", chunk_tokens, 8, hint="pass the tokens per chunk, e.g. --chunk-tokens 128.")
    check_int("overlap", overlap, 0, hint="pass the tokens neighbouring chunks share, e.g. --overlap 16.")
    if chunk_tokens is not None and overlap is not None and overlap >= chunk_tokens:
        bad_input(f"--overlap ({overlap}) must be smaller than --chunk-tokens ({chunk_tokens}).")
    check_int("chroma_port", chroma_port, 1, 65535, hint="pass the port of `chroma run`, e.g. --chroma-port 8000.")
    try:
        rep = index_paths([str(p) for p in paths], store, retriever, chunk_tokens=chunk_tokens, overlap=overlap,
                          tokenizer=tokenizer, embedding_model=embedding_model, host=chroma_host,
                          port=chroma_port if chroma_host else None, progress=True)
    except RetrievalError as exc:
        fail(str(exc))
        return
    data = rep.as_dict()
    if not as_json:
        data["skipped"] = len(rep.skipped)
        for s in rep.skipped:
            typer.secho(f"skipped {s}", fg=typer.colors.YELLOW, err=True)
    emit(data, as_json)

def search_cmd(
    query: str = typer.Argument(..., help="What to look for."),
    store: Path = typer.Option(..., "--store", help="A store made by `flashback-agents index`."),
    k: int = typer.Option(4, "-k", "--top-k", help="How many chunks."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Query a store and print the best chunks with their source and lines."""
    import json

    from ..retrieval.base import RetrievalError
    from ..retrieval.store import open_store

    check_int("top_k", k, 1, hint="pass how many chunks to print, e.g. -k 4.")
    if store.expanduser().is_file():
        bad_input(f"--store: {store} is a file; pass a store directory made by `flashback-agents index`.")
    try:
        docs = open_store(store).retrieve(query, k)
    except RetrievalError as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in docs], indent=2))
        return
    if not docs:
        typer.echo("no matching chunks")
    for i, d in enumerate(docs, 1):
        m = d.metadata
        typer.secho(f"{i}. {m.get('source')}:{m.get('start_line')}-{m.get('end_line')}  score {d.score:.4f}",
                    bold=True)
        snippet = d.text.strip().replace("\n", "\n   ")
        typer.echo("   " + (snippet[:600] + (" ..." if len(snippet) > 600 else "")))

def generate_cmd(
    store: Path = typer.Option(..., "--store", help="A store made by `flashback-agents index`."),
    prompt: str = typer.Option(..., "--prompt", help="The user message."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Model spec (see `load_model`)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A trained FlashBack adapter directory."),
    stride: int = typer.Option(16, "--stride", help="Retrieve every this many generated tokens."),
    query_tokens: int = typer.Option(32, "--query-tokens", help="Query with the last this many tokens."),
    top_k: int = typer.Option(2, "--top-k", help="Chunks per retrieval (0: no retrieval)."),
    pattern: str = typer.Option("append", "--pattern", help="append (FlashBack) or prepend (baseline)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    raw: bool = typer.Option(False, "--raw", help="Feed the prompt as raw text (no chat template)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate with retrieval every --stride tokens; evidence goes into the context, not the output."""
    import json

    from ..context import CachedContext
    from ..generation import GenerationConfig
    from ..layout import Message
    from ..models import ModelLoadError, load_model
    from ..ralm import RetrievalLoop
    from ..retrieval.base import RetrievalError
    from ..retrieval.store import open_store

    check_choice("pattern", pattern, ("append", "prepend"))
    check_int("stride", stride, 1, hint="pass how many generated tokens between retrievals, e.g. --stride 16.")
    check_int("query_tokens", query_tokens, 1, hint="pass how many trailing tokens form the query, e.g. --query-tokens 32.")
    check_int("top_k", top_k, 0, hint="pass the chunks per retrieval (0: no retrieval), e.g. --top-k 2.")
    check_int("max_new_tokens", max_new_tokens, 0, hint="pass the most tokens to generate, e.g. --max-new-tokens 128.")
    check_dir("adapter", adapter, "adapter directory")
    if store.expanduser().is_file():
        bad_input(f"--store: {store} is a file; pass a store directory made by `flashback-agents index`.")
    try:
        retriever = open_store(store)
        loop_args = dict(stride=stride, query_tokens=query_tokens, top_k=top_k, pattern=pattern)
        try:
            lm = load_model(model, adapter=adapter)
        except ModelLoadError as exc:
            bad_input(str(exc))
        ctx = CachedContext(lm)
        if raw:
            ids, answer_prefix = lm.encode(prompt), []
        else:  # evidence for the question goes after it, before the assistant turn starts
            ids = ctx.layout.render([Message("user", prompt)], add_generation_prompt=False)
            answer_prefix = ctx.layout.generation_prompt()
        res = RetrievalLoop(ctx, retriever, **loop_args).generate(
            ids, GenerationConfig(max_new_tokens=max_new_tokens), answer_prefix=answer_prefix)
    except (RetrievalError, ModelLoadError) as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(res.as_dict(), indent=2, default=str))
        return
    typer.echo(res.text)
    typer.secho(f"\n[{len(res.retrievals)} retrievals, {res.generated_tokens} tokens, "
                f"{res.tokens_per_second:.1f} tok/s, pattern={res.pattern}]", err=True, dim=True)
    for r in res.retrievals:
        typer.secho(f"  step {r.step}: +{len(r.added_ids)} chunks ({r.evidence_tokens} tokens), computed "
                    f"{r.tokens_computed}, reused {r.tokens_reused}, query {r.query[-60:]!r}", err=True, dim=True)

def register(app: typer.Typer, bench_app: typer.Typer) -> None:  # noqa: ARG001 - bench ralm: cli/bench.py
    app.command("index")(guarded(index_cmd))
    app.command("search")(guarded(search_cmd))
    app.command("generate")(guarded(generate_cmd))
