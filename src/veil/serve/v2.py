"""Open Inference Protocol (KServe v2) tensors over HTTP/JSON, with Triton's binary extension.

A request body is either plain JSON, or (binary extension) a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensor bytes of every input whose
``parameters.binary_data_size`` is set, in order. Responses mirror that: outputs requested with
``parameters.binary_data`` (or all outputs when ``parameters.binary_data_output`` is true) are sent
raw after the JSON header. Everything is validated; bad input is an :class:`InferenceInputError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from veil.serve.errors import InferenceInputError

__all__ = [
    "DTYPES",
    "InferRequest",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

MAX_TENSOR_ELEMENTS = 1 << 26
MAX_INPUTS = 64

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NP_TO_V2 = {v: k for k, v in DTYPES.items()}


def v2_datatype(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        return "BYTES"
    dt = _NP_TO_V2.get(arr.dtype)
    if dt is None:
        raise InferenceInputError(f"unsupported output dtype {arr.dtype}")
    return dt


@dataclass
class InferRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str] = field(default_factory=list)
    binary_outputs: set[str] = field(default_factory=set)
    all_binary: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


def _shape(v: Any, name: str) -> tuple[int, ...]:
    # bool is an int subclass in Python, but JSON true/false is not a dimension (numpy's reshape
    # refuses it: found by the fuzz campaign as a 500 for "shape": [false])
    if not isinstance(v, list) or len(v) > 16 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v
    ):
        raise InferenceInputError(f"input {name!r}: shape must be a list of non-negative ints")
    n = 1
    for d in v:
        n *= d
    if n > MAX_TENSOR_ELEMENTS:
        raise InferenceInputError(f"input {name!r}: {n} elements exceed the limit {MAX_TENSOR_ELEMENTS}")
    return tuple(v)


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    out: list[bytes] = []
    off = 0
    while off < len(raw):
        if off + 4 > len(raw):
            raise InferenceInputError(f"input {name!r}: truncated BYTES element")
        (n,) = struct.unpack_from("<I", raw, off)
        off += 4
        if off + n > len(raw):
            raise InferenceInputError(f"input {name!r}: truncated BYTES element")
        out.append(raw[off : off + n])
        off += n
    return out


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a v2 infer request body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise InferenceInputError("Inference-Header-Content-Length is out of range")
        head, rest = body[:header_length], body[header_length:]
    else:
        head, rest = body, b""
    try:
        doc = _dec.decode(head)
    except msgspec.DecodeError as exc:
        raise InferenceInputError(f"request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InferenceInputError("request must be a JSON object with an 'inputs' list")
    if len(doc["inputs"]) > MAX_INPUTS:
        raise InferenceInputError("too many inputs")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InferenceInputError("'parameters' must be an object")
    rid = doc.get("id", "")
    if not isinstance(rid, str) or len(rid) > 256:
        raise InferenceInputError("'id' must be a string of at most 256 chars")
    inputs: dict[str, np.ndarray] = {}
    off = 0
    for t in doc["inputs"]:
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("name"), str)
            or not isinstance(t.get("datatype"), str)
        ):
            raise InferenceInputError("every input needs 'name', 'datatype', 'shape'")
        name, dt = t["name"], t["datatype"]
        shape = _shape(t.get("shape"), name)
        tparams = t.get("parameters") or {}
        n_elems = int(np.prod(shape, dtype=np.int64)) if shape else 1
        bsize = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if bsize is not None:
            if not isinstance(bsize, int) or bsize < 0 or off + bsize > len(rest):
                raise InferenceInputError(f"input {name!r}: binary_data_size out of range")
            raw = rest[off : off + bsize]
            off += bsize
            if dt == "BYTES":
                elems = _bytes_elements(raw, name)
                if len(elems) != n_elems:
                    raise InferenceInputError(
                        f"input {name!r}: {len(elems)} elements for shape {list(shape)}"
                    )
                arr = np.array(elems, dtype=object).reshape(shape)
            else:
                npdt = DTYPES.get(dt)
                if npdt is None:
                    raise InferenceInputError(f"input {name!r}: unsupported datatype {dt!r}")
                if bsize != n_elems * npdt.itemsize:
                    raise InferenceInputError(
                        f"input {name!r}: {bsize} bytes do not fit shape {list(shape)} {dt}"
                    )
                arr = np.frombuffer(raw, dtype=npdt.newbyteorder("<")).astype(npdt).reshape(shape)
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise InferenceInputError(f"input {name!r}: 'data' must be a list")
            if dt == "BYTES":
                flat = np.array(
                    [d.encode() if isinstance(d, str) else d for d in _flatten(data)], dtype=object
                )
            else:
                npdt = DTYPES.get(dt)
                if npdt is None:
                    raise InferenceInputError(f"input {name!r}: unsupported datatype {dt!r}")
                try:
                    flat = np.asarray(_flatten(data), dtype=npdt)
                except (TypeError, ValueError, OverflowError):
                    raise InferenceInputError(f"input {name!r}: data is not {dt}") from None
            if flat.size != n_elems:
                raise InferenceInputError(f"input {name!r}: {flat.size} values for shape {list(shape)}")
            arr = flat.reshape(shape)
        if name in inputs:
            raise InferenceInputError(f"input {name!r} given twice")
        inputs[name] = arr
    if off != len(rest):
        raise InferenceInputError("trailing bytes after the binary tensors")
    outs: list[str] = []
    binary: set[str] = set()
    req_outputs = doc.get("outputs") or []
    if not isinstance(req_outputs, list) or len(req_outputs) > MAX_INPUTS:
        raise InferenceInputError("'outputs' must be a list of {'name': ...} objects")
    for o in req_outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InferenceInputError("every requested output needs a 'name'")
        outs.append(o["name"])
        op = o.get("parameters") or {}
        if isinstance(op, dict) and op.get("binary_data") is True:
            binary.add(o["name"])
    return InferRequest(
        id=rid,
        inputs=inputs,
        outputs=outs,
        binary_outputs=binary,
        all_binary=bool(params.get("binary_data_output", False)),
        parameters=params,
    )


def _flatten(data: list[Any]) -> list[Any]:
    if data and isinstance(data[0], list):
        out: list[Any] = []
        for d in data:
            if not isinstance(d, list):
                raise InferenceInputError("ragged 'data'")
            out.extend(_flatten(d))
        return out
    return data


def _raw(arr: np.ndarray) -> bytes:
    if v2_datatype(arr) == "BYTES":
        parts = []
        for e in arr.reshape(-1):
            b = e if isinstance(e, bytes) else str(e).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def encode_response(
    model: str,
    version: str,
    request_id: str,
    outputs: dict[str, np.ndarray],
    *,
    binary: set[str] | None = None,
    all_binary: bool = False,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode outputs; returns (body, header_length or None when no binary part)."""
    binary = binary or set()
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in outputs.items():
        t: dict[str, Any] = {"name": name, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
        if all_binary or name in binary:
            raw = _raw(arr)
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t["datatype"] == "BYTES":
            t["data"] = [
                e.decode(errors="replace") if isinstance(e, bytes) else str(e) for e in arr.reshape(-1)
            ]
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    head = _enc.encode(doc)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode_request(
    request_id: str,
    inputs: dict[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: list[str] | None = None,
) -> tuple[bytes, int | None]:
    """Client side: encode inputs (binary extension by default)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in inputs.items():
        t: dict[str, Any] = {"name": name, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
        if binary:
            raw = _raw(arr)
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"id": request_id, "inputs": tensors}
    if outputs is not None:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
    elif binary:
        doc["parameters"] = {"binary_data_output": True}
    head = _enc.encode(doc)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def decode_response(
    body: bytes, header_length: int | None
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """Client side: parse a v2 infer response into (json doc, outputs)."""
    if header_length is not None:
        head, rest = body[:header_length], body[header_length:]
    else:
        head, rest = body, b""
    try:
        doc = _dec.decode(head)
    except msgspec.DecodeError as exc:
        raise InferenceInputError(f"response is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InferenceInputError("response is not a JSON object")
    if "error" in doc:
        raise InferenceInputError(f"server error: {doc['error']}")
    out: dict[str, np.ndarray] = {}
    off = 0
    for t in doc.get("outputs", []):
        shape = tuple(t["shape"])
        p = t.get("parameters") or {}
        if "binary_data_size" in p:
            n = int(p["binary_data_size"])
            raw = rest[off : off + n]
            off += n
            if t["datatype"] == "BYTES":
                out[t["name"]] = np.array(_bytes_elements(raw, t["name"]), dtype=object).reshape(shape)
            else:
                out[t["name"]] = np.frombuffer(raw, dtype=DTYPES[t["datatype"]]).reshape(shape)
        elif t["datatype"] == "BYTES":
            out[t["name"]] = np.array(t["data"], dtype=object).reshape(shape)
        else:
            out[t["name"]] = np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(shape)
    return doc, out
