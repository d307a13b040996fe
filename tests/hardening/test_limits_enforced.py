"""The shared limits are enforced where the engines read them, with clear errors."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from veil.comm import MemoryChannel, Message
from veil.errors import ResourceLimitError, VeilError
from veil.limits import get_limits, reset_limits


class Blob(Message, frozen=True, tag="hardening.blob"):
    data: bytes


@pytest.fixture(autouse=True)
def _fresh() -> Any:
    reset_limits()
    yield
    reset_limits()


def test_channel_message_size_limit_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LIMIT_MAX_MESSAGE_BYTES", "4096")
    a, b = MemoryChannel.pair(timeout=2)
    a.send(Blob(data=b"x" * 1000))
    assert b.recv(Blob).data == b"x" * 1000
    with pytest.raises(ResourceLimitError, match="above the limit of 4096 bytes"):
        a.send(Blob(data=b"x" * 5000))
    # an explicit per-channel limit still wins
    a, b = MemoryChannel.pair(timeout=2, max_message_bytes=1 << 20)
    a.send(Blob(data=b"x" * 5000))
    assert len(b.recv(Blob).data) == 5000


def test_legacy_setting_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_MAX_MESSAGE_BYTES", "8192")
    assert get_limits().max_message_bytes == 8192
    monkeypatch.setenv("VEIL_LIMIT_MAX_MESSAGE_BYTES", "2048")
    reset_limits()
    assert get_limits().max_message_bytes == 2048


@pytest.mark.parametrize(("env", "value", "match"), [
    ("VEIL_LIMIT_MAX_SEQUENCE_LENGTH", "4", "MAX_SEQUENCE_LENGTH"),
    ("VEIL_LIMIT_MAX_BATCH_SIZE", "1", "MAX_BATCH_SIZE"),
])
def test_tune_enclave_enforces_sequence_and_batch_limits(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, match: str
) -> None:
    parties = pytest.importorskip("tune.parties")
    from veil.tune.messages import TrainBatch

    tee = parties.make_enclave("llama", 1)
    b, t, h = 2, 8, tee.hidden_size
    req = TrainBatch(step=0, micro=0, n_micro=1, hidden=np.zeros((b, t, h), np.float32),
                     attention_mask=np.ones((b, t), np.int64), position_ids=np.tile(np.arange(t), (b, 1)),
                     labels=np.full((b, t), 5, np.int64))
    tee._train(req)  # within the defaults: accepted (one optimizer step)
    monkeypatch.setenv(env, value)
    reset_limits()
    with pytest.raises(ResourceLimitError, match=match):
        tee._train(msgspec.structs.replace(req, step=1))
    assert tee.step == 1  # the refused batch changed nothing


def test_limit_errors_are_veil_errors_with_exit_codes() -> None:
    assert issubclass(ResourceLimitError, VeilError)
    assert ResourceLimitError.exit_code != 0


def test_boost_refuses_peer_above_shared_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.boost.errors import BoostConfigError
    from veil.boost.params import BoostParams
    from veil.boost.train import secure_train
    from veil.crypto.triples import LocalDealer
    from veil.testing import run_parties

    monkeypatch.setenv("VEIL_LIMIT_MAX_FEATURES", "3")
    rng = np.random.default_rng(0)
    xa, xp = rng.random((20, 2)), rng.random((20, 4))  # the passive party has 4 feature columns
    y = (xa[:, 0] > 0.5).astype(float)
    s0, s1 = LocalDealer.pair()
    p = BoostParams(n_estimators=1, max_depth=2, max_bin=4)
    with pytest.raises(BoostConfigError, match="VEIL_LIMIT_MAX_FEATURES"):
        run_parties(lambda ch: secure_train(ch, "active", xa, y, p, s0),
                    lambda ch: secure_train(ch, "passive", xp, None, p, s1), timeout=60)


@pytest.mark.parametrize("max_rows", [19, 20])
def test_boost_max_rows_over_and_under(monkeypatch: pytest.MonkeyPatch, max_rows: int) -> None:
    """VEIL_LIMIT_MAX_ROWS: 20 rows against a limit of 19 are refused by the peer with a clear
    BoostConfigError naming the variable; at exactly 20 the same training runs."""
    from veil.boost.errors import BoostConfigError
    from veil.boost.params import BoostParams
    from veil.boost.train import secure_train
    from veil.crypto.triples import LocalDealer
    from veil.testing import run_parties

    monkeypatch.setenv("VEIL_LIMIT_MAX_ROWS", str(max_rows))
    rng = np.random.default_rng(1)
    xa, xp = rng.random((20, 2)), rng.random((20, 2))
    y = (xa[:, 0] + xp[:, 1] > 1.0).astype(float)
    s0, s1 = LocalDealer.pair()
    p = BoostParams(n_estimators=1, max_depth=2, max_bin=4)

    def both() -> Any:
        return run_parties(lambda ch: secure_train(ch, "active", xa, y, p, s0),
                           lambda ch: secure_train(ch, "passive", xp, None, p, s1), timeout=120)

    if max_rows < 20:
        with pytest.raises(BoostConfigError, match=r"20 rows, limit 19 \(VEIL_LIMIT_MAX_ROWS"):
            both()
    else:
        res = both()
        assert len(res) == 2 and all(r.model is not None for r in res)
