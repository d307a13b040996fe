"""``veil demo``: the three-act tour of veil, offline, on embedded defaults."""

from __future__ import annotations

from pathlib import Path

import typer

from veil.demo.runner import ACTS, run_demo


def demo(
    act: list[int] = typer.Option(
        [], "--act", help="Run only this act (1, 2 or 3); repeat for several. Default: all three."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Smaller data and fewer steps (about 8 minutes on a loaded 2-core machine)."
    ),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the JSON summary and PNG plots."),
) -> None:
    """Run the three-act demo: secure XGBoost, split fine-tuning, confidential serving.

    Examples:
      veil demo --quick
      veil demo --act 1 --out runs/act1
    """
    bad = [a for a in act if a not in ACTS]
    if bad:
        typer.echo(f"error: unknown act {bad[0]}; choose from 1, 2, 3", err=True)
        raise typer.Exit(2)
    results = run_demo(sorted(set(act)) or sorted(ACTS), quick, out)
    if not all(r.ok for r in results):
        raise typer.Exit(1)
