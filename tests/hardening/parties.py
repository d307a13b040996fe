"""Channel wrappers for adversarial tests: a party that rewrites what it sends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from veil.comm import Message

Mutator = Callable[[Message, int], Message | None]


class Tamper:
    """Wraps a channel; ``mutate(msg, index)`` may return a replacement for an outgoing message.

    This models a malicious (or buggy) party: everything it sends is well-formed on the wire
    (it goes through the codec) but the content is chosen by the attacker.
    """

    def __init__(self, inner: Any, mutate: Mutator) -> None:
        self.inner = inner
        self.mutate = mutate
        self.stats = inner.stats
        self.default_timeout = inner.default_timeout
        self.sent = 0
        self.tampered: list[str] = []

    def send(self, msg: Message) -> None:
        out = self.mutate(msg, self.sent)
        self.sent += 1
        if out is not None and out is not msg:
            self.tampered.append(type(msg).__name__)
            msg = out
        self.inner.send(msg)

    def recv(self, msg_type: Any, timeout: float | None = None) -> Any:
        return self.inner.recv(msg_type, timeout=timeout)

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)

    def close(self) -> None:
        self.inner.close()
