"""What every command module shares: printing an error and exiting (:func:`fail`), printing a result (:func:`emit`)."""

from __future__ import annotations

import json

import typer

__all__ = ["fail", "emit"]


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
