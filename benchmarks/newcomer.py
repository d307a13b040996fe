"""Time the newcomer's path: `make demo` and `make test` from a fresh clone with an empty `.venv`.

    python3 benchmarks/newcomer.py                 # clone HEAD to a temp dir, time setup, demo, tests
    python3 benchmarks/newcomer.py --skip-test     # setup + demo only
    python3 benchmarks/newcomer.py --quick-demo    # `veil demo --quick` instead of the full demo

Runs with the system Python (it creates the clone's own `.venv`). The clone is made from this
repository's committed HEAD (`git clone`), so an install step that only works in a developer's
working tree shows up here. Both Makefile targets share the install step (`make setup`, the
`.venv/.installed` stamp), so the script runs it once and reports:

* ``install_s``: `make setup` in the empty clone (venv, pip, torch==2.13.0 from the
  local wheel, veil[all,dev]);
* ``demo_s``: `make demo` after that (the demo itself, three acts);
* ``test_s``: `make test` after that (what `.ci/run` runs);
* ``make_demo_from_empty_s`` = install + demo, ``make_test_from_empty_s`` = install + test.

The reference for the demo is the issue's target: at most 15 minutes on 2 cores. Writes
benchmarks/results/newcomer.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEMO_TARGET_S = 15 * 60


def _run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``; returns (exit code, seconds)."""
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        rc = subprocess.call(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return rc, time.perf_counter() - t0


def _pytest_summary(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ passed", ln)]
    return lines[-1].strip("= ").strip() if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-test", action="store_true", help="time setup and demo only")
    ap.add_argument("--quick-demo", action="store_true",
                    help="run `veil demo --quick` instead of the full demo")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    args = ap.parse_args(argv)

    head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                         text=True).strip())
    work = Path(tempfile.mkdtemp(prefix="veil-newcomer-"))
    clone = work / "veil"
    subprocess.check_call(["git", "clone", "-q", str(ROOT), str(clone)])
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    load_before = list(os.getloadavg())
    steps: dict[str, dict[str, Any]] = {}
    print(f"fresh clone of {head[:12]} in {clone}", flush=True)

    rc, sec = _run(["make", "setup"], clone, work / "setup.log", env)
    steps["install"] = {"command": "make setup", "rc": rc, "seconds": round(sec, 1)}
    print(f"make setup: rc={rc} {sec:.0f} s", flush=True)
    demo_json: dict[str, Any] = {}
    if rc == 0:
        quick_cmd = [str(clone / ".venv/bin/veil"), "demo", "--quick"]
        demo_cmd = quick_cmd if args.quick_demo else ["make", "demo"]
        rc_d, sec_d = _run(demo_cmd, clone, work / "demo.log", env)
        steps["demo"] = {"command": "veil demo --quick" if args.quick_demo else "make demo",
                         "rc": rc_d, "seconds": round(sec_d, 1)}
        print(f"demo: rc={rc_d} {sec_d:.0f} s", flush=True)
        found = sorted(clone.glob("runs/**/demo.json"), key=lambda p: p.stat().st_mtime)
        if found:
            demo_json = json.loads(found[-1].read_text())
        if not args.skip_test:
            rc_t, sec_t = _run(["make", "test"], clone, work / "test.log", env)
            steps["test"] = {"command": "make test", "rc": rc_t, "seconds": round(sec_t, 1),
                             "pytest": _pytest_summary(work / "test.log")}
            print(f"make test: rc={rc_t} {sec_t:.0f} s ({steps['test']['pytest']})", flush=True)

    acts = [{"act": a.get("act"), "ok": a.get("ok"), "seconds": round(float(a.get("seconds", 0.0)), 1)}
            for a in demo_json.get("acts", [])]
    install = steps["install"]["seconds"]
    result: dict[str, Any] = {
        "benchmark": "newcomer",
        "command": "python3 benchmarks/newcomer.py" + (" --skip-test" if args.skip_test else "")
        + (" --quick-demo" if args.quick_demo else ""),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": head,
        "working_tree_dirty": dirty,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": sys.version.split()[0]},
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "steps": steps,
        "demo_acts": acts,
        "install_s": install,
        "demo_s": steps.get("demo", {}).get("seconds"),
        "test_s": steps.get("test", {}).get("seconds"),
        "make_demo_from_empty_s": round(install + steps["demo"]["seconds"], 1) if "demo" in steps else None,
        "make_test_from_empty_s": round(install + steps["test"]["seconds"], 1) if "test" in steps else None,
        "reference": {"demo_target_s": DEMO_TARGET_S,
                      "source": "issue: `veil demo` in <= 15 minutes on 2 CPU cores"},
    }
    ok = all(s["rc"] == 0 for s in steps.values())
    result["ok"] = ok
    result["demo_within_target"] = bool(result["demo_s"] is not None and result["demo_s"] <= DEMO_TARGET_S)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "newcomer.json"
    out.write_text(json.dumps(result, indent=1) + "\n")

    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"newcomer's path from a fresh clone ({head[:12]}, {os.cpu_count()} cores)")
        for col in ("step", "rc", "seconds", "minutes"):
            t.add_column(col, justify="right" if col != "step" else "left")
        for s in steps.values():
            t.add_row(s["command"], str(s["rc"]), f"{s['seconds']:.0f}", f"{s['seconds'] / 60:.1f}")
        for key in ("make_demo_from_empty_s", "make_test_from_empty_s"):
            if result[key] is not None:
                label = key.removesuffix("_s").replace("_", " ")
                t.add_row(label, "", f"{result[key]:.0f}", f"{result[key] / 60:.1f}")
        t.add_row("reference: demo target", "", f"{DEMO_TARGET_S}", f"{DEMO_TARGET_S / 60:.1f}")
        Console().print(t)
    except ImportError:  # the system Python may lack rich; the JSON is the result
        print(json.dumps(result, indent=1))
    print(f"wrote {out}; logs in {work}")
    if not args.keep and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
