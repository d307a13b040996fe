"""Two OS processes over GrpcChannel (TLS) with a trusted-dealer process; model files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from tests.boost.helpers import grpc_party

from veil.boost.model import PartyModel, load_model, save_model
from veil.boost.params import BoostParams
from veil.boost.predict import plain_predict_values, reconstruct_plain
from veil.errors import IntegrityError
from veil.testing import run_parties


@pytest.mark.slow
def test_two_processes_over_tls_with_dealer(cancer, tmp_path):
    from veil.comm import PartyIdentity
    from veil.comm.grpc_channel import GrpcListener
    from veil.crypto.triples import run_dealer

    xtr, xte, ytr, _ = cancer
    xtr, ytr, xte = xtr[:200], ytr[:200], xte[:40]
    dealer_id = PartyIdentity.create("dealer", tmp_path / "dealer")
    a_id = PartyIdentity.create("alice-d", tmp_path / "a")
    b_id = PartyIdentity.create("bob-d", tmp_path / "b")
    for ident in (a_id, b_id):
        dealer_id.trust(ident.cert_pem)
        ident.trust(dealer_id.cert_pem)
    la = GrpcListener("127.0.0.1:0", dealer_id, a_id.fingerprint, timeout=120)
    lb = GrpcListener("127.0.0.1:0", dealer_id, b_id.fingerprint, timeout=120)
    served: list[int] = []

    def dealer() -> None:
        ca, cb = la.accept(120), lb.accept(120)
        served.append(run_dealer(ca, cb, timeout=120))

    th = threading.Thread(target=dealer, daemon=True)
    th.start()
    params = BoostParams(n_estimators=2, max_depth=2, max_bin=8)
    ra, rb = run_parties(
        grpc_party,
        grpc_party,
        transport="grpc",
        timeout=300,
        args_a=(
            "active",
            xtr[:, :15],
            ytr,
            params,
            f"127.0.0.1:{la.port}",
            dealer_id.fingerprint,
            str(tmp_path / "a"),
            xte[:, :15],
        ),
        args_b=(
            "passive",
            xtr[:, 15:],
            None,
            params,
            f"127.0.0.1:{lb.port}",
            dealer_id.fingerprint,
            str(tmp_path / "b"),
            xte[:, 15:],
        ),
    )
    th.join(30)
    assert served and served[0] > 0
    assert rb["margin"] is None
    ma = PartyModel.from_json_obj(ra["json"])
    mb = PartyModel.from_json_obj(rb["json"])
    plain = reconstruct_plain(ma, mb)
    ref = plain_predict_values(plain, [xte[:, :15], xte[:, 15:]])
    assert np.max(np.abs(np.array(ra["margin"]) - ref)) < 1e-6
    assert ra["bytes"] > 0 and rb["bytes"] > 0


def _tiny_model() -> PartyModel:
    from veil.boost.binning import QuantileBinner
    from veil.boost.model import PartyTree
    from veil.boost.tree import SplitInfo

    b = QuantileBinner(4).fit(np.arange(20, dtype=float).reshape(10, 2))
    tree = PartyTree({0: SplitInfo(1, 2, False, 7.0)}, np.array([1, 2**64 - 1, 3, 4], dtype=np.uint64))
    return PartyModel("active", 0, b"\x01" * 16, "binary:logistic", 2, 4, 20, 5, ["a", "b"], b, [tree])


def test_model_roundtrip_and_integrity(tmp_path):
    m = _tiny_model()
    p = save_model(m, tmp_path / "m.json")
    back = load_model(p)
    assert back.to_json_obj() == m.to_json_obj()
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind
    doc = json.loads(p.read_text())
    doc["body"]["trees"][0]["leaf_shares"][0] += 1  # tamper with one share
    p.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError):
        load_model(p)


def test_model_hmac_key(tmp_path):
    m = _tiny_model()
    p = save_model(m, tmp_path / "m.json", key=b"k1")
    assert load_model(p, key=b"k1").model_id == m.model_id
    with pytest.raises(IntegrityError):
        load_model(p, key=b"other")
    with pytest.raises(IntegrityError):
        load_model(p)  # HMAC-protected file needs the key


def test_model_bad_files(tmp_path):
    with pytest.raises(IntegrityError):
        load_model(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(IntegrityError):
        load_model(tmp_path / "junk.json")
    m = _tiny_model()
    p = save_model(m, tmp_path / "m.json")
    doc = json.loads(p.read_text())
    doc["body"]["version"] = 99
    from veil.boost.model import _tag

    doc["integrity"] = _tag(doc["body"], None)
    Path(p).write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="version"):
        load_model(p)
