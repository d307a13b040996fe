"""Small helpers shared by the demo's acts: errors, JSON/PNG output, child processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write_text
from veil.errors import VeilError

__all__ = [
    "SIMULATED_NOTE",
    "DemoError",
    "pyplot",
    "stop_processes",
    "wait_processes",
    "write_json",
]

#: printed by every act that runs on the simulated TEE backend
SIMULATED_NOTE = (
    "[bold yellow]SIMULATED TEE[/bold yellow] [yellow]— no hardware protection: the enclave is an ordinary "
    "process that produces evidence only a policy with allow_simulated=True accepts.[/yellow]"
)


class DemoError(VeilError):
    """A demo act could not complete (its message says which step and why)."""


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (atomically); returns the path."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spawn_context() -> Any:
    """Fresh interpreters for party processes (no state shared with the demo process)."""
    return mp.get_context("spawn")


def wait_processes(
    procs: Sequence[Any],
    deadline_s: float,
    on_tick: Callable[[], None] | None = None,
    poll_s: float = 0.1,
) -> None:
    """Wait until every process has exited; DemoError (and the others stopped) when one fails or
    the deadline passes. ``on_tick`` runs between polls (e.g. to drain a progress queue)."""
    end = time.monotonic() + deadline_s
    while True:
        if on_tick is not None:
            on_tick()
        codes = [p.exitcode for p in procs]
        if all(c is not None for c in codes):
            break
        failed = [p for p, c in zip(procs, codes, strict=True) if c not in (None, 0)]
        if failed:
            # give the peer a moment to notice the abort and exit by itself
            grace = time.monotonic() + 10
            while time.monotonic() < grace and any(p.exitcode is None for p in procs):
                time.sleep(poll_s)
            stop_processes(procs)
            break
        if time.monotonic() > end:
            stop_processes(procs)
            raise DemoError(f"the party processes did not finish within {deadline_s:.0f} s")
        time.sleep(poll_s)
    if on_tick is not None:
        on_tick()


def stop_processes(procs: Sequence[Any], timeout: float = 5.0) -> None:
    """Terminate (then kill) the given child processes that are still running; reap them all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    for p in procs:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join(timeout)


def cpu_threads() -> int:
    """Threads a party process should use (the demo runs everything on one machine)."""
    return max(1, min(2, os.cpu_count() or 1))


def progress(console: Any) -> Any:
    """The demo's rich progress display (description, bar, count, elapsed)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console)
