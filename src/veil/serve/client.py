"""``veil.serve.client``: a KServe v2 client that can attest the service and encrypt end to end.

::

    client = ServeClient("http://127.0.0.1:8080", policy=Policy(...), e2e=True)
    claims = client.attest()              # verifies the service evidence (any replica)
    out = client.infer("tiny", {"x": x})  # the gateway sees only ciphertext

Without ``e2e`` it is a plain KServe v2 HTTP client (binary tensor extension). One keep-alive
connection per client (``http.client``: headers and body leave in one write, so no Nagle /
delayed-ACK stalls); use one client per thread.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from veil.comm import codec
from veil.crypto.random import random_bytes
from veil.errors import AttestationError, ConfigError
from veil.serve import v2
from veil.serve.e2e import (
    E2E_CONTENT_TYPE,
    ClientE2E,
    ResponseKey,
    ServiceEvidence,
    verify_service_evidence,
)
from veil.serve.errors import ServeError
from veil.tee import Policy, VerifiedClaims, Verifier

__all__ = ["ServeClient"]

log = logging.getLogger("veil.serve.client")


@dataclass
class _Resp:
    status_code: int
    content: bytes
    headers: dict[str, str]

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class ServeClient:
    def __init__(
        self,
        url: str,
        *,
        policy: Policy | None = None,
        e2e: bool = False,
        timeout: float = 60.0,
        verify_tls: Any = True,
    ) -> None:
        if e2e and policy is None:
            raise ConfigError("end-to-end encryption needs an attestation policy to verify the service")
        self.url = url.rstrip("/")
        self.policy = policy
        self.e2e = e2e
        u = urllib.parse.urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"bad service URL {url!r}")
        self._host, self._port, self._tls = (
            u.hostname,
            u.port or (443 if u.scheme == "https" else 80),
            u.scheme,
        )
        self._prefix = u.path.rstrip("/")
        self._timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        if u.scheme == "https":
            self._ctx = ssl.create_default_context(cafile=verify_tls if isinstance(verify_tls, str) else None)
        self._conn: http.client.HTTPConnection | None = None
        self.service_public: bytes | None = None
        self._e2e: ClientE2E | None = None
        self.claims: VerifiedClaims | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attest(self) -> VerifiedClaims:
        """Fetch and verify the service evidence; remembers the service key for E2E requests."""
        if self.policy is None:
            raise ConfigError("attest() needs a policy")
        nonce = random_bytes(32)
        r = self._post(
            "/v2/veil/attestation",
            msgspec.json.encode({"nonce": nonce.hex()}),
            {"content-type": "application/json"},
        )
        if r.status_code != 200:
            raise AttestationError(f"service evidence unavailable: {r.status_code} {r.text[:200]}")
        se = codec.decode(r.content, ServiceEvidence)
        self.claims = verify_service_evidence(se, Verifier(self.policy), nonce)
        self.service_public = se.x25519_public
        self._e2e = ClientE2E(se.x25519_public)
        log.info("service attested (%s enclave %s)", self.claims.label, self.claims.measurement[:16])
        return self.claims

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._ctx is not None:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._ctx
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def _post(self, path: str, body: bytes | Callable[[], bytes], headers: dict[str, str]) -> _Resp:
        """POST, retrying once on a stale keep-alive connection. ``body`` may be a function that
        makes a fresh body per attempt (an E2E request is re-sealed: workers refuse replays)."""
        for attempt in (0, 1):
            conn = self._connect()
            try:
                data_out = body() if callable(body) else body
                conn.request("POST", self._prefix + path, body=data_out, headers=headers)
                r = conn.getresponse()
                data = r.read()
                return _Resp(r.status, data, {k.lower(): v for k, v in r.getheaders()})
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()  # a stale keep-alive connection: reconnect once
                if attempt:
                    raise ServeError(f"cannot reach {self.url}{path}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise ServeError(f"cannot reach {self.url}{path}: {exc}") from None
        raise ServeError(f"cannot reach {self.url}{path}")

    def _send(
        self, path: str, model: str, kind: str, body: bytes, hl: int | None, request_id: str | None
    ) -> tuple[int, bytes, int | None]:
        headers = {"x-request-id": request_id} if request_id else {}
        if not self.e2e:
            headers["content-type"] = "application/json"
            if hl is not None:
                headers["inference-header-content-length"] = str(hl)
            r = self._post(path, body, headers)
            rhl = r.headers.get("inference-header-content-length")
            return r.status_code, r.content, int(rhl) if rhl else None
        if self._e2e is None:
            self.attest()
        if self._e2e is None:
            raise AttestationError("service key unknown after attestation")
        e2e = self._e2e
        keys: list[ResponseKey] = []

        def seal() -> bytes:  # a fresh salt and time per attempt (finding H-9: no replays)
            wire, rk = e2e.seal(model, kind, body, hl)
            keys.append(rk)
            return wire

        headers.update({"content-type": E2E_CONTENT_TYPE, "x-veil-model": model})
        r = self._post(path, seal, headers)
        if r.status_code != 200:
            raise ServeError(f"{path}: {r.status_code} {r.text[:200]}")
        return ClientE2E.open(keys[-1], r.content)

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        request_id: str | None = None,
        outputs: list[str] | None = None,
    ) -> dict[str, np.ndarray]:
        body, hl = v2.encode_request(request_id or "", inputs, outputs=outputs)
        status, data, rhl = self._send(f"/v2/models/{model}/infer", model, "infer", body, hl, request_id)
        if status != 200:
            raise ServeError(f"inference failed ({status}): {data[:300].decode(errors='replace')}")
        _, out = v2.decode_response(data, rhl)
        return out

    def complete(
        self, model: str, prompt: str | list[int], *, max_tokens: int = 16, request_id: str | None = None
    ) -> dict[str, Any]:
        body = msgspec.json.encode({"model": model, "prompt": prompt, "max_tokens": max_tokens})
        status, data, _ = self._send("/v1/completions", model, "completions", body, None, request_id)
        if status != 200:
            raise ServeError(f"completion failed ({status}): {data[:300].decode(errors='replace')}")
        out: dict[str, Any] = msgspec.json.decode(data)
        return out
