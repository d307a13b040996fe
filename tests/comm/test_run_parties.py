"""run_parties: results, first-failure propagation, no hangs, on both transports."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from veil.errors import ChannelTimeout, ConfigError, InputError, PeerError
from veil.testing import PartyFailure

from . import parties

RP = Callable[..., tuple[Any, Any]]


@pytest.mark.parametrize("transport", ["memory", pytest.param("grpc", marks=pytest.mark.slow)])
def test_results_returned(run_parties: RP, transport: str) -> None:
    a, b = run_parties(
        parties.sum_sender, parties.sum_replier, transport=transport, timeout=60, args_a=(100,)
    )
    assert a == b == sum(range(100))


@pytest.mark.parametrize("transport", ["memory", pytest.param("grpc", marks=pytest.mark.slow)])
def test_first_failure_raised_and_peer_aborted(run_parties: RP, transport: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(InputError, match="column 'age' is not numeric") as info:
        run_parties(parties.failing_sender, parties.waiting_receiver, transport=transport, timeout=60)
    # the waiting side was aborted at once, not left to its 60 s timeout
    assert time.monotonic() - t0 < 30
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "party a" in notes
    if transport == "grpc":
        assert "remote traceback" in notes and "failing_sender" in notes


def test_failure_of_b_is_raised(run_parties: RP) -> None:
    with pytest.raises(KeyError):
        run_parties(parties.waiting_receiver, parties.raise_plain, timeout=30)


def test_peer_error_seen_by_other_side() -> None:
    from veil.comm import MemoryChannel

    a, b = MemoryChannel.pair(timeout=5)
    a.abort("party a failed: boom")
    with pytest.raises(PeerError):
        parties.waiting_receiver(b)


def test_timeout_memory(run_parties: RP) -> None:
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout):
        run_parties(parties.waiting_receiver, parties.sleeper, timeout=1.0, args_b=(3.0,))
    assert time.monotonic() - t0 < 2.5


@pytest.mark.slow
def test_timeout_grpc_kills_processes(run_parties: RP) -> None:
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout, match="did not finish"):
        run_parties(
            parties.sleeper, parties.sleeper, transport="grpc", timeout=5.0, args_a=(60,), args_b=(60,)
        )
    assert time.monotonic() - t0 < 12
    import multiprocessing

    assert multiprocessing.active_children() == []  # both children were killed, none left behind


def test_unknown_remote_exception_type() -> None:
    from veil.testing import _rebuild

    exc = _rebuild("a", "somepkg.mod", "Weird", "odd", "Traceback...")
    assert isinstance(exc, PartyFailure) and "somepkg.mod.Weird: odd" in str(exc)
    exc2 = _rebuild("b", "veil.errors", "InputError", "bad", "")
    assert isinstance(exc2, InputError)


def test_bad_transport(run_parties: RP) -> None:
    with pytest.raises(ConfigError):
        run_parties(parties.sum_sender, parties.sum_replier, transport="carrier-pigeon")


@pytest.mark.slow
def test_crashed_process_detected_without_waiting_for_timeout(run_parties: RP) -> None:
    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match=r"party b process exited \(code 3\)"):
        run_parties(parties.recv_twice, parties.die_hard, transport="grpc", timeout=60)
    assert time.monotonic() - t0 < 30
