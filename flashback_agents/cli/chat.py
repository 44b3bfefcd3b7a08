"""Engine commands: ``chat`` (interactive, shows computed vs reused tokens per turn) and ``info``."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..models import DEFAULT_MODEL
from .common import bad_input, check_float, check_int, emit, guarded


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("chat")(guarded(chat))
    app.command("info")(guarded(info))


def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model spec: default name, HF id, dir or .gguf."),
    adapter: Optional[str] = typer.Option("none", help="FlashBack adapter directory; 'auto' = the one shipped for "
                                          "the model, 'none' = no adapter."),
    system: str = typer.Option("You are a helpful assistant.", help="System prompt."),
    max_new_tokens: int = typer.Option(256, help="Maximum tokens per reply."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
) -> None:
    """Chat interactively; every turn computes only the new tokens (shown after each reply)."""
    from ..engines import local_engine
    from ..context import ContextOverflowError
    from ..generation import GenerationConfig, GenerationConfigError
    from ..layout import Message
    from ..models import ModelLoadError, load_model

    # the options first: a bad one is refused before the model loads
    check_int("max_new_tokens", max_new_tokens, 1, hint="pass the most tokens per reply, e.g. --max-new-tokens 256.")
    check_float("temperature", temperature, 0, hint="pass 0 for greedy decoding or e.g. --temperature 0.7.")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    try:
        cfg.validate()
    except GenerationConfigError as exc:
        bad_input(str(exc))
    try:
        lm = load_model(model, adapter=None if (adapter or "").lower() == "none" else adapter)
    except ModelLoadError as exc:
        bad_input(str(exc))
    # on_overflow="error": a turn that does not fit is refused (and said so), the conversation goes on
    engine = local_engine(lm, on_overflow="error")
    messages = [Message("system", system)]
    typer.echo(f"{lm.name} on {lm.device} ({lm.max_positions} tokens). Empty line or Ctrl-D to quit.")
    try:
        while True:
            try:
                line = input("you> ") if sys.stdin.isatty() else sys.stdin.readline()
            except EOFError:
                break
            except UnicodeDecodeError as exc:
                bad_input(f"stdin is not UTF-8 text ({exc.reason}); convert it to "
                          "UTF-8 (e.g. `iconv -t UTF-8`) and try again.")
            try:
                line.encode("utf-8")  # undecodable bytes read as lone surrogates (a C locale's surrogateescape)
            except UnicodeEncodeError:
                bad_input("stdin is not UTF-8 text (bytes that do not decode); convert it to UTF-8 "
                          "(e.g. `iconv -t UTF-8`) and try again.")
            line = line.strip()
            if not line:
                break
            messages.append(Message("user", line))
            try:
                run = engine.stream_chat(messages, config=cfg)
            except ContextOverflowError as exc:
                messages.pop()
                typer.secho(str(exc), fg=typer.colors.RED, err=True)
                continue
            typer.echo("bot> ", nl=False)
            for delta in run:
                typer.echo(delta, nl=False)
            reply, usage = run.reply, run.reply.usage
            messages.append(Message("assistant", reply.text))
            typer.secho(f"\n  [tokens computed {usage.computed}, reused {usage.cache_read}, generated "
                        f"{len(reply.token_ids)} in {usage.decode_seconds:.2f}s]", fg=typer.colors.BRIGHT_BLACK)
    finally:
        engine.close()


def info(model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
         load: bool = typer.Option(False, help="Also load the model and report its window and dtype."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """Model, device, cache dir and versions."""
    import torch
    import transformers

    from .. import __version__
    from ..models import (
        ModelLoadError,
        cache_dir,
        default_gguf_path,
        load_model,
        shipped_adapter, DEFAULT_ADAPTER,
    )

    data: dict = {"flashback_agents": __version__, "torch": torch.__version__,
                  "transformers": transformers.__version__, "model": model,
                  "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "threads": torch.get_num_threads(), "cache_dir": str(cache_dir())}
    try:
        data["default_gguf"] = str(default_gguf_path())
    except ModelLoadError as exc:
        data["default_gguf"] = f"missing ({exc})"
    data["default_converted"] = (cache_dir() / DEFAULT_MODEL / "config.json").is_file()
    shipped = shipped_adapter(model)
    data["shipped_adapter"] = str(shipped) if shipped else None  # adapter="auto" attaches it
    data["adapter"] = (str(shipped) if shipped else None) if DEFAULT_ADAPTER == "auto" else DEFAULT_ADAPTER
    if load:
        try:
            lm = load_model(model)
        except ModelLoadError as exc:
            bad_input(str(exc))
        data.update(name=lm.name, adapter=lm.adapter, dtype=str(lm.dtype), max_positions=lm.max_positions,
                    parameters=sum(p.numel() for p in lm.model.parameters()), marker_ids=list(lm.marker_ids))
    emit(data, json_out)
