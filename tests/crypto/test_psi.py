"""ECDH PSI: correctness, same order on both sides, nothing non-shared in the clear, errors."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from veil.comm import Channel
from veil.crypto.psi import hash_to_group, psi_intersect
from veil.errors import InputError
from veil.testing import run_parties


class Recorder:
    """Wraps a channel and keeps every message it receives."""

    def __init__(self, inner: Channel) -> None:
        self.inner = inner
        self.received: list[Any] = []
        self.stats = inner.stats
        self.default_timeout = getattr(inner, "default_timeout", 60)

    def send(self, msg: Any) -> None:
        self.inner.send(msg)

    def recv(self, t: Any, timeout: float | None = None) -> Any:
        m = self.inner.recv(t, timeout=timeout)
        self.received.append(m)
        return m

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)

    def close(self) -> None:
        self.inner.close()


def _party(ids: list[str], role: str) -> Any:
    def f(ch: Channel) -> tuple[list[int], bytes]:
        rec = Recorder(ch)
        out = psi_intersect(rec, ids, role)  # type: ignore[arg-type]
        wire = b"".join(m.points.tobytes() for m in rec.received)
        return out, wire

    return f


def test_psi_intersection_aligned_and_hidden() -> None:
    rng = np.random.default_rng(5)
    common = [f"user-{i}" for i in rng.choice(10_000, 60, replace=False)]
    only_a = [f"a-only-{i}" for i in range(40)]
    only_b = [f"b-only-{i}" for i in range(25)]
    ids_a = common + only_a
    ids_b = only_b + common
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    (pos_a, wire_a), (pos_b, wire_b) = run_parties(_party(ids_a, "active"), _party(ids_b, "passive"))
    assert [ids_a[i] for i in pos_a] == [ids_b[i] for i in pos_b]
    assert sorted(ids_a[i] for i in pos_a) == sorted(common)
    for secret in only_b:
        raw = secret.encode()
        assert raw not in wire_a
        assert hashlib.sha256(raw).digest() not in wire_a
        assert hash_to_group(secret) not in wire_a
    for secret in only_a:
        assert secret.encode() not in wire_b
        assert hash_to_group(secret) not in wire_b


def test_psi_empty_intersection_fails_on_both_sides() -> None:
    errors = []

    def wrap(ids: list[str], role: str) -> Any:
        def f(ch: Channel) -> None:
            try:
                psi_intersect(ch, ids, role)
            except InputError as exc:
                errors.append(str(exc))
                raise

        return f

    with pytest.raises(InputError, match="no id in common"):
        run_parties(wrap(["a", "b"], "active"), wrap(["c"], "passive"))
    assert len(errors) == 2


def test_psi_rejects_duplicates_and_bad_role() -> None:
    with pytest.raises(InputError, match="duplicate"):
        psi_intersect(None, ["x", "x"], "active")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="role"):
        psi_intersect(None, ["x"], "leader")  # type: ignore[arg-type]


def test_hash_to_group_deterministic_and_distinct() -> None:
    assert hash_to_group("alice") == hash_to_group("alice")
    assert hash_to_group("alice") != hash_to_group("bob")
    assert len(hash_to_group("")) == 32


@pytest.mark.slow
def test_psi_threaded_path_large_sets() -> None:
    ids_a = [f"row-{i}" for i in range(4200)]
    ids_b = [f"row-{i}" for i in range(2100, 6300)]
    pos_a, pos_b = run_parties(
        lambda ch: psi_intersect(ch, ids_a, "active"), lambda ch: psi_intersect(ch, ids_b, "passive"),
        timeout=600,
    )
    assert [ids_a[i] for i in pos_a] == [ids_b[i] for i in pos_b]
    assert sorted(ids_a[i] for i in pos_a) == sorted(f"row-{i}" for i in range(2100, 4200))
