"""What a party receives during MPC is indistinguishable from uniform, whatever the inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats

from veil.comm import Channel
from veil.crypto import he
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC, MpcOpen
from veil.crypto.sharing import AShare, share_floats
from veil.crypto.triples import LocalDealer
from veil.crypto.triples_he import HomomorphicTriples
from veil.crypto.triples_ot import OtMsg
from veil.testing import run_parties

FXP = FixedPoint(20)
KP = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)


class Recorder:
    def __init__(self, inner: Channel) -> None:
        self.inner = inner
        self.received: list[Any] = []
        self.stats = inner.stats

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


def _transcript(x: np.ndarray, y: np.ndarray, dealer_free: bool) -> tuple[np.ndarray, np.ndarray]:
    """Run mul, ltz, argmax, sigmoid (no reveal); return what party 1 received (u64 and bit bytes)
    in MPC openings and, dealer-free, in the OT-extension messages after the base OTs."""
    x0, x1 = share_floats(x, FXP)
    y0, y1 = share_floats(y, FXP)
    s0, s1 = LocalDealer.pair() if not dealer_free else (None, None)

    def role(p: int, src: Any, xs: AShare, ys: AShare) -> Any:
        def f(ch: Channel) -> tuple[np.ndarray, np.ndarray]:
            rec = Recorder(ch)
            source = src if src is not None else HomomorphicTriples(rec, p, keypair=KP if p == 0 else None)
            mpc = MPC(rec, p, source, FXP, timeout=60)  # type: ignore[arg-type]
            mpc.mul(xs, ys)
            mpc.ltz(xs)
            mpc.argmax(xs)
            mpc.sigmoid(ys)
            msgs = [m for m in rec.received if isinstance(m, MpcOpen)]
            msgs += [m for m in rec.received if isinstance(m, OtMsg) and m.seq >= 2]  # after base OTs
            words = [a.ravel() for m in msgs for a in m.arrays if a.dtype == np.uint64]
            bits = [a.ravel() for m in msgs for a in m.arrays if a.dtype == np.uint8]
            return np.concatenate(words), np.concatenate(bits)

        return f

    _, r1 = run_parties(role(0, s0, x0, y0), role(1, s1, x1, y1), timeout=300)
    return r1


@pytest.mark.parametrize("dealer_free", [False, True])
def test_received_values_look_uniform_and_do_not_depend_on_inputs(dealer_free: bool) -> None:
    n = 256
    rng = np.random.default_rng(0)
    w_a, b_a = _transcript(np.zeros(n), np.zeros(n), dealer_free)  # all-zero inputs
    w_b, b_b = _transcript(rng.uniform(-1e5, 1e5, n), np.full(n, 7.5), dealer_free)
    assert w_a.size == w_b.size and b_a.size == b_b.size
    fa = w_a.astype(np.float64) / 2.0**64
    fb = w_b.astype(np.float64) / 2.0**64
    assert stats.kstest(fa, "uniform").pvalue > 1e-4
    assert stats.kstest(fb, "uniform").pvalue > 1e-4
    assert stats.ks_2samp(fa, fb).pvalue > 1e-4
    # bit-level openings: every bit position ~ Bernoulli(1/2), in both runs
    for bb in (b_a, b_b):
        ones = np.unpackbits(bb).mean()
        assert abs(ones - 0.5) < 0.01
        assert stats.chisquare(np.bincount(bb, minlength=256)).pvalue > 1e-4
