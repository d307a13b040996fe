"""The ``veil`` command line: one sub-command group per engine.

Each engine owns its own module (``veil.cli.boost``, ``veil.cli.tune``, ...); this file only
assembles them and turns every :class:`veil.errors.VeilError` into one clear line and a
non-zero exit code.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from veil import __version__
from veil.errors import VeilError

app = typer.Typer(
    name="veil",
    help="veil: train and serve ML models together without sharing data or models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_GROUPS: list[tuple[str, str, str]] = [
    ("boost", "veil.cli.boost", "Secure two-party vertical XGBoost (HE + secret sharing)."),
    ("tune", "veil.cli.tune", "Secure split fine-tuning of LLMs with the server part in a TEE."),
    ("serve", "veil.cli.serve", "Confidential inference serving: packages, workers, gateway, cluster."),
    ("kms", "veil.cli.kms", "Key management service that releases keys only to attested workers."),
    ("keys", "veil.cli.keys", "Party identities: TLS keys and certificates for channels."),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"veil {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """veil: train and serve ML models together without sharing data or models.

    Examples:
      veil demo --quick
      veil boost train --help
    """


def _placeholder(name: str, help_text: str) -> typer.Typer:
    sub = typer.Typer(name=name, help=help_text, no_args_is_help=True)

    @sub.callback()
    def _cb() -> None:
        pass

    return sub


for _name, _module, _help in _GROUPS:
    try:
        _sub: Any = importlib.import_module(_module).app
    except ModuleNotFoundError as exc:  # an engine module may not exist yet or lack its extra
        if exc.name is not None and not exc.name.startswith("veil.cli"):
            _sub = _placeholder(_name, f"{_help} (unavailable: missing dependency {exc.name})")
        else:
            _sub = _placeholder(_name, _help)
    app.add_typer(_sub, name=_name, help=_help)


try:
    from veil.cli.demo import demo as _demo_cmd

    app.command("demo", help="Run the three-act demo of veil on embedded defaults (offline).")(_demo_cmd)
except ModuleNotFoundError:

    @app.command("demo", help="Run the three-act demo of veil on embedded defaults (offline).")
    def _demo_missing() -> None:
        """Run the three-act demo (not yet available in this build)."""
        typer.echo("veil demo: no demo acts are installed yet.")
        raise typer.Exit(1)


def main() -> None:
    """Entry point that maps VeilError to one line on stderr and its exit code."""
    try:
        app(standalone_mode=True)
    except VeilError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
