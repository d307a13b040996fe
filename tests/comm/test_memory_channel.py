"""MemoryChannel: exact counters, abort propagation, timeouts, close."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from veil.comm import Channel, MemoryChannel, Message, codec
from veil.errors import ChannelClosed, ChannelTimeout, PeerError, ProtocolError


class Ping(Message, frozen=True):
    n: int
    data: np.ndarray


class Pong(Message, frozen=True):
    n: int


def test_is_a_channel() -> None:
    a, _ = MemoryChannel.pair()
    assert isinstance(a, Channel)


def test_counters_exact_and_rounds() -> None:
    a, b = MemoryChannel.pair(timeout=5)
    pings = [Ping(n=i, data=np.arange(i * 10, dtype=np.float32)) for i in range(3)]
    ping_bytes = sum(len(codec.encode(p)) for p in pings)
    pong_bytes = len(codec.encode(Pong(n=0)))
    # a: send 3, recv 1, send 3, recv 1  -> 2 rounds; b: recv 3, send 1, recv 3, send 1 -> 1 round
    for _ in range(2):
        for p in pings:
            a.send(p)
        for p in pings:
            got = b.recv(Ping)
            assert got.n == p.n
            np.testing.assert_array_equal(got.data, p.data)
            assert got.data is not p.data
        b.send(Pong(n=0))
        assert a.recv(Pong).n == 0
    assert a.stats.as_dict() == {
        "bytes_sent": 2 * ping_bytes,
        "bytes_received": 2 * pong_bytes,
        "messages_sent": 6,
        "messages_received": 2,
        "rounds": 2,
    }
    assert b.stats.bytes_received == a.stats.bytes_sent
    assert b.stats.bytes_sent == a.stats.bytes_received
    assert (b.stats.messages_sent, b.stats.messages_received, b.stats.rounds) == (2, 6, 1)


def test_wrong_type_raises_protocol_error() -> None:
    a, b = MemoryChannel.pair(timeout=5)
    a.send(Pong(n=1))
    with pytest.raises(ProtocolError, match="expected Ping, got a 'Pong'"):
        b.recv(Ping)


def test_recv_timeout() -> None:
    a, _ = MemoryChannel.pair(timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout):
        a.recv(Pong)
    with pytest.raises(ChannelTimeout):
        a.recv(Pong, timeout=0.05)
    assert time.monotonic() - t0 < 2


def test_abort_propagates_reason() -> None:
    a, b = MemoryChannel.pair(timeout=5)
    a.send(Pong(n=1))
    a.abort("label column missing")
    assert b.recv(Pong).n == 1  # messages before the abort still arrive in order
    with pytest.raises(PeerError, match="label column missing"):
        b.recv(Pong)
    with pytest.raises(PeerError):
        b.send(Pong(n=2))
    with pytest.raises(ChannelClosed):
        a.send(Pong(n=3))


def test_abort_wakes_blocked_receiver() -> None:
    a, b = MemoryChannel.pair(timeout=10)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            b.recv(Pong)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    a.abort("boom")
    t.join(5)
    assert not t.is_alive()
    assert isinstance(errors[0], PeerError)


def test_close() -> None:
    a, b = MemoryChannel.pair(timeout=5)
    a.close()
    with pytest.raises(ChannelClosed, match="peer closed"):
        b.recv(Pong)
    with pytest.raises(ChannelClosed):
        a.recv(Pong)


def test_context_manager_aborts_on_error() -> None:
    a, b = MemoryChannel.pair(timeout=5)
    with pytest.raises(ValueError), a:
        raise ValueError("bad data")
    with pytest.raises(PeerError, match="ValueError: bad data"):
        b.recv(Pong)


def test_size_limit_on_channel() -> None:
    from veil.errors import ResourceLimitError

    a, _ = MemoryChannel.pair(timeout=5, max_message_bytes=1024)
    with pytest.raises(ResourceLimitError):
        a.send(Ping(n=0, data=np.zeros(1000)))
    assert a.stats.messages_sent == 0
