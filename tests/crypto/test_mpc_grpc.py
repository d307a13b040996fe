"""MPC as two OS processes over mutual-TLS gRPC, with dealer-free (homomorphic) triples."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from veil.comm import Channel
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC
from veil.crypto.sharing import AShare, share_floats
from veil.crypto.triples_he import HomomorphicTriples
from veil.testing import run_parties

FXP = FixedPoint(20)


def party(ch: Channel, p: int, xs: np.ndarray, ys: np.ndarray) -> dict[str, Any]:
    src = HomomorphicTriples(ch, p, scheme="ou", key_bits=1024, timeout=120)
    mpc = MPC(ch, p, src, FXP, timeout=120)
    x, y = AShare(xs, p, 20), AShare(ys, p, 20)
    prod = mpc.mul(x, y)
    bit = mpc.ltz(x)
    oh, mx = mpc.argmax(x)
    return {
        "mul": mpc.reveal_float(prod),
        "ltz": mpc.reveal(bit),
        "argmax": mpc.reveal(oh),
        "max": mpc.reveal_float(mx),
        "rounds": ch.stats.rounds,
    }


@pytest.mark.slow
def test_mpc_over_grpc_two_processes() -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(-100, 100, 5)
    y = rng.uniform(-100, 100, 5)
    x0, x1 = share_floats(x, FXP)
    y0, y1 = share_floats(y, FXP)
    r0, r1 = run_parties(
        party, party, transport="grpc", timeout=300,
        args_a=(0, x0.values, y0.values), args_b=(1, x1.values, y1.values),
    )
    np.testing.assert_allclose(r0["mul"], x * y, atol=1e-3)
    np.testing.assert_array_equal(r0["ltz"], (x < 0).astype(np.uint64))
    np.testing.assert_array_equal(r0["argmax"], np.eye(5, dtype=np.uint64)[np.argmax(x)])
    np.testing.assert_allclose(r1["max"], x.max(), atol=1e-5)
    assert r0["rounds"] > 10
