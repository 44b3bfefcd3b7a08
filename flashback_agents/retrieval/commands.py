"""CLI: ``index``, ``search``, ``generate`` (the FlashBack loop over a store) and ``bench ralm``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    from ..cli import emit, fail

    @app.command("index")
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
        from .base import RetrievalError
        from .store import index_paths

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

    @app.command("search")
    def search_cmd(
        query: str = typer.Argument(..., help="What to look for."),
        store: Path = typer.Option(..., "--store", help="A store made by `flashback-agents index`."),
        k: int = typer.Option(4, "-k", "--top-k", help="How many chunks."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Query a store and print the best chunks with their source and lines."""
        import json

        from .base import RetrievalError
        from .store import open_store

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

    @app.command("generate")
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
        from .base import RetrievalError
        from .store import open_store

        try:
            retriever = open_store(store)
            loop_args = dict(stride=stride, query_tokens=query_tokens, top_k=top_k, pattern=pattern)
            if pattern not in ("append", "prepend"):
                raise RetrievalError(f"--pattern must be append or prepend, got {pattern!r}.")
            if max_new_tokens < 0:
                raise RetrievalError("--max-new-tokens must be >= 0.")
            lm = load_model(model, adapter=adapter)
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

    @bench_app.command("ralm")
    def bench_ralm_cmd(
        quick: bool = typer.Option(False, "--quick", help="One stride window per size (under 2 minutes)."),
        model: str = typer.Option("smollm2-135m-instruct", "--model"),
        data: Optional[Path] = typer.Option(None, "--data", help="WikiText-2 directory (valid.txt, test.txt)."),
        as_json: bool = typer.Option(False, "--json"),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart of tokens/s."),
    ) -> None:
        """FlashBack append vs In-Context RALM prepend: tokens/s at 512, 1,024, 2,048 context tokens."""
        import json

        from ..models import ModelLoadError, load_model
        from ..ralm import run_ralm_bench
        from .base import RetrievalError

        try:
            result = run_ralm_bench(load_model(model), quick=quick, data_dir=data, progress=not as_json)
        except (RetrievalError, ModelLoadError) as exc:
            fail(str(exc))
            return
        if plot is not None:
            try:
                _plot(result, plot)
            except ImportError:
                fail("--plot needs matplotlib: pip install 'flashback-agents[bench]'.")
            result["plot"] = str(plot)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(f"model {result['model']}, BM25 over {result['corpus_chunks']} WikiText-2 valid chunks, "
                   f"stride {result['config']['stride']}, top-k {result['config']['top_k']}, "
                   f"{result['config']['new_tokens']} new tokens")
        typer.echo(f"{'context':>8}  {'append tok/s':>12}  {'prepend tok/s':>13}  {'append/prepend':>14}")
        for r in result["rows"]:
            typer.echo(f"{r['context_tokens']:>8}  {r['append_tokens_per_s']:>12.2f}  "
                       f"{r['prepend_tokens_per_s']:>13.2f}  {r['append_over_prepend']:>13.2f}x")


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
