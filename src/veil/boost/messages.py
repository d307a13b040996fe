"""Wire messages of the secure XGBoost protocol (one frozen msgspec struct per message).

Every message carries the ``stage`` it belongs to; the receiver checks it against the stage it
is in (:func:`expect_stage`) so a message from another step of the protocol is refused with a
:class:`~veil.boost.errors.BoostProtocolError` instead of being misread.
"""

from __future__ import annotations

import numpy as np

from veil.boost.errors import BoostProtocolError
from veil.comm import Message

__all__ = [
    "BOOST_PROTOCOL_VERSION",
    "CiphertextBatch",
    "EarlyStop",
    "Hello",
    "HelloAck",
    "Opening",
    "PredictHello",
    "Reveal",
    "RowSample",
    "SharedInput",
    "TreeDone",
    "expect_stage",
]

BOOST_PROTOCOL_VERSION = 1


class Hello(Message, frozen=True, tag="boost.hello"):
    """First message of training: who I am and what I want to train (must match the peer's)."""

    version: int
    role: str
    n_rows: int
    n_features: int
    params: dict[str, str]
    triples: str
    frac_bits: int
    model_id: bytes
    has_missing: bool


class HelloAck(Message, frozen=True, tag="boost.hello_ack"):
    """Answer to :class:`Hello`: accepted (the peer's own view), or a reason for refusing."""

    ok: bool
    reason: str
    role: str
    n_rows: int
    n_features: int


class Opening(Message, frozen=True, tag="boost.open"):
    """Masked shares opened in a Beaver product (``x - a`` etc.): uniform to the receiver."""

    stage: str
    values: list[np.ndarray]


class SharedInput(Message, frozen=True, tag="boost.share"):
    """The peer's additive share of a value this party inputs (uniform random to the receiver)."""

    stage: str
    values: np.ndarray


class Reveal(Message, frozen=True, tag="boost.reveal"):
    """A share sent so that the receiver learns the value (split owner, prediction output)."""

    stage: str
    values: np.ndarray


class CiphertextBatch(Message, frozen=True, tag="boost.ct"):
    """Serialized HE ciphertexts (under the receiver's or the sender's public key)."""

    stage: str
    data: bytes
    count: int


class RowSample(Message, frozen=True, tag="boost.sample"):
    """Nothing about the sample itself: only that tree ``tree`` starts (sizes are public)."""

    tree: int


class TreeDone(Message, frozen=True, tag="boost.tree_done"):
    """End of a tree; both parties compare counters so a desynchronised run fails loudly."""

    tree: int
    requests: int


class EarlyStop(Message, frozen=True, tag="boost.early_stop"):
    """Active party's decision after a validation round: stop, and how many trees to keep."""

    stop: bool
    keep_trees: int


class PredictHello(Message, frozen=True, tag="boost.predict_hello"):
    """First message of secure prediction: which model (by id) and how many rows."""

    version: int
    role: str
    model_id: bytes
    n_rows: int
    n_trees: int
    depth: int


def expect_stage(got: str, want: str) -> None:
    """Raise if a message belongs to another stage of the protocol."""
    if got != want:
        raise BoostProtocolError(f"out-of-order message: expected stage {want!r}, got {got!r}")
