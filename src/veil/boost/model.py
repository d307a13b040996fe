"""Per-party model file: own splits, own share of the leaf weights, versioned and integrity-checked.

Neither file alone says anything about the other party's splits or about the leaf values: the
leaf weights are additive shares over Z_2^64 (each file holds one uniformly random-looking
share). The file is JSON with an integrity tag over its canonical body: HMAC-SHA256 when a key is
given (``VEIL_BOOST_MODEL_KEY`` or ``key=``), SHA-256 otherwise (detects corruption, not a
deliberate edit by someone who can rewrite the file). Writes are atomic: temp file, fsync,
rename, so a crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.atomic import atomic_write_bytes
from veil.boost.binning import QuantileBinner
from veil.boost.tree import SplitInfo
from veil.errors import IntegrityError

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "PartyModel", "PartyTree", "load_model", "save_model"]

MODEL_FORMAT = "veil-boost-party-model"
MODEL_VERSION = 1
KEY_ENV = "VEIL_BOOST_MODEL_KEY"

U64 = npt.NDArray[np.uint64]


@dataclasses.dataclass
class PartyTree:
    """This party's view of one tree: its own splits and its share of the leaf weights."""

    splits: dict[int, SplitInfo]
    leaf_shares: U64


@dataclasses.dataclass
class PartyModel:
    """One party's half of a trained model."""

    role: str
    party: int
    model_id: bytes
    objective: str
    depth: int
    max_bin: int
    frac_bits: int
    base_share: int
    feature_names: list[str]
    binner: QuantileBinner
    trees: list[PartyTree]
    algorithm: str = "ss-agg"
    triples: str = "homomorphic"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "role": self.role,
            "party": self.party,
            "model_id": self.model_id.hex(),
            "objective": self.objective,
            "depth": self.depth,
            "max_bin": self.max_bin,
            "frac_bits": self.frac_bits,
            "base_share": int(self.base_share),
            "feature_names": list(self.feature_names),
            "cuts": self.binner.to_lists(),
            "algorithm": self.algorithm,
            "triples": self.triples,
            "metadata": self.metadata,
            "trees": [
                {
                    "splits": {
                        str(node): {
                            "feature": s.feature,
                            "bin": s.bin,
                            "missing_left": s.missing_left,
                            "threshold": s.threshold,
                        }
                        for node, s in sorted(t.splits.items())
                    },
                    "leaf_shares": [int(v) for v in t.leaf_shares],
                }
                for t in self.trees
            ],
        }

    @classmethod
    def from_json_obj(cls, obj: dict[str, Any]) -> PartyModel:
        try:
            if obj["format"] != MODEL_FORMAT:
                raise IntegrityError(f"not a veil boost model (format {obj['format']!r})")
            if obj["version"] != MODEL_VERSION:
                raise IntegrityError(
                    f"unsupported model version {obj['version']} (this veil reads {MODEL_VERSION})"
                )
            depth = int(obj["depth"])
            trees = []
            for t in obj["trees"]:
                leaves = np.array([int(v) for v in t["leaf_shares"]], dtype=np.uint64)
                if leaves.shape != (2**depth,):
                    raise IntegrityError("leaf share count does not match the tree depth")
                splits = {
                    int(k): SplitInfo(
                        int(v["feature"]), int(v["bin"]), bool(v["missing_left"]), float(v["threshold"])
                    )
                    for k, v in t["splits"].items()
                }
                if any(not 0 <= k < 2**depth - 1 for k in splits):
                    raise IntegrityError("split node index out of range")
                trees.append(PartyTree(splits, leaves))
            return cls(
                role=str(obj["role"]),
                party=int(obj["party"]),
                model_id=bytes.fromhex(obj["model_id"]),
                objective=str(obj["objective"]),
                depth=depth,
                max_bin=int(obj["max_bin"]),
                frac_bits=int(obj["frac_bits"]),
                base_share=int(obj["base_share"]),
                feature_names=[str(x) for x in obj["feature_names"]],
                binner=QuantileBinner.from_lists(int(obj["max_bin"]), obj["cuts"]),
                trees=trees,
                algorithm=str(obj.get("algorithm", "")),
                triples=str(obj.get("triples", "")),
                metadata=dict(obj.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IntegrityError(f"malformed model file: {exc!r}") from None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _key(key: bytes | None) -> bytes | None:
    if key is not None:
        return key
    env = os.environ.get(KEY_ENV)
    return env.encode() if env else None


def _tag(body: dict[str, Any], key: bytes | None) -> dict[str, str]:
    data = _canonical(body)
    if key is not None:
        return {"alg": "hmac-sha256", "digest": hmac.new(key, data, hashlib.sha256).hexdigest()}
    return {"alg": "sha256", "digest": hashlib.sha256(data).hexdigest()}


def save_model(model: PartyModel, path: str | os.PathLike[str], *, key: bytes | None = None) -> Path:
    """Write ``model`` atomically (temp + fsync + rename) with an integrity tag."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = model.to_json_obj()
    doc = {"body": body, "integrity": _tag(body, _key(key))}
    atomic_write_bytes(target, json.dumps(doc, indent=1).encode(), mode=0o600)
    return target


def load_model(path: str | os.PathLike[str], *, key: bytes | None = None) -> PartyModel:
    """Read and verify a model file; :class:`IntegrityError` if it was altered or is malformed."""
    p = Path(path)
    try:
        doc = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise IntegrityError(f"model file {p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"cannot read model file {p}: {exc}") from None
    if not isinstance(doc, dict) or "body" not in doc or "integrity" not in doc:
        raise IntegrityError(f"{p} is not a veil boost model file")
    body, integ = doc["body"], doc["integrity"]
    k = _key(key)
    if not isinstance(integ, dict) or integ.get("alg") not in ("sha256", "hmac-sha256"):
        raise IntegrityError(f"{p}: unknown integrity algorithm")
    if integ["alg"] == "hmac-sha256" and k is None:
        raise IntegrityError(f"{p} is HMAC-protected: give the key ({KEY_ENV})")
    expect = _tag(body, k if integ["alg"] == "hmac-sha256" else None)
    if not hmac.compare_digest(str(integ.get("digest", "")), expect["digest"]):
        raise IntegrityError(f"{p}: integrity check failed (file altered or wrong key)")
    return PartyModel.from_json_obj(body)
