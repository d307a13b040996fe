"""Runs the demo's acts, collects their results, prints the summary and writes JSON + PNGs.

Each act is a function ``run(out_dir: Path, quick: bool, console: Console) -> ActResult`` in
``veil.demo.act<N>_*``. An act that fails is reported as failed with its one-line reason; the
others still run, and the exit code says whether everything passed.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from veil.atomic import atomic_write_text
from veil.errors import VeilError

ACTS: dict[int, tuple[str, str]] = {
    1: ("veil.demo.act1_boost", "Secure XGBoost between two parties (PSI + HE/SS hybrid)"),
    2: ("veil.demo.act2_tune", "Split fine-tuning of SmolLM2-135M with the server part in an enclave"),
    3: ("veil.demo.act3_serve", "Confidential serving: encrypted package, KMS, attested workers"),
}


@dataclass
class ActResult:
    """What one act reports: headline metrics (shown in the summary) and artefacts written."""

    act: int
    title: str
    ok: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    artefacts: list[str] = field(default_factory=list)
    simulated_tee: bool = False
    error: str | None = None


def run_demo(acts: list[int], quick: bool, out_dir: Path, console: Console | None = None) -> list[ActResult]:
    """Run the given acts in order; never raises for an act's failure, reports it instead."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[ActResult] = []
    for n in acts:
        module_name, title = ACTS[n]
        console.print(Panel.fit(f"[bold]Act {n}[/bold] · {title}", border_style="cyan"))
        act_dir = out_dir / f"act{n}"
        act_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
            res: ActResult = module.run(act_dir, quick, console)
        except VeilError as exc:
            res = ActResult(n, title, False, 0.0, error=f"{type(exc).__name__}: {exc}")
        except ModuleNotFoundError as exc:
            res = ActResult(n, title, False, 0.0, error=f"missing component: {exc.name}")
        except Exception as exc:  # an act must not take the others down; show the reason
            res = ActResult(n, title, False, 0.0, error=f"{type(exc).__name__}: {exc}")
        res.seconds = time.perf_counter() - t0
        results.append(res)
        status = "[green]done[/green]" if res.ok else f"[red]failed[/red]: {res.error}"
        console.print(f"Act {n} {status} in {res.seconds:.1f} s\n")
    _summary(results, console)
    payload = {"quick": quick, "acts": [asdict(r) for r in results]}
    atomic_write_text(out_dir / "demo.json", json.dumps(payload, indent=2, default=str))
    console.print(f"Results: {out_dir / 'demo.json'}")
    return results


def _summary(results: list[ActResult], console: Console) -> None:
    table = Table(title="veil demo · summary", show_lines=True)
    table.add_column("act", justify="right")
    table.add_column("what")
    table.add_column("result")
    table.add_column("time", justify="right")
    for r in results:
        if r.ok:
            lines = [f"{k}: {v}" for k, v in r.metrics.items()]
            if r.simulated_tee:
                lines.append("[yellow]TEE: simulated (no hardware protection)[/yellow]")
            body = "\n".join(lines) or "ok"
        else:
            body = f"[red]failed[/red]: {r.error}"
        table.add_row(str(r.act), r.title, body, f"{r.seconds:.1f} s")
    console.print(table)
