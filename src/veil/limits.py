"""Resource limits shared by every engine: one pydantic model, read from ``VEIL_LIMIT_*``.

Example: ``VEIL_LIMIT_MAX_ROWS=100000 VEIL_LIMIT_REQUEST_TIMEOUT_S=5 veil serve up ...``.

Engines read the process-wide values with :func:`get_limits` and enforce them with the small
``check_*`` helpers, which raise :class:`veil.errors.ResourceLimitError` with a message that
names the limit, the value seen and the environment variable that raises it. Per-client
concurrency is bounded by a :class:`SessionLimiter`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from veil.errors import ConfigError, ResourceLimitError

__all__ = [
    "Limits",
    "SessionLimiter",
    "check_message_bytes",
    "check_request_body_bytes",
    "check_rows",
    "check_sequence_length",
    "get_limits",
    "reset_limits",
]

ENV_PREFIX = "VEIL_LIMIT_"


class Limits(BaseSettings):
    """Every resource limit veil enforces at a trust boundary.

    Each field can be set as ``VEIL_LIMIT_<FIELD>`` (e.g. ``VEIL_LIMIT_MAX_MESSAGE_BYTES``).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    max_message_bytes: int = Field(
        default=1 << 30, ge=1024, description="largest single wire message / request body accepted (bytes)"
    )
    max_rows: int = Field(
        default=10_000_000, ge=1, description="largest number of rows (instances) one party may announce"
    )
    max_features: int = Field(default=100_000, ge=1, description="largest number of feature columns")
    max_sequence_length: int = Field(
        default=32_768, ge=1, description="longest token sequence accepted by tune/serve"
    )
    max_batch_size: int = Field(default=4096, ge=1, description="largest batch (rows) in one request")
    max_concurrent_sessions_per_client: int = Field(
        default=8, ge=1, description="open sessions one client identity may hold at the same time"
    )
    max_request_body_bytes: int = Field(
        default=256 << 20, ge=1024, description="largest HTTP request body a veil server reads (bytes)"
    )
    max_inflight_requests_per_client: int = Field(
        default=4096, ge=1, description="requests one client address may have in flight at a gateway"
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, le=86_400, description="deadline of one request / one protocol receive (s)"
    )
    connect_timeout_s: float = Field(default=30.0, gt=0, le=3_600, description="deadline to connect (s)")


@lru_cache(maxsize=1)
def get_limits() -> Limits:
    """The process-wide limits (read once from the environment). ConfigError if invalid."""
    extra: dict[str, str] = {}
    legacy = os.environ.get("VEIL_MAX_MESSAGE_BYTES")  # veil.config's older knob, honoured if set alone
    if legacy is not None and f"{ENV_PREFIX}MAX_MESSAGE_BYTES" not in os.environ:
        extra["max_message_bytes"] = legacy
    try:
        return Limits(**extra)  # type: ignore[arg-type]  # pydantic parses the string
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid veil limits: {problems}") from None


def reset_limits() -> None:
    """Forget cached limits (tests, or after changing the environment)."""
    get_limits.cache_clear()


def _exceeded(what: str, value: int, field: str, limit: int) -> ResourceLimitError:
    return ResourceLimitError(
        f"{what}: {value} exceeds the limit of {limit} (raise it with {ENV_PREFIX}{field.upper()})"
    )


def check_message_bytes(n: int, what: str = "message", limits: Limits | None = None) -> int:
    """Refuse a message/body of ``n`` bytes above ``max_message_bytes``; returns ``n``."""
    lim = limits or get_limits()
    if n > lim.max_message_bytes:
        raise _exceeded(f"{what} size in bytes", n, "max_message_bytes", lim.max_message_bytes)
    return n


def check_request_body_bytes(n: int, limit: int | None = None) -> int:
    """Refuse an HTTP request body of ``n`` bytes above ``limit`` (default ``max_request_body_bytes``)."""
    lim = get_limits().max_request_body_bytes if limit is None else limit
    if n > lim:
        raise _exceeded("request body size in bytes", n, "max_request_body_bytes", lim)
    return n


def check_rows(n: int, what: str = "rows", limits: Limits | None = None) -> int:
    """Refuse a negative row count or one above ``max_rows``; returns ``n``."""
    lim = limits or get_limits()
    if n < 0:
        raise ResourceLimitError(f"{what}: negative count {n}")
    if n > lim.max_rows:
        raise _exceeded(what, n, "max_rows", lim.max_rows)
    return n


def check_sequence_length(n: int, what: str = "sequence length", limits: Limits | None = None) -> int:
    """Refuse a sequence longer than ``max_sequence_length``; returns ``n``."""
    lim = limits or get_limits()
    if n < 0:
        raise ResourceLimitError(f"{what}: negative length {n}")
    if n > lim.max_sequence_length:
        raise _exceeded(what, n, "max_sequence_length", lim.max_sequence_length)
    return n


class SessionLimiter:
    """Bounds the sessions one client may hold open at once (thread-safe).

    >>> limiter = SessionLimiter()
    >>> with limiter.session("client-fp"):
    ...     pass

    ``acquire`` raises :class:`ResourceLimitError` instead of queueing: a client that opens
    too many sessions is refused at once, it cannot make the server wait. ``field`` names the
    :class:`Limits` field that gives the default (and the variable the error message names),
    ``what`` what is being counted.
    """

    def __init__(
        self,
        max_per_client: int | None = None,
        *,
        field: str = "max_concurrent_sessions_per_client",
        what: str = "open sessions",
    ) -> None:
        if field not in Limits.model_fields:
            raise ConfigError(f"unknown limit {field!r}")
        limit = int(getattr(get_limits(), field)) if max_per_client is None else max_per_client
        if limit < 1:
            raise ConfigError(f"max sessions per client must be >= 1, got {limit}")
        self.max_per_client = int(limit)
        self.field = field
        self.what = what
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str) -> None:
        with self._lock:
            n = self._open.get(client, 0)
            if n >= self.max_per_client:
                raise ResourceLimitError(
                    f"client {client[:32]!r} already holds {n} {self.what}, the limit is "
                    f"{self.max_per_client} (raise it with {ENV_PREFIX}{self.field.upper()})"
                )
            self._open[client] = n + 1

    def release(self, client: str) -> None:
        with self._lock:
            n = self._open.get(client, 0)
            if n <= 1:
                self._open.pop(client, None)
            else:
                self._open[client] = n - 1

    def open_sessions(self, client: str) -> int:
        with self._lock:
            return self._open.get(client, 0)

    @contextmanager
    def session(self, client: str) -> Iterator[None]:
        self.acquire(client)
        try:
            yield
        finally:
            self.release(client)
