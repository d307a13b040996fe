"""GrpcChannel: 100 MB between two OS processes over mutual TLS, pinning, unreachable peers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veil.comm import Message, codec
from veil.comm.grpc_channel import CHUNK_BYTES, GrpcChannel, GrpcListener
from veil.comm.identity import PartyIdentity
from veil.errors import ChannelClosed, ChannelError, ChannelTimeout, PeerError, ResourceLimitError

from . import parties

RP = Callable[..., tuple[Any, Any]]


class Blob(Message, frozen=True):
    data: np.ndarray
    note: str = ""


@pytest.fixture(scope="module")
def ids() -> dict[str, PartyIdentity]:
    return {n: PartyIdentity.generate(n) for n in ("alice", "bob", "mallory")}


def _serve(
    ident: PartyIdentity, peer: PartyIdentity, body: Callable[[GrpcChannel], Any], **kw: Any
) -> tuple[int, threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    ready = threading.Event()
    listener = GrpcListener("127.0.0.1:0", ident, peer.fingerprint, peer_cert=peer.cert_pem, **kw)

    def run() -> None:
        try:
            ch = listener.accept()
            out["chan"] = ch
            out["result"] = body(ch)
        except BaseException as exc:
            out["error"] = exc
        finally:
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return listener.port, t, out


@pytest.mark.slow
def test_two_processes_exchange_100mb_over_tls(run_parties: RP) -> None:
    pieces = 5
    a, b = run_parties(
        parties.big_sender,
        parties.big_receiver,
        transport="grpc",
        timeout=240,
        args_a=(100, pieces),
        args_b=(pieces,),
    )
    assert a["payload"] == b["payload"] == 100_000_000
    assert a["checksum"] == b["checksum"] == a["echoed"]
    # counters match each other exactly...
    assert a["bytes_sent"] == b["bytes_received"]
    assert a["bytes_received"] == b["bytes_sent"]
    assert a["messages_sent"] == b["messages_received"] == pieces
    assert a["messages_received"] == b["messages_sent"] == 1
    assert (a["rounds"], b["rounds"]) == (1, 0)
    # ...and the payload: exactly the encoded frames, a few dozen header bytes per message
    frame = codec.encode(parties.Numbers(values=np.zeros(100_000_000 // 8 // pieces)))
    assert a["bytes_sent"] == pieces * len(frame)
    assert 0 < a["bytes_sent"] - a["payload"] < 100 * pieces
    assert a["bytes_received"] == len(codec.encode(parties.Total(total=a["echoed"])))


def test_round_trip_in_process_with_chunking_and_counters(ids: dict[str, PartyIdentity]) -> None:
    alice, bob = ids["alice"], ids["bob"]
    big = np.arange(3 * CHUNK_BYTES // 8 + 5, dtype=np.float64)  # crosses chunk boundaries

    def server(ch: GrpcChannel) -> Any:
        got = ch.recv(Blob)
        ch.send(Blob(data=got.data[::-1].copy(), note="reversed"))
        ch.send(Blob(data=np.zeros(0, dtype=np.uint8)))
        ch.recv(Blob)
        return ch.stats.as_dict()

    port, t, out = _serve(alice, bob, server, timeout=30)
    ch = GrpcChannel.connect(
        f"127.0.0.1:{port}", bob, alice.fingerprint, peer_cert=alice.cert_pem, timeout=30
    )
    ch.send(Blob(data=big))
    back = ch.recv(Blob)
    np.testing.assert_array_equal(back.data, big[::-1])
    assert back.note == "reversed" and back.data.flags.writeable
    assert ch.recv(Blob).data.size == 0
    ch.send(Blob(data=np.ones(3)))
    t.join(30)
    ch.close()
    assert "error" not in out, out.get("error")
    srv = out["result"]
    mine = ch.stats.as_dict()
    assert mine["bytes_sent"] == srv["bytes_received"] and mine["bytes_received"] == srv["bytes_sent"]
    assert mine["bytes_sent"] == len(codec.encode(Blob(data=big))) + len(codec.encode(Blob(data=np.ones(3))))
    assert (mine["messages_sent"], mine["messages_received"], mine["rounds"]) == (2, 2, 1)
    assert (srv["messages_sent"], srv["messages_received"], srv["rounds"]) == (2, 2, 1)


def test_abort_and_close_propagate(ids: dict[str, PartyIdentity]) -> None:
    alice, bob = ids["alice"], ids["bob"]

    def server(ch: GrpcChannel) -> Any:
        ch.recv(Blob)
        ch.abort("server ran out of patience")

    port, t, out = _serve(alice, bob, server, timeout=30)
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=30)
    ch.send(Blob(data=np.ones(2)))
    with pytest.raises(PeerError, match="server ran out of patience"):
        ch.recv(Blob)
    with pytest.raises(PeerError):
        ch.recv(Blob)
    t.join(10)
    ch.close()

    def server2(ch: GrpcChannel) -> Any:
        with pytest.raises(ChannelClosed):
            ch.recv(Blob)
        return "saw close"

    port, t, out = _serve(alice, bob, server2, timeout=30)
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=30)
    ch.close()
    t.join(10)
    assert out.get("result") == "saw close", out


def test_recv_timeout_and_size_limit(ids: dict[str, PartyIdentity]) -> None:
    alice, bob = ids["alice"], ids["bob"]

    def server(ch: GrpcChannel) -> Any:
        with pytest.raises(ChannelTimeout):
            ch.recv(Blob, timeout=0.3)
        with pytest.raises(ResourceLimitError):
            ch.recv(Blob, timeout=20)
        return "ok"

    port, t, out = _serve(alice, bob, server, timeout=30, max_message_bytes=CHUNK_BYTES + 1000)
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=30)
    time.sleep(0.5)
    ch.send(Blob(data=np.zeros(CHUNK_BYTES // 4, dtype=np.float64)))  # 2 MiB over the peer's limit
    t.join(30)
    assert out.get("result") == "ok", out
    ch.close()


def test_wrong_server_refused(ids: dict[str, PartyIdentity]) -> None:
    """bob pins alice; mallory listens instead: the TLS handshake fails, bob gets ChannelError."""
    alice, bob, mallory = ids["alice"], ids["bob"], ids["mallory"]
    listener = GrpcListener("127.0.0.1:0", mallory, peer_cert=bob.cert_pem, timeout=5)
    try:
        with pytest.raises(ChannelError, match=rf"127\.0\.0\.1:{listener.port}"):
            GrpcChannel.connect(
                f"127.0.0.1:{listener.port}", bob, alice.fingerprint, peer_cert=alice.cert_pem, timeout=2
            )
        with pytest.raises(ChannelTimeout):
            listener.accept(timeout=0.5)
    finally:
        listener.close()


def test_wrong_client_refused(ids: dict[str, PartyIdentity]) -> None:
    """alice pins bob; mallory connects (knowing alice's cert): refused on both ends."""
    alice, bob, mallory = ids["alice"], ids["bob"], ids["mallory"]
    listener = GrpcListener("127.0.0.1:0", alice, bob.fingerprint, peer_cert=bob.cert_pem, timeout=5)
    try:
        with pytest.raises(ChannelError):
            GrpcChannel.connect(f"127.0.0.1:{listener.port}", mallory, peer_cert=alice.cert_pem, timeout=2)
        with pytest.raises(ChannelTimeout, match="no pinned peer connected"):
            listener.accept(timeout=0.5)
    finally:
        listener.close()


def test_pinned_fingerprint_must_match_peer_cert(ids: dict[str, PartyIdentity]) -> None:
    alice, bob, mallory = ids["alice"], ids["bob"], ids["mallory"]
    with pytest.raises(ChannelError, match="pinned fingerprint"):
        GrpcChannel.connect("127.0.0.1:1", bob, alice.fingerprint, peer_cert=mallory.cert_pem, timeout=1)
    with pytest.raises(ChannelError, match="pinned fingerprint"):
        GrpcListener("127.0.0.1:0", alice, bob.fingerprint, peer_cert=mallory.cert_pem)


def test_unreachable_peer_names_address(ids: dict[str, PartyIdentity]) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match=f"127.0.0.1:{port}"):
        GrpcChannel.connect(f"127.0.0.1:{port}", ids["bob"], peer_cert=ids["alice"].cert_pem, timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_fingerprint_from_trust_store(tmp_path: Path) -> None:
    alice = PartyIdentity.create("alice", tmp_path / "alice")
    bob = PartyIdentity.create("bob", tmp_path / "bob")
    assert alice.trust(tmp_path / "bob" / "cert.pem") == bob.fingerprint
    bob.trust(tmp_path / "alice")

    def server(ch: GrpcChannel) -> Any:
        return ch.recv(Blob).note

    listener = GrpcListener("127.0.0.1:0", alice, bob.fingerprint, timeout=20)
    res: dict[str, Any] = {}
    th = threading.Thread(target=lambda: res.update(note=server(listener.accept())), daemon=True)
    th.start()
    ch = GrpcChannel.connect(f"127.0.0.1:{listener.port}", bob, alice.fingerprint.upper(), timeout=20)
    ch.send(Blob(data=np.ones(1), note="via trust store"))
    th.join(20)
    ch.close()
    assert res["note"] == "via trust store"


def test_post_handshake_fingerprint_check(ids: dict[str, PartyIdentity]) -> None:
    """Defence in depth: even after a good TLS handshake, the server compares the client
    certificate's fingerprint with its pin and refuses the stream if they differ."""
    alice, bob, mallory = ids["alice"], ids["bob"], ids["mallory"]
    listener = GrpcListener("127.0.0.1:0", alice, peer_cert=bob.cert_pem, timeout=5)
    listener.peer_fingerprint = mallory.fingerprint  # simulate a pin that differs from the TLS root
    try:
        with pytest.raises(ChannelError, match="refused the channel"):
            GrpcChannel.connect(f"127.0.0.1:{listener.port}", bob, peer_cert=alice.cert_pem, timeout=5)
        assert listener.refused == [bob.fingerprint]
    finally:
        listener.close()


def test_connect_retries_until_server_is_up(ids: dict[str, PartyIdentity]) -> None:
    import socket

    alice, bob = ids["alice"], ids["bob"]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out: dict[str, Any] = {}

    def late_server() -> None:
        time.sleep(1.0)
        ch = GrpcChannel.listen(f"127.0.0.1:{port}", alice, peer_cert=bob.cert_pem, timeout=20)
        out["msg"] = ch.recv(Blob).note
        ch.close()

    t = threading.Thread(target=late_server, daemon=True)
    t.start()
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=20)
    ch.send(Blob(data=np.ones(1), note="late"))
    t.join(20)
    ch.close()
    assert out == {"msg": "late"}


def test_unread_frames_bounded_by_bytes(
    ids: dict[str, PartyIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    import veil.comm.grpc_channel as gc

    monkeypatch.setattr(gc, "_RECV_BUDGET_BYTES", 8 << 20)
    alice, bob = ids["alice"], ids["bob"]
    frame = np.zeros((2 << 20) // 8)  # ~2 MiB per message, 20 messages = 40 MiB

    def slow_server(ch: GrpcChannel) -> Any:
        time.sleep(1.5)  # the client keeps sending meanwhile
        held = ch._queued_bytes
        for _ in range(20):
            ch.recv(Blob)
        return held

    port, t, out = _serve(alice, bob, slow_server, timeout=30)
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=30)
    sender = threading.Thread(target=lambda: [ch.send(Blob(data=frame)) for _ in range(20)], daemon=True)
    sender.start()
    t.join(30)
    sender.join(30)
    ch.close()
    assert "error" not in out, out.get("error")
    assert 0 < out["result"] <= (8 << 20) + len(codec.encode(Blob(data=frame)))


def test_send_after_peer_closed_fails_fast(ids: dict[str, PartyIdentity]) -> None:
    alice, bob = ids["alice"], ids["bob"]
    port, t, _ = _serve(alice, bob, lambda ch: ch.close(), timeout=30)
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=30)
    t.join(10)
    deadline = time.monotonic() + 10
    t0 = time.monotonic()
    with pytest.raises(ChannelClosed):  # may take a few sends to see the end
        while time.monotonic() < deadline:
            ch.send(Blob(data=np.zeros(1 << 20)))
            time.sleep(0.05)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ChannelClosed, match="peer closed"):
        ch.recv(Blob)


@pytest.mark.parametrize("server_sends", [False, True])
def test_close_flushes_to_a_slow_reader(
    ids: dict[str, PartyIdentity], monkeypatch: pytest.MonkeyPatch, server_sends: bool
) -> None:
    """A party that sends and closes at once loses nothing, even if the peer reads later."""
    import veil.comm.grpc_channel as gc

    monkeypatch.setattr(gc, "_RECV_BUDGET_BYTES", 4 << 20)  # the slow reader's buffer fills up
    alice, bob = ids["alice"], ids["bob"]
    got: list[Any] = []

    def slow_reader(ch: GrpcChannel) -> None:
        time.sleep(2.0)
        with pytest.raises(ChannelClosed, match="peer closed"):
            while True:
                got.append(ch.recv(Blob).note)
        ch.close()

    def sender(ch: GrpcChannel) -> None:
        for i in range(10):
            ch.send(Blob(data=np.zeros((2 << 20) // 8), note=str(i)))
        ch.close()

    port, t, out = _serve(alice, bob, sender if server_sends else slow_reader, timeout=30)
    ch = GrpcChannel.connect(f"127.0.0.1:{port}", bob, peer_cert=alice.cert_pem, timeout=30)
    (slow_reader if server_sends else sender)(ch)
    t.join(30)
    assert "error" not in out, out.get("error")
    assert got == [str(i) for i in range(10)]


def test_connect_timeout_limit_from_environment(ids: dict[str, PartyIdentity],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """VEIL_LIMIT_CONNECT_TIMEOUT_S bounds the connect wait when the caller sets no connect_timeout."""
    import socket

    from veil.limits import reset_limits

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("VEIL_LIMIT_CONNECT_TIMEOUT_S", "0.5")
    reset_limits()
    try:
        t0 = time.monotonic()
        with pytest.raises(ChannelError, match=r"within 0\.5 s"):
            GrpcChannel.connect(f"127.0.0.1:{port}", ids["bob"], peer_cert=ids["alice"].cert_pem,
                                timeout=60.0)
        assert time.monotonic() - t0 < 5
    finally:
        monkeypatch.delenv("VEIL_LIMIT_CONNECT_TIMEOUT_S")
        reset_limits()
