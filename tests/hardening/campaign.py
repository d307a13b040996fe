"""Bookkeeping of the hardening campaigns: every fuzz case and injected fault is counted here.

``benchmarks/hardening.py`` runs these tests with ``VEIL_HARDENING_REPORT=<path>``; at the end of
the session the counts are written there as JSON (see conftest.pytest_sessionfinish).
"""

from __future__ import annotations

import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from veil.errors import VeilError

#: decoder -> {"cases": n, "accepted": n, "refused": n, "errors": {type: n}, "crashes": n}
FUZZ: dict[str, dict[str, Any]] = defaultdict(
    lambda: {"cases": 0, "accepted": 0, "refused": 0, "refused_by": defaultdict(int), "crashes": 0,
             "max_peak_bytes": 0, "max_seconds": 0.0}
)
#: engine -> {"runs": n, "faults": {kind: n}, "completed": n, "failed_cleanly": n, "bad": n}
FAULTS: dict[str, dict[str, Any]] = defaultdict(
    lambda: {"runs": 0, "faults": defaultdict(int), "completed": 0, "failed_cleanly": 0, "bad": 0}
)
#: adversarial scenario -> "refused" | "xfail" ...
ADVERSARIAL: dict[str, str] = {}

MiB = 1 << 20


class NotAVeilError(AssertionError):
    """A decoder raised something other than a VeilError on malformed input."""


def fuzz_call(
    decoder: str,
    fn: Callable[[], Any],
    *,
    input_len: int = 0,
    mem_limit: int | None = None,
    time_limit: float = 2.0,
    trace_memory: bool = True,
) -> Any:
    """Run one fuzz case: VeilError → refused; any other exception → test failure (counted).

    The peak Python/numpy heap growth during the call must stay under ``mem_limit``
    (default: 16 MiB + 64 x the input length), and the call under ``time_limit`` seconds.
    """
    st = FUZZ[decoder]
    st["cases"] += 1
    limit = mem_limit if mem_limit is not None else 16 * MiB + 64 * input_len
    if trace_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        out = fn()
        st["accepted"] += 1
        return out
    except VeilError as exc:
        st["refused"] += 1
        st["refused_by"][type(exc).__name__] += 1
        return exc
    except Exception as exc:
        st["crashes"] += 1
        raise NotAVeilError(f"{decoder}: {type(exc).__name__}: {exc}") from exc
    finally:
        dt = time.perf_counter() - t0
        st["max_seconds"] = max(st["max_seconds"], dt)
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            st["max_peak_bytes"] = max(st["max_peak_bytes"], peak)
            if peak > limit:
                st["crashes"] += 1
                raise AssertionError(f"{decoder}: allocated {peak} bytes for a {input_len}-byte input")
        if dt > time_limit:
            raise AssertionError(f"{decoder}: took {dt:.2f} s (> {time_limit} s)")


def record_fault_run(engine: str, injected: dict[str, int], outcome: str) -> None:
    """outcome: 'completed' (correct result) | 'failed_cleanly' (VeilError on both sides, in time)."""
    st = FAULTS[engine]
    st["runs"] += 1
    for k, n in injected.items():
        st["faults"][k] += n
    st[outcome] += 1


def snapshot() -> dict[str, Any]:
    def plain(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: plain(v) for k, v in d.items()}
        return d

    return {"fuzz": plain(dict(FUZZ)), "faults": plain(dict(FAULTS)), "adversarial": dict(ADVERSARIAL)}
