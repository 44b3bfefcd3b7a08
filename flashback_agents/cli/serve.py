"""``flashback-agents serve``: the embedded llama.cpp server (xllamacpp) on loopback."""

from __future__ import annotations

from typing import Optional

import typer

from .common import bad_input, check_int, check_threads, fail, guarded


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
    from ..models import ModelLoadError, check_gguf_file
    from ..llamacpp import ServeConfig, resolve_gguf, serve_forever

    check_int("port", port, 1, 65535, hint="pass a free TCP port, e.g. --port 8080.")
    if not host.strip():
        bad_input("--host must name an interface, e.g. --host 127.0.0.1.")
    check_int("ctx_size", ctx_size, 16, hint="pass the tokens per slot, e.g. --ctx-size 8192.")
    check_int("parallel", parallel, 1, 256, hint="pass the number of slots, e.g. --parallel 1.")
    check_threads(threads)
    check_int("cache_ram_mib", cache_ram_mib, -1, hint="pass MiB of prompt cache (0: off, -1: no limit), e.g. "
              "--cache-ram-mib 1024.")
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        fail("`serve` needs the xllamacpp wheel: pip install xllamacpp", 1)
    try:
        gguf = resolve_gguf(model)
    except ModelLoadError as exc:
        fail(str(exc))
    try:
        check_gguf_file(gguf)  # garbage is refused here, never handed to llama.cpp
    except ModelLoadError as exc:
        bad_input(str(exc))
    serve_forever(ServeConfig(model=model, host=host, port=port, ctx_size=ctx_size, parallel=parallel,
                              threads=threads, tokenizer=tokenizer, cache_ram_mib=cache_ram_mib,
                              verbose=verbose))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("serve")(guarded(serve))
