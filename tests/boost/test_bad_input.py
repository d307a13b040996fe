"""Bad input and failures: clear VeilError on both sides, no hang, no partial model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from veil.boost.api import SecureXGBClassifier
from veil.boost.errors import BoostConfigError, BoostInputError
from veil.boost.params import BoostParams
from veil.boost.train import secure_train
from veil.crypto.triples import LocalDealer
from veil.errors import ChannelError, PeerError, VeilError
from veil.testing import run_parties

P = BoostParams(n_estimators=2, max_depth=2, max_bin=4)


def _both(fa, fb, timeout=60, raises=VeilError):
    """Run both roles; return the exception each side saw (None if it succeeded). ``raises``: what
    ``run_parties`` must raise (a party's own crash may surface as itself, not a VeilError)."""
    seen: dict[str, BaseException | None] = {"a": None, "b": None}

    def wrap(name, fn):
        def run(ch):
            try:
                return fn(ch)
            except BaseException as exc:
                seen[name] = exc
                raise

        return run

    t0 = time.monotonic()
    with pytest.raises(raises):
        run_parties(wrap("a", fa), wrap("b", fb), timeout=timeout)
    assert time.monotonic() - t0 < timeout
    return seen


def test_row_count_mismatch_refused_on_both_sides():
    x = np.random.default_rng(0).random((30, 2))
    y = (x[:, 0] > 0.5).astype(float)
    s0, s1 = LocalDealer.pair()
    seen = _both(
        lambda ch: secure_train(ch, "active", x, y, P, s0),
        lambda ch: secure_train(ch, "passive", x[:20], None, P, s1),
    )
    assert isinstance(seen["a"], BoostConfigError) and "row counts differ" in str(seen["a"])
    assert isinstance(seen["b"], BoostConfigError)


def test_parameter_mismatch_and_same_role_refused():
    x = np.random.default_rng(0).random((30, 2))
    y = (x[:, 0] > 0.5).astype(float)
    s0, s1 = LocalDealer.pair()
    other = BoostParams(n_estimators=3, max_depth=2, max_bin=4)
    seen = _both(
        lambda ch: secure_train(ch, "active", x, y, P, s0),
        lambda ch: secure_train(ch, "passive", x, None, other, s1),
    )
    assert "n_estimators" in str(seen["a"]) and isinstance(seen["b"], BoostConfigError)
    s0, s1 = LocalDealer.pair()
    seen = _both(
        lambda ch: secure_train(ch, "active", x, y, P, s0), lambda ch: secure_train(ch, "active", x, y, P, s1)
    )
    assert "both parties" in str(seen["a"])


def test_missing_label_and_non_numeric_columns():
    s0, _ = LocalDealer.pair()
    from veil.comm import MemoryChannel

    ch, _peer = MemoryChannel.pair(timeout=5)
    x = np.random.default_rng(0).random((10, 2))
    with pytest.raises(BoostInputError, match="labels"):
        secure_train(ch, "active", x, None, P, s0)
    with pytest.raises(BoostInputError, match="numeric"):
        secure_train(ch, "active", np.array([["a", "b"]] * 10), np.zeros(10), P, s0)
    with pytest.raises(BoostInputError, match="0 or 1"):
        secure_train(ch, "active", x, np.full(10, 2.0), P, s0)
    with pytest.raises(BoostInputError):
        SecureXGBClassifier("passive", ch, triples=s0).fit(x, np.zeros(10))


def test_psi_alignment_and_empty_intersection():
    rng = np.random.default_rng(0)
    xa, xp = rng.random((40, 2)), rng.random((40, 2))
    ids_a = [f"u{i}" for i in range(40)]
    ids_p = [f"u{i}" for i in range(10, 50)]  # 30 shared ids, other order
    ids_p = ids_p[::-1]
    y = (xa[:, 0] > 0.5).astype(float)
    s0, s1 = LocalDealer.pair()

    def a(ch):
        return (
            SecureXGBClassifier("active", ch, triples=s0, n_estimators=1, max_depth=2, max_bin=4)
            .fit(xa, y, ids=ids_a)
            .model_
        )

    def b(ch):
        return (
            SecureXGBClassifier("passive", ch, triples=s1, n_estimators=1, max_depth=2, max_bin=4)
            .fit(xp, ids=ids_p)
            .model_
        )

    ma, mb = run_parties(a, b, timeout=120)
    assert ma.metadata["n_rows"] == mb.metadata["n_rows"] == 30
    s0, s1 = LocalDealer.pair()
    seen = _both(
        lambda ch: SecureXGBClassifier("active", ch, triples=s0).fit(xa, y, ids=ids_a),
        lambda ch: SecureXGBClassifier("passive", ch, triples=s1).fit(xp, ids=[f"z{i}" for i in range(40)]),
    )
    assert isinstance(seen["a"], BoostInputError) and isinstance(seen["b"], BoostInputError)


def test_peer_dies_mid_training_no_hang_no_model(tmp_path, cancer):
    xtr, _, ytr, _ = cancer
    s0, s1 = LocalDealer.pair()
    params = dict(n_estimators=4, max_depth=2, max_bin=4)

    def crash(done, total):
        if done == 1:
            raise RuntimeError("simulated crash of the passive party")

    def a(ch):
        clf = SecureXGBClassifier("active", ch, triples=s0, **params).fit(xtr[:, :15], ytr)
        clf.save_model(tmp_path / "active.json")

    def b(ch):
        clf = SecureXGBClassifier("passive", ch, triples=s1, progress=crash, **params).fit(xtr[:, 15:])
        clf.save_model(tmp_path / "passive.json")

    seen = _both(a, b, raises=(RuntimeError, VeilError))
    assert isinstance(seen.get("a"), (PeerError, ChannelError))
    assert not list(tmp_path.iterdir())  # no model file on either side


def test_peer_unreachable_clear_error(tmp_path):
    from veil.cli.boost import open_channel
    from veil.comm import PartyIdentity

    me = PartyIdentity.create("me", tmp_path / "me")
    other = PartyIdentity.create("other", tmp_path / "other")
    me.trust(other.cert_pem)
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match="could not connect"):
        open_channel("127.0.0.1:1", None, tmp_path / "me", other.fingerprint, timeout=2)
    assert time.monotonic() - t0 < 20


def test_local_input_error_reaches_peer_at_once():
    x = np.random.default_rng(0).random((30, 2))
    s0, s1 = LocalDealer.pair()
    t0 = time.monotonic()
    seen = _both(
        lambda ch: secure_train(ch, "active", x, np.full(30, 2.0), P, s0),
        lambda ch: secure_train(ch, "passive", x, None, P, s1),
        timeout=50,
    )
    assert isinstance(seen["a"], BoostInputError)
    assert isinstance(seen["b"], PeerError) and "0 or 1" in str(seen["b"])
    assert time.monotonic() - t0 < 25  # not the 50 s channel timeout


class _DieOnOneHotSetup:
    """Channel proxy of a party that crashes when it would send its one-hot (GGM) corrections."""

    def __init__(self, inner):
        self.inner = inner
        self.stats = inner.stats
        self.default_timeout = inner.default_timeout

    def send(self, msg):
        from veil.crypto.triples_ot import OtMsg

        if isinstance(msg, OtMsg) and any(a.ndim == 3 and a.shape[1:] == (2, 16) for a in msg.arrays):
            raise RuntimeError("simulated crash during the one-hot set-up")
        self.inner.send(msg)

    def recv(self, msg_type, timeout=None):
        return self.inner.recv(msg_type, timeout=timeout)

    def abort(self, reason):
        self.inner.abort(reason)

    def close(self):
        self.inner.close()


@pytest.mark.slow
def test_peer_dies_during_dealer_free_onehot_setup_no_hang_no_model(tmp_path, cancer):
    """Dealer-free ss-agg: a passive party that dies in the one-hot set-up (after the OT
    extension started) stops the active party with a clear error; neither writes a model."""
    xtr, _, ytr, _ = cancer
    params = dict(n_estimators=2, max_depth=2, max_bin=4, algorithm="ss-agg")

    def a(ch):
        clf = SecureXGBClassifier("active", ch, triples="homomorphic", **params).fit(xtr[:, :15], ytr)
        clf.save_model(tmp_path / "active.json")

    def b(ch):
        clf = SecureXGBClassifier("passive", _DieOnOneHotSetup(ch), triples="homomorphic", **params)
        clf.fit(xtr[:, 15:])
        clf.save_model(tmp_path / "passive.json")

    seen = _both(a, b, raises=(RuntimeError, VeilError))
    assert "one-hot set-up" in str(seen.get("b"))
    assert isinstance(seen.get("a"), (PeerError, ChannelError)), seen.get("a")
    assert not list(tmp_path.iterdir())
