"""Top-level party functions for the boost tests (importable for the gRPC process test)."""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.boost.params import BoostParams
from veil.boost.predict import secure_predict_margin
from veil.boost.train import secure_train
from veil.comm import Message


class Recorder:
    """Channel proxy that keeps every message this party receives (for the leakage test)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.default_timeout = inner.default_timeout
        self.received: list[Message] = []

    def send(self, msg: Message) -> None:
        self.inner.send(msg)

    def recv(self, msg_type: Any, timeout: float | None = None) -> Any:
        m = self.inner.recv(msg_type, timeout=timeout)
        self.received.append(m)
        return m

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)

    def close(self) -> None:
        self.inner.close()


def party(
    ch: Any,
    role: str,
    x: np.ndarray,
    y: np.ndarray | None,
    params: BoostParams,
    src: Any,
    x_test: np.ndarray | None = None,
    record: bool = False,
) -> tuple[Any, Any, list[Message]]:
    rec = Recorder(ch) if record else ch
    res = secure_train(rec, role, x, y, params, src)
    received = list(rec.received) if record else []
    margin = secure_predict_margin(ch, res.model, x_test, src) if x_test is not None else None
    return res, margin, received


def grpc_party(
    ch: Any,
    role: str,
    x: np.ndarray,
    y: np.ndarray | None,
    params: BoostParams,
    dealer_addr: str,
    dealer_fp: str,
    ident_dir: str,
    x_test: np.ndarray,
) -> dict[str, Any]:
    """One party in its own OS process: TLS channel to the peer + TLS channel to the dealer."""
    from veil.comm import GrpcChannel, PartyIdentity
    from veil.crypto.triples import TrustedDealer

    dch = GrpcChannel.connect(dealer_addr, PartyIdentity.load(ident_dir), dealer_fp, timeout=60)
    src = TrustedDealer(dch, 0 if role == "active" else 1, timeout=60)
    res = secure_train(ch, role, x, y, params, src)
    margin = secure_predict_margin(ch, res.model, x_test, src)
    src.close()
    model = res.model
    return {
        "leaf_shares": [t.leaf_shares.tolist() for t in model.trees],
        "json": model.to_json_obj(),
        "margin": None if margin is None else margin.tolist(),
        "bytes": res.bytes_sent,
    }
