"""What every ``veil`` sub-command shares, importable without loading any engine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from veil.errors import VeilError


def run_cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for command functions: VeilError -> one clear line + exit code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VeilError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
