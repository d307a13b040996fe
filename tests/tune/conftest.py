"""tests/tune only: one torch thread. The models here are tiny, and on a shared, oversubscribed
machine OpenMP barrier stalls make 2-thread runs many times slower (measured: 35 tests 12 s vs
minutes). Restored after each test, so other packages' tests are unaffected."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also for the spawned gRPC party processes
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
