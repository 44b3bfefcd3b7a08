"""The root of every error this library raises on purpose.

``except FlashBackError`` catches any of them. Each error class also keeps the built-in base it had
before (``ValueError``, ``RuntimeError``, ``TimeoutError``, ...), so existing ``except`` clauses still
work. This module is the bottom layer: it imports nothing from the package.
"""

from __future__ import annotations

__all__ = ["FlashBackError"]


class FlashBackError(Exception):
    """Every error this library raises on purpose (a bad input, a file it refuses, a model it cannot
    load, ...): the message says why and what to do."""
