"""What every command module shares: printing an error and exiting (:func:`fail`, :func:`bad_input`), the
checks of option values made before any model is loaded (``check_*``), the command boundary that turns
our errors and ``OSError`` into one ``error:`` line (:func:`guarded`), printing a result (:func:`emit`)."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

__all__ = ["fail", "bad_input", "emit", "guarded", "BAD_INPUT", "check_int", "check_float", "check_choice",
           "check_file", "check_dir", "check_out_dir", "check_out_file", "check_threads"]

#: exit code of a bad command line or input (an option value, a file given): click's own usage errors exit 2 too
BAD_INPUT = 2


def fail(message: str, code: int = BAD_INPUT) -> None:
    """Print a clear error (no traceback) and exit: code 2 for what the user passed (the default: every
    error a command reports is about its input), 1 for the environment (a missing optional package)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def bad_input(message: str) -> None:
    """:func:`fail` for a bad option value or input file (exit code 2)."""
    fail(message, BAD_INPUT)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """The command boundary: our errors (:class:`~flashback_agents.errors.FlashBackError`), ``OSError`` and
    undecodable input that a command does not handle itself become one ``error:`` line and exit code 2,
    never a traceback (``FLASHBACK_DEBUG=1`` raises them instead)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from ..errors import FlashBackError

        try:
            return command(*args, **kwargs)
        except (FlashBackError, OSError, UnicodeError) as exc:
            if os.environ.get("FLASHBACK_DEBUG"):
                raise
            if isinstance(exc, UnicodeDecodeError):
                bad_input(f"input is not UTF-8 text ({exc.reason}); convert it to UTF-8 "
                          "(e.g. `iconv -t UTF-8`) and try again.")
            if isinstance(exc, OSError) and not isinstance(exc, FlashBackError):
                where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
                bad_input(f"{exc.strerror or exc}{where}; check the path and its permissions.")
            bad_input(str(exc))

    return run


def _opt(name: str) -> str:
    return name if name.startswith("-") else f"--{name.replace('_', '-')}"


def check_int(name: str, value: Optional[int], minimum: Optional[int] = None, maximum: Optional[int] = None,
              hint: str = "") -> None:
    """Exit 2 unless ``value`` (None passes) is within [minimum, maximum]."""
    if value is None:
        return
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        span = (f"between {minimum} and {maximum}" if minimum is not None and maximum is not None
                else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        bad_input(f"{_opt(name)} must be {span}, got {value}{'; ' + hint if hint else '.'}")


def check_float(name: str, value: Optional[float], minimum: Optional[float] = None, maximum: Optional[float] = None,
                above: Optional[float] = None, below: Optional[float] = None, hint: str = "") -> None:
    """Exit 2 unless ``value`` (None passes) is finite and within the bounds (``above``/``below``: strict)."""
    if value is None:
        return
    opt = _opt(name)
    if not math.isfinite(value):
        bad_input(f"{opt} must be a finite number, got {value}{'; ' + hint if hint else '.'}")
    for ok, text in ((minimum is None or value >= minimum, f">= {minimum}"), (maximum is None or value <= maximum,
                     f"<= {maximum}"), (above is None or value > above, f"> {above}"),
                     (below is None or value < below, f"< {below}")):
        if not ok:
            bad_input(f"{opt} must be {text}, got {value}{'; ' + hint if hint else '.'}")


def check_threads(value: Optional[int]) -> None:
    check_int("threads", value, 1, hint="pass the number of CPU threads to use, e.g. --threads 1.")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        bad_input(f"{_opt(name)} must be one of {', '.join(choices)}, got {value!r}.")


def check_file(name: str, path: Optional[Path | str], what: str = "file") -> None:
    """Exit 2 unless ``path`` (None passes) is an existing, readable regular file."""
    if path is None:
        return
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        bad_input(f"{_opt(name)}: no such {what}: {p}; pass an existing one.")
    if p.is_dir():
        bad_input(f"{_opt(name)}: {p} is a directory; pass a {what}.")
    if not os.access(p, os.R_OK):
        bad_input(f"{_opt(name)}: {p} is not readable; check its permissions.")


def check_dir(name: str, path: Optional[Path | str], what: str = "directory") -> None:
    """Exit 2 unless ``path`` (None passes) is an existing directory."""
    if path is None:
        return
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        bad_input(f"{_opt(name)}: no such {what}: {p}; pass an existing one.")
    if not p.is_dir():
        bad_input(f"{_opt(name)}: {p} is a file, not a {what}; pass a directory.")


def check_out_dir(name: str, path: Optional[Path | str]) -> None:
    """Exit 2 if an output directory ``path`` (None passes) is an existing file or lies under one."""
    if path is None:
        return
    p = Path(os.path.expanduser(str(path)))
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            where = "is" if q == p else f"lies under {q}, which is"
            bad_input(f"{_opt(name)}: {p} {where} a file, not a directory; pass a new or existing directory.")
        if q.exists():
            return


def check_out_file(name: str, path: Optional[Path | str]) -> None:
    """Exit 2 if an output file ``path`` (None passes) is an existing directory or lies under a file."""
    if path is None:
        return
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        bad_input(f"{_opt(name)}: {p} is a directory; pass a file path.")
    check_out_dir(name, p.parent)


def emit(data: dict, as_json: bool) -> None:
    """Print a result as JSON or as aligned ``key: value`` lines."""
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        width = max((len(k) for k in data), default=0)
        for k, v in data.items():
            typer.echo(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
