"""The Channel protocol, byte/round counters, control frames, and the in-process MemoryChannel."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from veil.comm.codec import DEFAULT_MAX_MESSAGE_BYTES, Codec, Message, message_tag, peek_tag
from veil.errors import ChannelClosed, ChannelError, ChannelTimeout, PeerError, ProtocolError

__all__ = ["Abort", "Channel", "ChannelStats", "Close", "FrameChannel", "MemoryChannel"]

log = logging.getLogger("veil.comm")

T = TypeVar("T", bound=Message)

DEFAULT_TIMEOUT = 60.0


class Abort(Message, frozen=True, tag="__veil_abort__"):
    """Control frame: the sender failed; the receiver's next recv raises PeerError."""

    reason: str


class Close(Message, frozen=True, tag="__veil_close__"):
    """Control frame: the sender closed the channel cleanly."""


_ABORT_TAG = message_tag(Abort)
_CLOSE_TAG = message_tag(Close)


@dataclass
class ChannelStats:
    """Traffic counters of one end of a channel (thread-safe).

    Bytes are encoded frame bytes of application messages (control frames such as Abort and
    Close are not counted). ``rounds`` counts changes of direction from sending to receiving:
    it grows by one on each ``recv`` that follows at least one ``send``.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rounds: int = 0
    _last: str = field(default="", repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_send(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.messages_sent += 1
            self._last = "send"

    def record_recv(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_received += nbytes
            self.messages_received += 1
            if self._last == "send":
                self.rounds += 1
            self._last = "recv"

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "messages_sent": self.messages_sent,
                "messages_received": self.messages_received,
                "rounds": self.rounds,
            }


@runtime_checkable
class Channel(Protocol):
    """A typed, ordered, reliable two-party message channel."""

    stats: ChannelStats
    default_timeout: float

    def send(self, msg: Message) -> None: ...

    def recv(self, msg_type: type[T] | tuple[type[Any], ...], timeout: float | None = None) -> T: ...

    def abort(self, reason: str) -> None: ...

    def close(self) -> None: ...


class FrameChannel:
    """Shared logic for channels that move encoded frames: codec, counters, control frames.

    Subclasses implement ``_send_frame(frame: bytes)`` and
    ``_recv_frame(timeout) -> bytes | bytearray`` (raising ChannelTimeout/ChannelClosed).
    """

    def __init__(
        self, *, timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        if not timeout > 0:
            raise ChannelError(f"channel timeout must be positive, got {timeout}")
        self.default_timeout = float(timeout)
        if max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES:  # hardening (issue 9): caller chose no limit,
            from veil.limits import get_limits  # so the shared VEIL_LIMIT_MAX_MESSAGE_BYTES applies

            max_message_bytes = min(max_message_bytes, get_limits().max_message_bytes)
        self.codec = Codec(max_message_bytes)
        self.stats = ChannelStats()
        self._closed = False
        self._peer_gone: ChannelError | None = None

    # -- transport hooks
    def _send_frame(self, frame: bytes) -> None:  # pragma: no cover - abstract
        raise ChannelError(f"{type(self).__name__} cannot send")

    def _recv_frame(self, timeout: float) -> bytes | bytearray:  # pragma: no cover - abstract
        raise ChannelError(f"{type(self).__name__} cannot receive")

    def _shutdown(self) -> None:
        """Release transport resources (called once by close/abort)."""

    # -- public API
    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, msg: Message) -> None:
        if self._closed:
            raise ChannelClosed("cannot send: this channel is closed")
        if self._peer_gone is not None:
            raise type(self._peer_gone)(str(self._peer_gone))
        frame = self.codec.encode(msg)
        self._send_frame(frame)
        self.stats.record_send(len(frame))

    def recv(self, msg_type: type[T] | tuple[type[Any], ...], timeout: float | None = None) -> T:
        if self._closed:
            raise ChannelClosed("cannot receive: this channel is closed")
        if self._peer_gone is not None:
            raise type(self._peer_gone)(str(self._peer_gone))
        wait = self.default_timeout if timeout is None else float(timeout)
        if not wait > 0:
            raise ChannelError(f"recv timeout must be positive, got {timeout}")
        frame = self._recv_frame(wait)
        tag = peek_tag(frame)
        if tag == _ABORT_TAG:
            try:
                reason = self.codec.decode(frame, Abort).reason[:4096]  # peer-controlled text: bounded
            except ProtocolError:
                reason = "<malformed abort frame>"
            self._peer_gone = PeerError(f"peer aborted: {reason}")
            raise PeerError(f"peer aborted: {reason}")
        if tag == _CLOSE_TAG:
            self._peer_gone = ChannelClosed("peer closed the channel")
            raise ChannelClosed("peer closed the channel")
        self.stats.record_recv(len(frame))
        msg: T = self.codec.decode(frame, msg_type)
        return msg

    def abort(self, reason: str) -> None:
        """Tell the peer we failed (its next recv raises PeerError) and close this end."""
        if self._closed:
            return
        try:
            if self._peer_gone is None:
                self._send_frame(self.codec.encode(Abort(reason=str(reason)[:4096])))
        except ChannelError as exc:
            log.debug("abort frame not delivered: %s", exc)
        finally:
            self._closed = True
            self._shutdown()

    def close(self) -> None:
        """Close this end; the peer's next recv (after pending messages) raises ChannelClosed."""
        if self._closed:
            return
        try:
            if self._peer_gone is None:
                self._send_frame(self.codec.encode(Close()))
        except ChannelError as exc:
            log.debug("close frame not delivered: %s", exc)
        finally:
            self._closed = True
            self._shutdown()

    def __enter__(self) -> FrameChannel:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None and isinstance(exc, BaseException):
            self.abort(f"{type(exc).__name__}: {exc}")
        else:
            self.close()


class MemoryChannel(FrameChannel):
    """One end of an in-process channel pair (threads). Frames go through the codec, so byte
    counts are real and no Python object is shared between the two ends."""

    def __init__(
        self,
        inbox: queue.Queue[bytes],
        outbox: queue.Queue[bytes],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(timeout=timeout, max_message_bytes=max_message_bytes)
        self._inbox = inbox
        self._outbox = outbox

    @classmethod
    def pair(
        cls, timeout: float = DEFAULT_TIMEOUT, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> tuple[MemoryChannel, MemoryChannel]:
        """Two connected ends ``(a, b)``: what ``a`` sends, ``b`` receives, and vice versa."""
        q_ab: queue.Queue[bytes] = queue.Queue()
        q_ba: queue.Queue[bytes] = queue.Queue()
        a = cls(q_ba, q_ab, timeout=timeout, max_message_bytes=max_message_bytes)
        b = cls(q_ab, q_ba, timeout=timeout, max_message_bytes=max_message_bytes)
        return a, b

    def _send_frame(self, frame: bytes) -> None:
        self._outbox.put(frame)

    def _recv_frame(self, timeout: float) -> bytes:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise ChannelTimeout(f"no message from the peer within {timeout:g} s") from None
