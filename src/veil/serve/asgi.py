"""A thin ASGI fast path for the hot POST endpoints (inference), in front of a FastAPI app.

FastAPI's routing, dependency and response machinery costs a few hundred microseconds per
request; for the inference path the gateway and workers only need the raw body and a few
headers, so matching POSTs are answered here directly and everything else (health, metadata,
OpenAPI, lifespan) goes to the FastAPI app unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["MAX_BODY_BYTES", "FastPost", "Handler"]

MAX_BODY_BYTES = 256 << 20

Scope = MutableMapping[str, Any]
Handler = Callable[[re.Match[str], dict[str, str], bytes], Awaitable[tuple[int, dict[str, str], bytes]]]


class FastPost:
    def __init__(self, app: Any, routes: list[tuple[str, Handler]], max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.routes = [(re.compile(rx), h) for rx, h in routes]
        self.max_body = max_body

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for rx, handler in self.routes:
                m = rx.fullmatch(scope["path"])
                if m is None:
                    continue
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                chunks: list[bytes] = []
                size = 0
                more = True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        await _respond(
                            send,
                            413,
                            {"content-type": "application/json"},
                            b'{"error":"request body too large"}',
                        )
                        return
                    chunks.append(chunk)
                    more = msg.get("more_body", False)
                status, out_headers, data = await handler(m, headers, b"".join(chunks))
                await _respond(send, status, out_headers, data)
                return
        await self.app(scope, receive, send)


async def _respond(
    send: Callable[[dict[str, Any]], Awaitable[None]], status: int, headers: dict[str, str], data: bytes
) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
