"""A thin ASGI fast path for the hot POST endpoints (inference), in front of a FastAPI app.

FastAPI's routing, dependency and response machinery costs a few hundred microseconds per
request; for the inference path the gateway and workers only need the raw body and a few
headers, so matching POSTs are answered here directly and everything else (health, metadata,
OpenAPI, lifespan) goes to the FastAPI app unchanged.

Hardening (issue 9): every HTTP request, on the fast path or not, is held to a body cap
(``VEIL_LIMIT_MAX_REQUEST_BODY_BYTES`` or the server's own setting) *before* the body is read:
a declared ``Content-Length`` above the cap is answered 413 at once, and a streamed (chunked)
body is cut off with 413 as soon as it passes the cap. Optionally, the requests one client
address has in flight on the fast path are bounded by a :class:`veil.limits.SessionLimiter`
(429 beyond it).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from veil.errors import ResourceLimitError
from veil.limits import SessionLimiter, check_request_body_bytes, get_limits

__all__ = ["MAX_BODY_BYTES", "BodyLimit", "FastPost", "Handler", "error_body"]

#: the default cap (the default of ``Limits.max_request_body_bytes``); servers read get_limits()
MAX_BODY_BYTES = 256 << 20

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[re.Match[str], dict[str, str], bytes], Awaitable[tuple[int, dict[str, str], bytes]]]

_JSON = {"content-type": "application/json"}


def error_body(exc: Exception) -> bytes:
    """The declared error schema ``{"error", "kind"}`` for ``exc``."""
    return msgspec.json.encode({"error": str(exc), "kind": type(exc).__name__})


def _declared_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return -1
    return None


class _Capped:
    """Reads a request body from ``receive`` and refuses it once it passes ``limit`` bytes."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.size = 0
        self.exceeded: ResourceLimitError | None = None

    async def __call__(self) -> dict[str, Any]:
        msg = await self.receive()
        if msg["type"] == "http.request":
            self.size += len(msg.get("body", b""))
            try:
                check_request_body_bytes(self.size, self.limit)
            except ResourceLimitError as exc:
                self.exceeded = exc
                return {"type": "http.disconnect"}  # what the app sees: the body stops here
        return msg


async def _refuse_declared(scope: Scope, send: Send, limit: int) -> bool:
    """Answer 413 (or 400) at once when the declared Content-Length is over ``limit`` (or bad)."""
    n = _declared_length(scope)
    if n is None:
        return False
    if n < 0:
        await _respond(send, 400, _JSON, b'{"error":"bad Content-Length","kind":"InputError"}')
        return True
    try:
        check_request_body_bytes(n, limit)
    except ResourceLimitError as exc:
        await _respond(send, 413, _JSON, error_body(exc))
        return True
    return False


class BodyLimit:
    """ASGI middleware: the request-body cap for any app (``app.add_middleware(BodyLimit, max_body=n)``)."""

    def __init__(self, app: Any, max_body: int | None = None) -> None:
        self.app = app
        self.max_body = get_limits().max_request_body_bytes if max_body is None else int(max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if await _refuse_declared(scope, send, self.max_body):
            return
        capped = _Capped(receive, self.max_body)
        started = False

        async def guarded(msg: dict[str, Any]) -> None:
            nonlocal started
            if capped.exceeded is None:
                started = True
                await send(msg)

        try:
            await self.app(scope, capped, guarded)
        except Exception:
            if capped.exceeded is None:
                raise
        if capped.exceeded is not None and not started:
            await _respond(send, 413, _JSON, error_body(capped.exceeded))


class FastPost:
    """Answers POSTs to ``routes`` directly; everything else goes to ``app`` (both under the body cap).

    ``max_body``: bytes (default ``VEIL_LIMIT_MAX_REQUEST_BODY_BYTES``). ``per_client``: bounds
    the fast-path requests one client address has in flight (429 beyond it).
    """

    def __init__(
        self,
        app: Any,
        routes: list[tuple[str, Handler]],
        max_body: int | None = None,
        per_client: SessionLimiter | None = None,
    ) -> None:
        self.app = app
        self.routes = [(re.compile(rx), h) for rx, h in routes]
        self.max_body = get_limits().max_request_body_bytes if max_body is None else int(max_body)
        self.per_client = per_client
        self._limited = BodyLimit(app, self.max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for rx, handler in self.routes:
                m = rx.fullmatch(scope["path"])
                if m is None:
                    continue
                if await _refuse_declared(scope, send, self.max_body):
                    return
                client = str((scope.get("client") or ("unknown",))[0])
                if self.per_client is not None:
                    try:
                        self.per_client.acquire(client)
                    except ResourceLimitError as exc:
                        await _respond(send, 429, _JSON, error_body(exc))
                        return
                try:
                    await self._post(m, handler, scope, receive, send)
                finally:
                    if self.per_client is not None:
                        self.per_client.release(client)
                return
        await self._limited(scope, receive, send)

    async def _post(
        self, m: re.Match[str], handler: Handler, scope: Scope, receive: Receive, send: Send
    ) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        capped = _Capped(receive, self.max_body)
        chunks: list[bytes] = []
        more = True
        while more:
            msg = await capped()
            if capped.exceeded is not None:
                await _respond(send, 413, _JSON, error_body(capped.exceeded))
                return
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        status, out_headers, data = await handler(m, headers, b"".join(chunks))
        await _respond(send, status, out_headers, data)


async def _respond(send: Send, status: int, headers: dict[str, str], data: bytes) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
