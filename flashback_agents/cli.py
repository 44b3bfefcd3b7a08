"""The ``flashback-agents`` command line.

Each feature area registers its own commands from its own module (``register(app, bench_app)``),
so this file stays a table of contents. Heavy imports happen inside commands: ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Optional

import typer

app = typer.Typer(help="Fast local LLM agents: a persistent KV cache and the FlashBack append layout.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Speed benchmarks, printed as ratios against a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Modules that add commands: each defines register(app, bench_app). Missing optional extras are skipped.
COMMAND_MODULES = (
    "flashback_agents.commands",
    "flashback_agents.retrieval.commands",
    "flashback_agents.training.commands",
    "flashback_agents.evaluation.commands",
    "flashback_agents.evaluation.eval_commands",
    "flashback_agents.server_commands",
)


def fail(message: str, code: int = 1) -> None:
    """Print a clear error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def emit(data: dict, as_json: bool) -> None:
    """Print a result as JSON or as aligned ``key: value`` lines."""
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        width = max((len(k) for k in data), default=0)
        for k, v in data.items():
            typer.echo(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:  # a feature module not present (or its optional extra missing)
        if _exc.name and _name.startswith(_exc.name):
            continue
        if os.environ.get("FLASHBACK_DEBUG"):
            raise
        continue
    _mod.register(app, bench_app)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point."""
    from .models import ModelLoadError

    try:
        app(args=argv, standalone_mode=True)
    except ModelLoadError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
