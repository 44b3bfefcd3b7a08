"""``flashback-agents serve``: the embedded llama.cpp server (xllamacpp) on loopback."""

from __future__ import annotations

from typing import Optional

import typer

from .common import fail


def serve(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                              help="A .gguf file (the default model's GGUF if omitted)."),
    port: int = typer.Option(8080, help="TCP port."),
    host: str = typer.Option("127.0.0.1", help="Interface (loopback by default; the server has no auth)."),
    ctx_size: int = typer.Option(8192, help="Context window per slot (tokens)."),
    parallel: int = typer.Option(1, help="Slots: concurrent conversations, each with its own prefix cache."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: half the cores, at most 8)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer spec advertised as the model id, so clients "
                                            "render with it (a model dir, .gguf or the default model name)."),
    cache_ram_mib: int = typer.Option(1024, help="llama.cpp host-memory prompt cache (MiB)."),
    verbose: bool = typer.Option(False, help="llama.cpp's own log."),
) -> None:
    """Serve a GGUF model with llama.cpp's server (OpenAI-compatible, prompt cache on) until Ctrl-C.

    Then: ChatFlashBack(model="http://127.0.0.1:PORT/v1") or FlashBack(model="http://127.0.0.1:PORT/v1") (LlamaIndex).
    """
    from ..models import ModelLoadError
    from ..llamacpp import ServeConfig, resolve_gguf, serve_forever

    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        fail("`serve` needs the xllamacpp wheel: pip install xllamacpp")
    try:
        resolve_gguf(model)
    except ModelLoadError as exc:
        fail(str(exc))
    serve_forever(ServeConfig(model=model, host=host, port=port, ctx_size=ctx_size, parallel=parallel,
                              threads=threads, tokenizer=tokenizer, cache_ram_mib=cache_ram_mib,
                              verbose=verbose))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("serve")(serve)
