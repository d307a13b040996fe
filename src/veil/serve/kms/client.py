"""HTTP client of the KMS: admin calls (register, rotate, retire, audit) and the worker's attestation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx

from veil.comm import codec
from veil.errors import KMSError
from veil.serve.kms.app import RELEASE_AAD
from veil.serve.kms.wire import AuditEntry, KeyInfo, KeyRelease, NewKeyResponse, ReleaseResponse, b64d, b64e
from veil.tee import Enclave, EnclaveKeyExchange

__all__ = ["KMSClient"]

log = logging.getLogger("veil.serve.kms")


class KMSClient:
    def __init__(
        self, url: str, *, admin_token: str | None = None, ca: Path | None = None, timeout: float = 30.0
    ) -> None:
        self.url = url.rstrip("/")
        self.admin_token = admin_token
        verify: Any = str(ca) if ca else True
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KMSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, admin: bool = False, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if admin and self.admin_token else {}
        try:
            r = self._http.request(method, path, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise KMSError(f"KMS at {self.url} unreachable: {exc}") from None
        if r.status_code != 200:
            try:
                detail = r.json().get("error") or r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            raise KMSError(f"KMS {method} {path} -> {r.status_code}: {detail}")
        return r.json()

    # ------------------------------------------------------------------ admin
    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", "/v1/health")
        return out

    def import_key(self, model: str, key_id: str, key: bytes, signer: str) -> KeyInfo:
        body = {"model": model, "key_id": key_id, "key": key.hex(), "signer": signer}
        return KeyInfo.model_validate(self._call("POST", "/v1/keys", admin=True, json=body))

    def new_key(self, model: str, signer: str) -> tuple[KeyInfo, bytes]:
        r = NewKeyResponse.model_validate(
            self._call("POST", f"/v1/models/{model}/keys", admin=True, json={"signer": signer})
        )
        return KeyInfo.model_validate(r.model_dump(exclude={"key"})), bytes.fromhex(r.key)

    def list_keys(self, model: str) -> list[KeyInfo]:
        return [KeyInfo.model_validate(k) for k in self._call("GET", f"/v1/models/{model}/keys", admin=True)]

    def retire(self, key_id: str) -> KeyInfo:
        return KeyInfo.model_validate(self._call("POST", f"/v1/keys/{key_id}/retire", admin=True))

    def audit(self, *, limit: int = 100, outcome: str | None = None) -> list[AuditEntry]:
        params: dict[str, Any] = {"limit": limit}
        if outcome:
            params["outcome"] = outcome
        return [
            AuditEntry.model_validate(a) for a in self._call("GET", "/v1/audit", admin=True, params=params)
        ]

    def service(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", "/v1/service")
        return out

    # ------------------------------------------------------------------ worker side
    def attest_and_release(self, enclave: Enclave, key_ids: list[str], *, worker_id: str = "") -> KeyRelease:
        """Run the challenge / attested key exchange / release flow from inside ``enclave``."""
        nonce = bytes.fromhex(self._call("POST", "/v1/attest/challenge")["nonce"])
        kx = EnclaveKeyExchange(enclave)
        offer = kx.offer(nonce)
        body = {
            "nonce": nonce.hex(),
            "offer": b64e(codec.encode(offer)),
            "key_ids": key_ids,
            "worker_id": worker_id,
        }
        resp = ReleaseResponse.model_validate(self._call("POST", "/v1/attest/release", json=body))
        session = kx.finish(bytes.fromhex(resp.kms_public))
        release = codec.decode(session.decrypt(b64d(resp.bundle, "bundle"), aad=RELEASE_AAD), KeyRelease)
        got = {k.key_id for k in release.keys}
        if got != set(key_ids):
            raise KMSError(f"KMS released keys {sorted(got)} but {sorted(key_ids)} were requested")
        log.info(
            "attested to the KMS (%s); received %d key(s) and the service identity",
            resp.tee,
            len(release.keys),
        )
        return release
