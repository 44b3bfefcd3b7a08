"""The ``flashback-agents`` command line: builds the app from the command modules and runs it.

Every command module of this package has one registration style: module-level command functions and
``register(app, bench_app)``, which adds them. The table below names them all. A module that fails to
import does not make its commands vanish silently: ``flashback-agents --help`` ends with a line naming
the group and the error (``FLASHBACK_DEBUG=1`` raises it instead). Heavy imports happen inside
commands, so ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from .common import emit, fail

__all__ = ["app", "bench_app", "build_app", "main", "fail", "emit", "COMMAND_MODULES", "FAILED_GROUPS"]

#: command group -> the module of this package that registers it
COMMAND_MODULES = {
    "chat": "flashback_agents.cli.chat",  # chat, info
    "retrieval": "flashback_agents.cli.retrieval",  # index, search, generate
    "train": "flashback_agents.cli.train",  # train, export
    "bench": "flashback_agents.cli.bench",  # bench context|decode|agent|long|shift-drift|ralm
    "eval": "flashback_agents.cli.eval",  # eval ppl
    "serve": "flashback_agents.cli.serve",  # serve
}


#: click's UsageError, as typer uses it (typer vendors its own click): BadParameter's base
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Root(TyperGroup):
    """The root command group: a bad command line (unknown option or command, a value of the wrong type)
    is one ``error:`` line after the usage, exit code 2, like every other bad input of this CLI."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _USAGE_ERROR as exc:
            _usage_error(exc, ctx)
            raise

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as exc:
            _usage_error(exc, ctx)
            raise


def _usage_error(exc: Exception, ctx: typer.Context) -> None:
    """Print a usage error as the usage, a hint and one ``error:`` line, and exit 2 (returns only for a
    group called without a command, whose help click prints)."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return
    sub = getattr(exc, "ctx", None) or ctx
    typer.echo(sub.get_usage(), err=True)
    if sub.command.get_help_option(sub) is not None:
        typer.echo(f"Try '{sub.command_path} {sub.help_option_names[0]}' for help.", err=True)
    typer.secho(f"error: {exc.format_message()}", fg=typer.colors.RED, err=True)  # type: ignore[attr-defined]
    raise typer.Exit(getattr(exc, "exit_code", 2)) from None


def build_app() -> tuple[typer.Typer, typer.Typer, dict[str, str]]:
    """A fresh app and its ``bench`` sub-app with every command group registered; the groups that
    failed to import, with why (also written at the end of ``--help``)."""
    app = typer.Typer(help="Fast local LLM agents: a persistent KV cache and the FlashBack append layout.",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Root)
    bench_app = typer.Typer(help="Speed benchmarks, printed as ratios against a baseline measured in the same run.",
                            no_args_is_help=True)
    app.add_typer(bench_app, name="bench")
    failed: dict[str, str] = {}
    for group, name in COMMAND_MODULES.items():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # reported, not hidden: the rest of the command line still works
            if os.environ.get("FLASHBACK_DEBUG"):
                raise
            failed[group] = f"{type(exc).__name__}: {exc}"
            continue
        module.register(app, bench_app)
    if failed:
        app.info.epilog = "\n\n".join(f"Command group '{g}' failed to load ({why}); its commands are unavailable."
                                      for g, why in failed.items())
    return app, bench_app, failed


app, bench_app, FAILED_GROUPS = build_app()


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point."""
    from ..models import ModelLoadError

    args = sys.argv[1:] if argv is None else argv
    if "--help" not in args:  # --help says it in its last lines
        for group, why in FAILED_GROUPS.items():
            typer.secho(f"warning: command group '{group}' failed to load ({why})", fg=typer.colors.YELLOW, err=True)
    try:
        app(args=argv, standalone_mode=True)
    except ModelLoadError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)  # a model the user named that cannot be loaded: bad input, as every other error line


if __name__ == "__main__":
    main()
