"""FaultyChannel: a Channel wrapper that injects transport faults, for hardening tests.

It wraps the *sending* side of any :class:`~veil.comm.Channel` (wrap both ends to disturb both
directions) and, per sent message, may:

* ``drop``       — never deliver it;
* ``delay``      — sleep up to ``max_delay_s`` before delivering it;
* ``duplicate``  — deliver it twice;
* ``reorder``    — hold it back and deliver it after the next message (a held message is
  flushed before this end receives, so a request/response protocol still makes progress; it is
  recorded as a fault only when a later message really overtook it);
* ``truncate``   — deliver a frame cut short (needs a frame channel: MemoryChannel/GrpcChannel);
* ``corrupt``    — deliver the frame with one byte flipped (frame channels only);
* ``close``      — close the channel instead of sending (the peer sees ChannelClosed);
* ``kill``       — go silent without a Close frame, like a crashed process (the peer times out).

Faults come either from probabilities drawn with an injected :class:`random.Random` (fault
scheduling is not security randomness, so a seeded ``random.Random`` is right here and makes a
failing campaign reproducible), or from a ``script`` mapping the index of a sent message to a
fault. Every injected fault is recorded in :attr:`FaultyChannel.injected`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from veil.comm.channel import ChannelStats, FrameChannel, MemoryChannel
from veil.comm.codec import Message
from veil.errors import ChannelClosed, ConfigError

__all__ = ["FAULT_KINDS", "FaultPlan", "FaultyChannel", "InjectedFault"]

log = logging.getLogger("veil.comm")

T = TypeVar("T", bound=Message)

FaultKind = Literal["drop", "delay", "duplicate", "reorder", "truncate", "corrupt", "close", "kill"]
FAULT_KINDS: tuple[str, ...] = (
    "drop", "delay", "duplicate", "reorder", "truncate", "corrupt", "close", "kill",
)
_FRAME_ONLY = ("truncate", "corrupt", "kill")


@dataclass(frozen=True)
class FaultPlan:
    """Per-message fault probabilities (each in [0, 1], their sum at most 1)."""

    drop: float = 0.0
    delay: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    truncate: float = 0.0
    corrupt: float = 0.0
    close: float = 0.0
    kill: float = 0.0
    max_delay_s: float = 0.05

    def __post_init__(self) -> None:
        probs = self.probabilities()
        for k, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"fault probability {k}={p} is not in [0, 1]")
        if sum(probs.values()) > 1.0 + 1e-9:
            raise ConfigError(f"fault probabilities add up to {sum(probs.values()):.3f} > 1")
        if not 0.0 <= self.max_delay_s <= 60.0:
            raise ConfigError(f"max_delay_s={self.max_delay_s} is not in [0, 60]")

    def probabilities(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in FAULT_KINDS}

    @classmethod
    def only(cls, kind: str, p: float, **kw: Any) -> FaultPlan:
        """A plan with a single fault kind at probability ``p``."""
        if kind not in FAULT_KINDS:
            raise ConfigError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        return cls(**{kind: p}, **kw)


@dataclass(frozen=True)
class InjectedFault:
    index: int  # index of the send() call it hit (0-based)
    kind: str
    message: str  # type name of the message it hit


@dataclass
class _Held:
    frame: bytes | None
    msg: Message
    index: int


@dataclass
class FaultyChannel:
    """Wraps ``inner`` and injects faults into what this end sends (see module doc)."""

    inner: Any
    rng: random.Random | None = None
    plan: FaultPlan = field(default_factory=FaultPlan)
    script: dict[int, str] = field(default_factory=dict)
    after: int = 0  # no random faults on the first ``after`` sends (e.g. let a handshake through)
    injected: list[InjectedFault] = field(default_factory=list)

    def __post_init__(self) -> None:
        for idx, kind in self.script.items():
            if kind not in FAULT_KINDS:
                raise ConfigError(f"unknown fault kind {kind!r} at send #{idx}")
        needs_frames = any(k in _FRAME_ONLY for k in self.script.values()) or any(
            getattr(self.plan, k) > 0 for k in _FRAME_ONLY
        )
        if needs_frames and not isinstance(self.inner, FrameChannel):
            raise ConfigError(
                "truncate/corrupt/kill faults need a frame channel (MemoryChannel or GrpcChannel)"
            )
        if any(p > 0 for p in self.plan.probabilities().values()) and self.rng is None:
            raise ConfigError("random faults need an injected random.Random (rng=...) for reproducibility")
        self._sent = 0
        self._held: _Held | None = None
        self._dead = False

    # -- Channel protocol -------------------------------------------------------------------
    @property
    def stats(self) -> ChannelStats:
        stats: ChannelStats = self.inner.stats
        return stats

    @property
    def default_timeout(self) -> float:
        return float(self.inner.default_timeout)

    def counts(self) -> dict[str, int]:
        """How many faults of each kind were injected so far."""
        return dict(Counter(f.kind for f in self.injected))

    def _choose(self, idx: int) -> str | None:
        if idx in self.script:
            return self.script[idx]
        if self.rng is None or idx < self.after:
            return None
        x = self.rng.random()
        acc = 0.0
        for kind, p in self.plan.probabilities().items():
            acc += p
            if x < acc:
                return kind
        return None

    def _deliver(self, msg: Message, frame: bytes | None = None) -> None:
        if frame is not None:
            self.inner._send_frame(frame)
            self.inner.stats.record_send(len(frame))
        else:
            self.inner.send(msg)

    def _flush_held(self, swapped: bool = False) -> None:
        """Deliver a held-back message; it counts as reordered only if a later one overtook it."""
        held, self._held = self._held, None
        if held is not None and not self._dead:
            self._deliver(held.msg, held.frame)
            if swapped:
                self.injected.append(InjectedFault(held.index, "reorder", type(held.msg).__name__))

    def send(self, msg: Message) -> None:
        if self._dead:
            # a crashed sender sends nothing more; its caller only finds out by timing out later
            return
        idx = self._sent
        self._sent += 1
        kind = self._choose(idx)
        if kind is None:
            self._deliver(msg)
            self._flush_held(swapped=True)
            return
        if kind != "reorder":  # a reorder is recorded when a later message actually overtakes it
            self.injected.append(InjectedFault(idx, kind, type(msg).__name__))
        log.debug("fault injected: %s on send #%d (%s)", kind, idx, type(msg).__name__)
        if kind == "drop":
            return
        if kind == "delay":
            time.sleep(self.rng.uniform(0.0, self.plan.max_delay_s) if self.rng else self.plan.max_delay_s)
            self._deliver(msg)
            self._flush_held(swapped=True)
        elif kind == "duplicate":
            self._deliver(msg)
            self._deliver(msg)
            self._flush_held(swapped=True)
        elif kind == "reorder":
            self._flush_held()
            self._held = _Held(None, msg, idx)
        elif kind in ("truncate", "corrupt"):
            frame = self.inner.codec.encode(msg)
            if kind == "truncate":
                cut = self.rng.randrange(0, len(frame)) if self.rng else len(frame) // 2
                frame = frame[:cut]
            else:
                pos = self.rng.randrange(0, len(frame)) if self.rng else len(frame) - 1
                bit = 1 << (self.rng.randrange(8) if self.rng else 0)
                frame = frame[:pos] + bytes([frame[pos] ^ bit]) + frame[pos + 1 :]
            self._deliver(msg, frame)
            self._flush_held(swapped=True)
        elif kind == "close":
            self._held = None
            self.inner.close()
            raise ChannelClosed(f"fault injected: channel closed instead of sending {type(msg).__name__}")
        elif kind == "kill":
            self._held = None
            self._dead = True
            inner: FrameChannel = self.inner
            inner._closed = True  # no Close/Abort frame: the peer only sees silence
            inner._shutdown()

    def recv(self, msg_type: type[T] | tuple[type[Any], ...], timeout: float | None = None) -> T:
        if self._dead:
            raise ChannelClosed("fault injected: this end was killed")
        self._flush_held()
        msg: T = self.inner.recv(msg_type, timeout=timeout)
        return msg

    def abort(self, reason: str) -> None:
        self._held = None
        if not self._dead:
            self.inner.abort(reason)

    def close(self) -> None:
        if self._dead:
            return
        try:
            self._flush_held()
        finally:
            self.inner.close()

    def __enter__(self) -> FaultyChannel:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None and isinstance(exc, BaseException):
            self.abort(f"{type(exc).__name__}: {exc}")
        else:
            self.close()

    @classmethod
    def pair(
        cls,
        rng: random.Random | None = None,
        *,
        plan_a: FaultPlan | None = None,
        plan_b: FaultPlan | None = None,
        script_a: dict[int, str] | None = None,
        script_b: dict[int, str] | None = None,
        timeout: float = 10.0,
        after: int = 0,
    ) -> tuple[FaultyChannel, FaultyChannel]:
        """Two MemoryChannel ends, each wrapped (faults on what each end sends)."""
        a, b = MemoryChannel.pair(timeout=timeout)
        # each end gets its own generator derived from ``rng``: the two ends run in different
        # threads, and one shared generator would make the schedule depend on thread timing
        rng_a = rng_b = None
        if rng is not None:  # fault schedule, not a secret
            rng_a = random.Random(rng.getrandbits(64))  # noqa: S311
            rng_b = random.Random(rng.getrandbits(64))  # noqa: S311
        return (
            cls(a, rng_a, plan_a or FaultPlan(), dict(script_a or {}), after),
            cls(b, rng_b, plan_b or FaultPlan(), dict(script_b or {}), after),
        )
