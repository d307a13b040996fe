"""GrpcChannel: a veil Channel between processes or hosts, over gRPC with mutual TLS.

No protobuf code generation: one bidirectional streaming method ``/veil.Channel/Stream`` with
identity (bytes) serialisers, registered through a generic handler. Each side presents its own
self-signed certificate; each side uses the *pinned* peer certificate as its only trust root,
so the TLS handshake itself fails against anyone else, and the server additionally re-checks
the client's certificate fingerprint after the handshake (``hmac.compare_digest``).

Frames (see :mod:`veil.comm.codec`) are cut into chunks of at most 4 MiB, each one gRPC
message::

    u8 kind   0 = more chunks follow, 1 = last chunk of a frame, 2 = hello (server accepted)
    payload
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

# gRPC's C core logs failed TLS handshakes (e.g. a refused, unpinned peer) straight to stderr;
# veil reports them as ChannelError instead. GRPC_VERBOSITY=INFO in the environment restores them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc

from veil.comm.channel import DEFAULT_TIMEOUT, FrameChannel
from veil.comm.codec import DEFAULT_MAX_MESSAGE_BYTES
from veil.comm.identity import (
    PartyIdentity,
    cert_dns_name,
    cert_fingerprint,
    fingerprints_equal,
    normalize_fingerprint,
    read_cert,
)
from veil.errors import ChannelClosed, ChannelError, ChannelTimeout, ConfigError, ResourceLimitError
from veil.limits import ENV_PREFIX, get_limits

__all__ = ["CHUNK_BYTES", "GrpcChannel", "GrpcListener"]

log = logging.getLogger("veil.comm")

CHUNK_BYTES = 4 << 20
_GRPC_MAX = CHUNK_BYTES + (64 << 10)
_METHOD = "/veil.Channel/Stream"
_SERVICE = "veil.Channel"
_MORE, _LAST, _HELLO = 0, 1, 2
_SEND_QUEUE_CHUNKS = 8
_RECV_QUEUE_FRAMES = 16
_RECV_BUDGET_BYTES = 256 << 20  # received-but-unread frames held beyond one frame (back-pressure)
_POLL = 0.25
_CLOSE_GRACE = 5.0

_END = object()  # send-queue sentinel: end our half of the stream


def _grpc_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", _GRPC_MAX),
        ("grpc.max_receive_message_length", _GRPC_MAX),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _resolve_peer(
    identity: PartyIdentity, peer_fingerprint: str | None, peer_cert: bytes | str | Path | None
) -> tuple[bytes, str]:
    """The pinned peer certificate and its fingerprint."""
    if peer_cert is not None:
        pem = read_cert(peer_cert)
        fp = cert_fingerprint(pem)
        if peer_fingerprint is not None and not fingerprints_equal(fp, peer_fingerprint):
            raise ChannelError(
                f"peer certificate has fingerprint {fp}, but the pinned fingerprint is "
                f"{normalize_fingerprint(peer_fingerprint)}; refusing to connect"
            )
        return pem, fp
    if peer_fingerprint is not None:
        pem = identity.peer_cert(peer_fingerprint)
        return pem, cert_fingerprint(pem)
    raise ConfigError(
        "a GrpcChannel needs its peer pinned: pass peer_fingerprint= (a certificate trusted with "
        "`veil keys trust`) or peer_cert="
    )


class GrpcChannel(FrameChannel):
    """One end of a mutually authenticated gRPC stream carrying veil frames."""

    def __init__(
        self,
        *,
        role: str,
        peer_fingerprint: str,
        timeout: float,
        max_message_bytes: int,
        on_shutdown: Callable[[], None],
    ) -> None:
        super().__init__(timeout=timeout, max_message_bytes=max_message_bytes)
        self.role = role
        self.peer_fingerprint = peer_fingerprint
        self._sendq: queue.Queue[object] = queue.Queue(maxsize=_SEND_QUEUE_CHUNKS)
        self._recvq: queue.Queue[object] = queue.Queue(maxsize=_RECV_QUEUE_FRAMES)
        self._queued_bytes = 0
        self._budget = threading.Condition()
        self._torn_down = threading.Event()
        self._reader_done = threading.Event()
        self._writer_done = threading.Event()
        self._send_lock = threading.Lock()
        self._on_shutdown = on_shutdown
        self._cancel: Callable[[], object] = lambda: None
        self.hello = threading.Event()
        self._hello_ok = False
        self._end_reason: ChannelError | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def listen(
        cls,
        bind: str,
        identity: PartyIdentity,
        peer_fingerprint: str | None = None,
        *,
        peer_cert: bytes | str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        accept_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_bound: Callable[[int], None] | None = None,
    ) -> GrpcChannel:
        """Serve on ``bind`` (``host:port``, port 0 = any free port) and block until the pinned
        peer connects (ChannelTimeout after ``accept_timeout``, default ``timeout``)."""
        listener = GrpcListener(
            bind, identity, peer_fingerprint, peer_cert=peer_cert, timeout=timeout,
            max_message_bytes=max_message_bytes,
        )
        if on_bound is not None:
            on_bound(listener.port)
        return listener.accept(accept_timeout if accept_timeout is not None else timeout)

    @classmethod
    def connect(
        cls,
        address: str,
        identity: PartyIdentity,
        peer_fingerprint: str | None = None,
        *,
        peer_cert: bytes | str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> GrpcChannel:
        """Connect to a listening peer, retrying with backoff until ``connect_timeout``
        (default: ``VEIL_LIMIT_CONNECT_TIMEOUT_S`` when that variable is set, else ``timeout``);
        ChannelError naming the address if it cannot be reached or the TLS handshake against the
        pinned certificate fails."""
        pem, fp = _resolve_peer(identity, peer_fingerprint, peer_cert)
        if connect_timeout is None and f"{ENV_PREFIX}CONNECT_TIMEOUT_S" in os.environ:
            connect_timeout = get_limits().connect_timeout_s
        wait = float(connect_timeout if connect_timeout is not None else timeout)
        creds = grpc.ssl_channel_credentials(
            root_certificates=pem, private_key=identity.key_pem, certificate_chain=identity.cert_pem
        )
        options = [
            *_grpc_options(),
            ("grpc.ssl_target_name_override", cert_dns_name(pem)),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        gch = grpc.secure_channel(address, creds, options=options)
        deadline = time.monotonic() + wait
        try:
            grpc.channel_ready_future(gch).result(timeout=wait)
        except grpc.FutureTimeoutError:
            gch.close()
            raise ChannelError(
                f"could not connect to {address} within {wait:g} s: peer unreachable, or the TLS "
                f"handshake failed (peer is not the pinned certificate {fp[:16]}…, or it does not "
                "trust ours)"
            ) from None
        chan = cls(
            role="client", peer_fingerprint=fp, timeout=timeout, max_message_bytes=max_message_bytes,
            on_shutdown=gch.close,
        )
        stub = gch.stream_stream(_METHOD)
        call = stub(chan._outgoing())
        chan._cancel = call.cancel
        threading.Thread(target=chan._read, args=(call,), name="veil-grpc-client-reader", daemon=True).start()
        if not chan.hello.wait(max(0.1, deadline - time.monotonic())):
            chan._teardown()
            raise ChannelError(f"{address} completed TLS but did not accept the channel in time")
        if not chan._hello_ok:
            err = chan._end_reason
            chan._teardown()
            raise ChannelError(f"{address} refused the channel: {err}")
        log.info("connected to %s (peer %s…)", address, fp[:16])
        return chan

    # ------------------------------------------------------------------ transport
    def _outgoing(self) -> Iterator[bytes]:
        """The chunks we send, drawn from the send queue until the end sentinel."""
        try:
            while not self._torn_down.is_set():
                try:
                    item = self._sendq.get(timeout=_POLL)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, bytes):
                    yield item
        finally:
            self._writer_done.set()

    def _put_chunk(self, chunk: object, deadline: float) -> None:
        while True:
            if self._torn_down.is_set() or self._writer_done.is_set():
                raise ChannelClosed("connection to the peer is closed")
            if self._reader_done.is_set():
                why = self._end_reason or ChannelClosed("connection to the peer is closed")
                raise ChannelClosed(f"cannot send, the peer has ended the stream: {why}")
            try:
                self._sendq.put(chunk, timeout=min(_POLL, max(0.0, deadline - time.monotonic())))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    raise ChannelTimeout(
                        f"peer did not accept data within {self.default_timeout:g} s (send backlog full)"
                    ) from None

    def _send_frame(self, frame: bytes) -> None:
        if self._peer_gone is not None:
            raise type(self._peer_gone)(str(self._peer_gone))
        deadline = time.monotonic() + self.default_timeout
        view = memoryview(frame)
        n = len(view)
        with self._send_lock:
            if n == 0:
                self._put_chunk(bytes((_LAST,)), deadline)
                return
            for start in range(0, n, CHUNK_BYTES):
                end = min(n, start + CHUNK_BYTES)
                kind = _LAST if end == n else _MORE
                self._put_chunk(bytes((kind,)) + view[start:end], deadline)

    def _read(self, stream: Iterator[bytes]) -> None:
        """Reader thread: reassemble frames from chunks into the receive queue."""
        buf = bytearray()
        end_reason: ChannelError = ChannelClosed("connection to the peer was lost")
        try:
            for chunk in stream:
                if not chunk:
                    continue
                kind = chunk[0]
                if kind == _HELLO:
                    self._hello_ok = True
                    self.hello.set()
                    continue
                if kind not in (_MORE, _LAST):
                    end_reason = ChannelError(f"peer sent an unknown chunk kind {kind}")
                    self._cancel()
                    break
                if len(buf) + len(chunk) - 1 > self.codec.max_message_bytes:
                    self._deliver(
                        ResourceLimitError(
                            f"incoming message exceeds the limit of {self.codec.max_message_bytes} bytes"
                        )
                    )
                    end_reason = ChannelClosed("connection dropped after an oversized message")
                    self._cancel()
                    break
                buf += memoryview(chunk)[1:]
                if kind == _LAST:
                    frame, buf = buf, bytearray()
                    if not self._deliver(frame):
                        return
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                end_reason = ChannelError(f"peer refused the channel: {details}")
            elif not self._torn_down.is_set():
                end_reason = ChannelClosed(f"connection to the peer was lost ({code}: {details})")
        except Exception as exc:  # a transport failure must reach recv(), not vanish in a thread
            end_reason = ChannelClosed(f"connection to the peer was lost ({type(exc).__name__}: {exc})")
        finally:
            self._end_reason = end_reason
            self._deliver(end_reason)
            self.hello.set()
            self._reader_done.set()
            # the peer is gone or closed: end our half of the stream too
            try:
                self._sendq.put_nowait(_END)
            except queue.Full:
                pass

    def _deliver(self, item: object) -> bool:
        if isinstance(item, bytes | bytearray):
            # hold at most ~_RECV_BUDGET_BYTES of unread frames (always room for one): the
            # reader then stops reading and HTTP/2 flow control slows the sender down
            with self._budget:
                while (
                    self._queued_bytes > 0
                    and self._queued_bytes + len(item) > _RECV_BUDGET_BYTES
                    and not self._torn_down.is_set()
                ):
                    self._budget.wait(_POLL)
                self._queued_bytes += len(item)
        while not self._torn_down.is_set():
            try:
                self._recvq.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _recv_frame(self, timeout: float) -> bytes | bytearray:
        try:
            item = self._recvq.get(timeout=timeout)
        except queue.Empty:
            raise ChannelTimeout(f"no message from the peer within {timeout:g} s") from None
        if isinstance(item, ChannelError | ResourceLimitError):
            if isinstance(item, ChannelError):
                self._peer_gone = item
                # keep the sentinel for later recv calls
                try:
                    self._recvq.put_nowait(item)
                except queue.Full:
                    pass
            raise type(item)(str(item))
        if isinstance(item, bytes | bytearray):
            with self._budget:
                self._queued_bytes -= len(item)
                self._budget.notify_all()
        if not isinstance(item, bytes | bytearray):
            raise ChannelError(f"internal error: unexpected item {type(item).__name__} in the receive queue")
        return item

    def _shutdown(self) -> None:
        """Flush, then end our half of the stream; tear down once the peer has ended its half.

        Everything sent before close()/abort() is delivered unless the peer neither reads it
        nor closes within ``default_timeout`` (cancelling the call earlier could drop data
        still in flight). Usually the peer's reader sees our end at once and ends its half.
        """
        deadline = time.monotonic() + self.default_timeout
        while not (self._writer_done.is_set() or self._torn_down.is_set()):
            try:
                self._sendq.put(_END, timeout=_POLL)
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._writer_done.wait(max(0.0, deadline - time.monotonic()))
        self._reader_done.wait(max(0.0, deadline - time.monotonic()))
        self._teardown()

    def _teardown(self) -> None:
        if self._torn_down.is_set():
            return
        self._torn_down.set()
        self._closed = True
        try:
            self._on_shutdown()
        except Exception as exc:
            log.debug("grpc shutdown: %s", exc)


class GrpcListener:
    """A bound, started gRPC server waiting for one pinned peer (see GrpcChannel.listen)."""

    def __init__(
        self,
        bind: str,
        identity: PartyIdentity,
        peer_fingerprint: str | None = None,
        *,
        peer_cert: bytes | str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        pem, fp = _resolve_peer(identity, peer_fingerprint, peer_cert)
        self.peer_fingerprint = fp
        self._timeout = timeout
        self._max = max_message_bytes
        self._accepted = threading.Event()
        self._handler_done = threading.Event()
        self._lock = threading.Lock()
        self._channel: GrpcChannel | None = None
        self.refused: list[str] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_grpc_options())
        handler = grpc.method_handlers_generic_handler(
            _SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(self._handle)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials(
            [(identity.key_pem, identity.cert_pem)], root_certificates=pem, require_client_auth=True
        )
        try:
            port = self._server.add_secure_port(bind, creds)
        except RuntimeError as exc:
            raise ChannelError(f"cannot listen on {bind}: {exc}") from exc
        if port == 0:
            raise ChannelError(f"cannot listen on {bind} (address in use or invalid)")
        self.port = port
        self.bind = bind
        self._server.start()
        log.info("listening on %s (port %d) for peer %s…", bind, port, fp[:16])

    def _stop(self) -> None:
        self._handler_done.wait(_CLOSE_GRACE)
        self._server.stop(grace=1.0)

    def _handle(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        auth = context.auth_context()
        certs = auth.get("x509_pem_cert") or []
        got = cert_fingerprint(certs[0]) if certs else ""
        if not got or not fingerprints_equal(got, self.peer_fingerprint):
            self.refused.append(got or "<no certificate>")
            log.warning("refused a client with fingerprint %s (pinned %s)", got or "-", self.peer_fingerprint)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "client certificate is not the pinned peer")
        with self._lock:
            if self._channel is not None:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "this channel already has its peer")
            chan = GrpcChannel(
                role="server", peer_fingerprint=got, timeout=self._timeout, max_message_bytes=self._max,
                on_shutdown=self._stop,
            )
            self._channel = chan
        chan._cancel = context.cancel
        threading.Thread(
            target=chan._read, args=(request_iterator,), name="veil-grpc-server-reader", daemon=True
        ).start()
        self._accepted.set()
        try:
            yield bytes((_HELLO,))
            yield from chan._outgoing()
        finally:
            self._handler_done.set()

    def accept(self, timeout: float | None = None) -> GrpcChannel:
        """Block until the pinned peer has connected (ChannelTimeout otherwise)."""
        wait = self._timeout if timeout is None else timeout
        if not self._accepted.wait(wait):
            self._server.stop(grace=0)
            extra = f"; refused {len(self.refused)} client(s) with other certificates" if self.refused else ""
            raise ChannelTimeout(f"no pinned peer connected to {self.bind} within {wait:g} s{extra}")
        if self._channel is None:
            raise ChannelError("internal error: accepted without a channel")
        return self._channel

    def close(self) -> None:
        """Stop listening (only needed if accept() is never called)."""
        self._server.stop(grace=0)
