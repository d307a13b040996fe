"""The KMS HTTP service (FastAPI): key registration, attestation challenges, key release, audit.

Release protocol (see docs/protocols/serve.md)::

    worker                                   KMS
      POST /v1/attest/challenge       ->     nonce (single use, expires after nonce_ttl_s)
      offer = EnclaveKeyExchange(enclave).offer(nonce)      # evidence binds worker X25519 key + nonce
      POST /v1/attest/release {nonce, offer, key_ids} ->
                                             consume nonce; verify offer against the Policy
                                             (veil.tee.kex: measurement, debug, simulated, freshness,
                                             binding); unseal the requested keys + service identity;
                                             encrypt KeyRelease to the attested key; audit
      kx.finish(kms_public).decrypt(bundle) <- {kms_public, bundle}

Every refusal answers 403 with a reason and writes an audit row; nothing is released.

Limits (issue 9): one client address may hold ``max_sessions_per_client`` open key-release
sessions (issued, unused, unexpired challenges; default
``VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT``): one more challenge is answered 429
(:class:`KMSBusy`) until one is used or expires. Request bodies are capped at ``max_body_bytes``
(413 before they are read).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil.comm import codec
from veil.crypto.random import random_bytes
from veil.errors import AttestationError, InputError, KMSError, ProtocolError, ResourceLimitError, VeilError
from veil.limits import SessionLimiter
from veil.serve.asgi import BodyLimit
from veil.serve.errors import UnknownKey, openapi_error_responses
from veil.serve.kms.store import KMSStore
from veil.serve.kms.wire import (
    AuditEntry,
    ChallengeResponse,
    CreateKeyRequest,
    ImportKeyRequest,
    KeyInfo,
    KeyRelease,
    NewKeyResponse,
    ReleasedKey,
    ReleaseRequest,
    ReleaseResponse,
    ServiceInfo,
    b64d,
    b64e,
)
from veil.tee import AttestedOffer, Enclave, Policy, Verifier, load_enclave
from veil.tee.kex import client_key_exchange_with_claims

__all__ = ["KMSBusy", "KMSConfig", "KMSRefused", "KMSService", "create_app", "kms_enclave"]

log = logging.getLogger("veil.serve.kms")

RELEASE_AAD = b"veil-kms-release-v1"
MAX_PENDING_NONCES = 10_000


class KMSRefused(KMSError):
    """The KMS refused to release anything (reason in the message and the audit log)."""


class KMSBusy(KMSError):
    """Too many open key-release sessions for this client (HTTP 429); retry after one ends."""


class KMSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_dir: Path
    admin_token: str = Field(min_length=16)
    policy: Policy
    nonce_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    tee_backend: str = "simulated"
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    max_sessions_per_client: int | None = Field(default=None, ge=1)
    """Open key-release sessions (pending challenges) per client address;
    default VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Request body cap (413): KMS requests are small (an offer with its evidence)."""


def kms_enclave(backend: str = "simulated") -> Enclave:
    """The enclave the KMS itself runs in (its measurement covers the KMS code)."""
    return load_enclave(backend, code=[Path(__file__).parent], config={"component": "veil-kms"})


class KMSService:
    """KMS logic, independent of HTTP (the FastAPI app is a thin layer over it)."""

    def __init__(
        self, config: KMSConfig, *, enclave: Enclave | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.clock = clock
        self.enclave = enclave or kms_enclave(config.tee_backend)
        self.store = KMSStore(config.state_dir, self.enclave, clock=clock)
        self.verifier = Verifier(config.policy, clock=clock)
        self._nonces: dict[bytes, tuple[float, str]] = {}  # nonce -> (issued at, client)
        self.sessions = SessionLimiter(config.max_sessions_per_client, what="open key-release sessions")
        self._lock = threading.Lock()
        self._token_digest = hashlib.sha256(config.admin_token.encode()).digest()
        label = "SIMULATED" if self.enclave.simulated else self.enclave.backend
        log.warning(
            "KMS running in a %s enclave; policy allow_simulated=%s", label, config.policy.allow_simulated
        )

    # ------------------------------------------------------------------ admin
    def check_admin(self, token: str | None, peer: str = "") -> None:
        given = hashlib.sha256((token or "").encode()).digest()
        if token is None or not hmac.compare_digest(given, self._token_digest):
            self.store.audit(
                event="admin", outcome="refused", reason="missing or wrong admin token", peer=peer
            )
            raise KMSRefused("admin token missing or wrong")

    # ------------------------------------------------------------------ attestation
    def _expire(self, now: float) -> None:
        """Forget expired challenges and free their clients' session slots (caller holds the lock)."""
        ttl = self.config.nonce_ttl_s
        for n, (t, who) in list(self._nonces.items()):
            if now - t > ttl:
                del self._nonces[n]
                self.sessions.release(who)

    def challenge(self, peer: str = "") -> ChallengeResponse:
        """Open a key-release session for client ``peer``: a single-use nonce (KMSBusy beyond the
        client's session budget, KMSRefused when the KMS holds too many pending challenges)."""
        now = float(self.clock())
        nonce = random_bytes(32)
        with self._lock:
            if len(self._nonces) >= MAX_PENDING_NONCES:
                self._expire(now)
                if len(self._nonces) >= MAX_PENDING_NONCES:
                    raise KMSRefused("too many pending challenges; retry later")
            try:
                self.sessions.acquire(peer)
            except ResourceLimitError:
                self._expire(now)
                try:
                    self.sessions.acquire(peer)
                except ResourceLimitError as exc:
                    raise KMSBusy(f"{exc}; use or let expire a pending challenge first") from None
            self._nonces[nonce] = (now, peer)
        return ChallengeResponse(nonce=nonce.hex(), expires_in_s=self.config.nonce_ttl_s)

    def release(self, req: ReleaseRequest, peer: str = "") -> ReleaseResponse:
        measurement, tee = "", ""

        def refuse(reason: str) -> KMSRefused:
            self.store.audit(
                event="release",
                outcome="refused",
                reason=reason,
                measurement=measurement,
                tee=tee,
                key_ids=req.key_ids,
                worker_id=req.worker_id,
                peer=peer,
            )
            log.warning("KMS refused release to %s: %s", req.worker_id or peer, reason)
            return KMSRefused(f"release refused: {reason}")

        nonce = bytes.fromhex(req.nonce)
        with self._lock:
            entry = self._nonces.pop(nonce, None)  # single use: consumed even if what follows fails
            if entry is not None:
                self.sessions.release(entry[1])  # the session ends with its release request
        issued = None if entry is None else entry[0]
        try:
            offer = codec.decode(b64d(req.offer, "offer"), AttestedOffer)
        except (ProtocolError, VeilError) as exc:
            raise refuse(f"malformed offer: {exc}") from None
        measurement = offer.evidence.measurement[:64]
        tee = "simulated" if offer.evidence.simulated else offer.evidence.backend
        if issued is None:
            raise refuse("unknown or already used nonce (replayed evidence?)")
        if float(self.clock()) - issued > self.config.nonce_ttl_s:
            raise refuse(f"stale nonce (older than {self.config.nonce_ttl_s:g}s)")
        try:
            kms_public, session, claims = client_key_exchange_with_claims(offer, self.verifier, nonce)
        except AttestationError as exc:
            raise refuse(str(exc)) from None
        tee = claims.label
        keys: list[ReleasedKey] = []
        for kid in req.key_ids:
            try:
                info, key = self.store.get_key(kid)
            except UnknownKey as exc:
                raise refuse(str(exc)) from None
            keys.append(
                ReleasedKey(key_id=kid, model=info.model, version=info.version, key=key, signer=info.signer)
            )
        bundle = KeyRelease(keys=keys, identity=self.store.identity, issued_at=float(self.clock()))
        frame = session.encrypt(codec.encode(bundle), aad=RELEASE_AAD)
        self.store.audit(
            event="release",
            outcome="released",
            reason="policy satisfied",
            measurement=measurement,
            tee=tee,
            key_ids=req.key_ids,
            worker_id=req.worker_id,
            peer=peer,
        )
        log.info(
            "KMS released %d key(s) + service identity to %s (%s enclave %s)",
            len(keys),
            req.worker_id or peer,
            tee,
            measurement[:16],
        )
        return ReleaseResponse(
            kms_public=kms_public.hex(), bundle=b64e(frame), tee=tee, measurement=measurement
        )

    def service_info(self) -> ServiceInfo:
        pol = self.config.policy
        return ServiceInfo(
            x25519_public=self.store.identity.x25519_public.hex(),
            tls_cert_pem=self.store.identity.tls_cert_pem.decode(),
            policy={
                "allowed_measurements": sorted(pol.allowed_measurements),
                "allow_simulated": pol.allow_simulated,
                "allow_debug": pol.allow_debug,
                "max_age_s": pol.max_age_s,
            },
        )


def create_app(service: KMSService) -> FastAPI:
    app = FastAPI(
        title="veil KMS",
        version="1",
        description="Releases model data keys and the shared service identity only to attested workers.",
        responses=openapi_error_responses(),
    )

    @app.exception_handler(VeilError)
    async def _veil_error(request: Request, exc: VeilError) -> JSONResponse:
        status = (
            429
            if isinstance(exc, KMSBusy)
            else 403
            if isinstance(exc, KMSRefused)
            else 404
            if isinstance(exc, UnknownKey)
            else (409 if isinstance(exc, KMSError) else 400)
        )
        return JSONResponse({"error": str(exc), "kind": type(exc).__name__}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # hardening (issue 9): framework errors (e.g. an unparsable JSON body -> 400) use the
        # declared error schema {"error", "kind"} instead of FastAPI's {"detail"}
        return JSONResponse(
            {"error": str(exc.detail), "kind": "HTTPException"}, status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def peer(request: Request) -> str:
        return request.client.host if request.client else ""

    def admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        service.check_admin(token, peer(request))

    Admin = Depends(admin)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "tee": "simulated" if service.enclave.simulated else service.enclave.backend}

    @app.post("/v1/keys", dependencies=[Admin])
    def import_key(body: ImportKeyRequest) -> KeyInfo:
        info = service.store.add_key(body.model, body.key_id, bytes.fromhex(body.key), body.signer)
        service.store.audit(
            event="register", outcome="ok", key_ids=[body.key_id], reason=f"{body.model} v{info.version}"
        )
        return info

    @app.post("/v1/models/{model}/keys", dependencies=[Admin])
    def new_key(model: str, body: CreateKeyRequest) -> NewKeyResponse:
        """Create a new data-key version for ``model`` (rotation); the key is returned once, for packaging."""
        try:  # validates the name (hardening: an invalid name was a pydantic error -> 500)
            ImportKeyRequest(model=model, key_id="0" * 32, key="0" * 64, signer=body.signer)
        except ValidationError:
            raise InputError(f"invalid model name {model[:80]!r}") from None
        info, key = service.store.new_key(model, body.signer)
        service.store.audit(
            event="rotate", outcome="ok", key_ids=[info.key_id], reason=f"{model} v{info.version}"
        )
        return NewKeyResponse(**info.model_dump(), key=key.hex())

    @app.get("/v1/models/{model}/keys", dependencies=[Admin])
    def list_keys(model: str) -> list[KeyInfo]:
        return service.store.list_keys(model)

    @app.post("/v1/keys/{key_id}/retire", dependencies=[Admin])
    def retire(key_id: str) -> KeyInfo:
        info = service.store.retire(key_id)
        service.store.audit(
            event="retire", outcome="ok", key_ids=[key_id], reason=f"{info.model} v{info.version}"
        )
        return info

    @app.get("/v1/audit", dependencies=[Admin])
    def audit(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        outcome: Annotated[str | None, Query(pattern=r"^(released|refused|ok)$")] = None,
        since_id: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # hardening: SQLite INTEGER range
    ) -> list[AuditEntry]:
        return service.store.audit_log(limit=limit, outcome=outcome, since_id=since_id)

    @app.post("/v1/attest/challenge")
    def challenge(request: Request) -> ChallengeResponse:
        return service.challenge(peer(request))

    @app.post("/v1/attest/release")
    def release(body: ReleaseRequest, request: Request) -> ReleaseResponse:
        return service.release(body, peer(request))

    @app.get("/v1/service")
    def service_info() -> ServiceInfo:
        return service.service_info()

    _ = InputError
    app.add_middleware(BodyLimit, max_body=service.config.max_body_bytes)
    return app
