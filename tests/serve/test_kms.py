"""KMS: key release only to attested workers, refusals audited, sealed state survives restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from veil.comm import codec
from veil.crypto.random import random_bytes
from veil.errors import DecryptionError
from veil.serve.kms.app import RELEASE_AAD, KMSConfig, KMSService, create_app
from veil.serve.kms.wire import KeyRelease, b64d, b64e
from veil.tee import EnclaveKeyExchange, Policy, SimulatedEnclave, platform_public_key

TOKEN = "t" * 32
WORKER_CODE = [b"veil-serve-worker test code"]


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def _worker(code: list[bytes] = WORKER_CODE, debug: bool = False) -> SimulatedEnclave:
    return SimulatedEnclave(code=list(code), config={"component": "veil-serve-worker"}, debug=debug)


def _policy(**kw: object) -> Policy:
    base: dict[str, object] = dict(
        allowed_measurements={_worker().measurement},
        allow_simulated=True,
        simulated_platform_keys={platform_public_key().hex()},
    )
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


def _kms(
    tmp_path: Path, policy: Policy | None = None, clock: Clock | None = None
) -> tuple[KMSService, TestClient]:
    cfg = KMSConfig(state_dir=tmp_path / "kms", admin_token=TOKEN, policy=policy or _policy())
    svc = KMSService(cfg, clock=clock or Clock())
    return svc, TestClient(create_app(svc))


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _register(client: TestClient, model: str = "m") -> tuple[str, bytes]:
    key = random_bytes(32)
    kid = random_bytes(16).hex()
    r = client.post(
        "/v1/keys", json={"model": model, "key_id": kid, "key": key.hex(), "signer": "ab" * 32}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    return kid, key


def _attest(
    client: TestClient,
    enclave: SimulatedEnclave,
    key_ids: list[str],
    *,
    nonce: str | None = None,
    offer_b64: str | None = None,
) -> tuple[int, dict[str, object], EnclaveKeyExchange, str, str]:
    n = nonce or client.post("/v1/attest/challenge").json()["nonce"]
    kx = EnclaveKeyExchange(enclave)
    ob = offer_b64 or b64e(codec.encode(kx.offer(bytes.fromhex(n))))
    r = client.post(
        "/v1/attest/release", json={"nonce": n, "offer": ob, "key_ids": key_ids, "worker_id": "w1"}
    )
    return r.status_code, r.json(), kx, n, ob


def _refusals(client: TestClient) -> list[dict[str, object]]:
    out: list[dict[str, object]] = client.get("/v1/audit?outcome=refused", headers=ADMIN).json()
    return out


def test_attested_worker_gets_keys_and_identity(tmp_path: Path) -> None:
    svc, client = _kms(tmp_path)
    kid, key = _register(client)
    status, body, kx, _, _ = _attest(client, _worker(), [kid])
    assert status == 200, body
    assert body["tee"] == "simulated"
    session = kx.finish(bytes.fromhex(str(body["kms_public"])))
    rel = codec.decode(session.decrypt(b64d(str(body["bundle"])), aad=RELEASE_AAD), KeyRelease)
    assert rel.keys[0].key == key and rel.keys[0].version == 1
    assert rel.identity.x25519_public == svc.store.identity.x25519_public
    assert client.get("/v1/audit?outcome=released", headers=ADMIN).json()[0]["key_ids"] == [kid]


def test_bundle_is_bound_to_the_attested_key(tmp_path: Path) -> None:
    _, client = _kms(tmp_path)
    kid, _ = _register(client)
    status, body, _, _, _ = _attest(client, _worker(), [kid])
    assert status == 200
    other = EnclaveKeyExchange(_worker())
    other.offer(random_bytes(32))
    with pytest.raises(DecryptionError):
        other.finish(bytes.fromhex(str(body["kms_public"]))).decrypt(
            b64d(str(body["bundle"])), aad=RELEASE_AAD
        )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong-measurement", "measurement"),
        ("production-policy", "simulated"),
        ("debug", "debug"),
    ],
)
def test_refused_enclaves_get_nothing_and_are_audited(tmp_path: Path, case: str, reason: str) -> None:
    policy = _policy(allow_simulated=False) if case == "production-policy" else _policy()
    _, client = _kms(tmp_path, policy)
    kid, _ = _register(client)
    enclave = _worker([b"evil worker"]) if case == "wrong-measurement" else _worker(debug=case == "debug")
    status, body, _, _, _ = _attest(client, enclave, [kid])
    assert status == 403
    assert "bundle" not in body and reason in str(body["error"])
    audit = _refusals(client)
    assert audit[0]["event"] == "release" and reason in str(audit[0]["reason"])


def test_replayed_evidence_refused(tmp_path: Path) -> None:
    _, client = _kms(tmp_path)
    kid, _ = _register(client)
    status, _, _, nonce, offer = _attest(client, _worker(), [kid])
    assert status == 200
    status2, body2, _, _, _ = _attest(client, _worker(), [kid], nonce=nonce, offer_b64=offer)
    assert status2 == 403 and "bundle" not in body2
    assert "already used nonce" in str(_refusals(client)[0]["reason"])


def test_stale_nonce_refused(tmp_path: Path) -> None:
    clock = Clock()
    _, client = _kms(tmp_path, clock=clock)
    kid, _ = _register(client)
    n = client.post("/v1/attest/challenge").json()["nonce"]
    clock.t += 31
    status, body, _, _, _ = _attest(client, _worker(), [kid], nonce=n)
    assert status == 403 and "bundle" not in body
    assert "stale nonce" in str(_refusals(client)[0]["reason"])


def test_unknown_nonce_refused(tmp_path: Path) -> None:
    _, client = _kms(tmp_path)
    kid, _ = _register(client)
    status, _, _, _, _ = _attest(client, _worker(), [kid], nonce=random_bytes(32).hex())
    assert status == 403


def test_admin_token_required(tmp_path: Path) -> None:
    _, client = _kms(tmp_path)
    body = {"model": "m", "key_id": "ab" * 16, "key": "cd" * 32, "signer": "ef" * 32}
    assert client.post("/v1/keys", json=body).status_code == 403
    assert (
        client.post("/v1/keys", json=body, headers={"Authorization": "Bearer " + "x" * 32}).status_code == 403
    )
    assert client.get("/v1/audit").status_code == 403
    assert client.post("/v1/keys", json=body, headers=ADMIN).status_code == 200
    refused = _refusals(client)
    assert [a["event"] for a in refused] == ["admin", "admin", "admin"]


def test_input_validation(tmp_path: Path) -> None:
    _, client = _kms(tmp_path)
    bad = {"model": "../etc", "key_id": "zz", "key": "cd", "signer": "ef"}
    assert client.post("/v1/keys", json=bad, headers=ADMIN).status_code == 422
    r = client.post("/v1/attest/release", json={"nonce": "ab" * 16, "offer": "!!notb64", "key_ids": []})
    assert r.status_code == 403 and "malformed offer" in r.json()["error"]
    assert "/v1/attest/release" in client.get("/openapi.json").json()["paths"]


def test_rotation_and_retirement(tmp_path: Path) -> None:
    _, client = _kms(tmp_path)
    kid1, _ = _register(client)
    r = client.post("/v1/models/m/keys", json={"signer": "ab" * 32}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == 2
    kid2 = r.json()["key_id"]
    assert _attest(client, _worker(), [kid1, kid2])[0] == 200  # old version still decrypts
    assert client.post(f"/v1/keys/{kid1}/retire", headers=ADMIN).json()["retired"] is True
    assert _attest(client, _worker(), [kid1])[0] == 403
    assert _attest(client, _worker(), [kid2])[0] == 200
    assert "retired" in str(_refusals(client)[0]["reason"])


def test_state_survives_restart_sealed(tmp_path: Path) -> None:
    svc, client = _kms(tmp_path)
    kid, key = _register(client)
    ident = svc.store.identity
    svc.store.close()
    raw = (tmp_path / "kms" / "kms.sqlite3").read_bytes()
    assert key not in raw and ident.x25519_private not in raw  # sealed at rest
    svc2, client2 = _kms(tmp_path)
    assert svc2.store.identity == ident
    status, body, kx, _, _ = _attest(client2, _worker(), [kid])
    assert status == 200
    rel = codec.decode(
        kx.finish(bytes.fromhex(str(body["kms_public"]))).decrypt(b64d(str(body["bundle"])), aad=RELEASE_AAD),
        KeyRelease,
    )
    assert rel.keys[0].key == key
