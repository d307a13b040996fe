"""Top-level party functions for run_parties tests (importable by spawned processes)."""

from __future__ import annotations

import time

import numpy as np

from veil.comm import Channel, Message
from veil.errors import InputError


class Numbers(Message, frozen=True):
    values: np.ndarray


class Total(Message, frozen=True):
    total: int


def sum_sender(chan: Channel, n: int) -> int:
    chan.send(Numbers(values=np.arange(n, dtype=np.int64)))
    return chan.recv(Total).total


def sum_replier(chan: Channel) -> int:
    total = int(chan.recv(Numbers).values.sum())
    chan.send(Total(total=total))
    return total


def failing_sender(chan: Channel) -> None:
    raise InputError("column 'age' is not numeric")


def waiting_receiver(chan: Channel) -> None:
    chan.recv(Numbers)


def crash_value_error(chan: Channel) -> None:
    chan.recv(Numbers, timeout=1000)
    raise ValueError("never reached")


def raise_plain(chan: Channel) -> None:
    raise KeyError("missing")


def sleeper(chan: Channel, seconds: float) -> None:
    time.sleep(seconds)


def big_sender(chan: Channel, total_mb: int, pieces: int) -> dict[str, int]:
    """Send ``total_mb`` MB of float64 arrays in ``pieces`` messages, receive them back doubled."""
    n = total_mb * 1_000_000 // 8 // pieces
    checksum = 0.0
    for i in range(pieces):
        arr = np.arange(n, dtype=np.float64) + i
        chan.send(Numbers(values=arr))
        checksum += float(arr.sum())
    echoed = chan.recv(Total).total
    return {**chan.stats.as_dict(), "checksum": int(checksum), "echoed": echoed, "payload": pieces * n * 8}


def big_receiver(chan: Channel, pieces: int) -> dict[str, int]:
    checksum = 0.0
    payload = 0
    for i in range(pieces):
        arr = chan.recv(Numbers).values
        if arr[0] != i:
            raise ValueError(f"message {i} out of order")
        payload += arr.nbytes
        checksum += float(arr.sum())
    chan.send(Total(total=int(checksum)))
    return {**chan.stats.as_dict(), "checksum": int(checksum), "payload": payload}


def die_hard(chan: Channel) -> None:
    """Simulate a crashed process: exit without closing the channel or reporting."""
    import os

    chan.send(Total(total=1))
    time.sleep(0.2)
    os._exit(3)


def recv_twice(chan: Channel) -> None:
    chan.recv(Total)
    chan.recv(Total)
