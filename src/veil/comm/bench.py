"""Channel throughput measurement (used by benchmarks/crypto.py; also ``python -m veil.comm.bench``).

One party sends ``total_mb`` MB of float64 arrays in messages of ``message_mb`` MB, the other
acknowledges at the end; the sender's wall time from first send to the acknowledgement gives
MB/s (1 MB = 10^6 bytes of array payload). ``grpc`` runs the two parties as separate processes
over mutual TLS on 127.0.0.1, ``memory`` as two threads.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.comm.channel import Channel
from veil.comm.codec import Message

__all__ = ["channel_throughput"]


class _Chunk(Message, frozen=True, tag="__veil_bench_chunk__"):
    seq: int
    data: npt.NDArray[np.float64]


class _Ack(Message, frozen=True, tag="__veil_bench_ack__"):
    received: int


def _sender(chan: Channel, total_mb: float, message_mb: float) -> dict[str, Any]:
    per = max(1, int(message_mb * 1e6) // 8)
    count = max(1, round(total_mb / message_mb))
    arr = np.arange(per, dtype=np.float64)
    chan.send(_Chunk(seq=-1, data=arr[:1]))  # warm-up: connection and code paths
    chan.recv(_Ack)
    t0 = time.perf_counter()
    for i in range(count):
        chan.send(_Chunk(seq=i, data=arr))
    got = chan.recv(_Ack).received
    dt = time.perf_counter() - t0
    payload = count * per * 8
    if got != payload:
        raise ValueError(f"receiver acknowledged {got} bytes, sent {payload}")
    return {
        "payload_bytes": payload,
        "messages": count,
        "seconds": dt,
        "mb_per_s": payload / 1e6 / dt,
        **{f"sender_{k}": v for k, v in chan.stats.as_dict().items()},
    }


def _receiver(chan: Channel, total_mb: float, message_mb: float) -> dict[str, Any]:
    count = max(1, round(total_mb / message_mb))
    chan.recv(_Chunk)
    chan.send(_Ack(received=0))
    received = 0
    for i in range(count):
        msg = chan.recv(_Chunk)
        if msg.seq != i:
            raise ValueError(f"chunk {msg.seq} arrived in place of {i}")
        received += msg.data.nbytes
    chan.send(_Ack(received=received))
    return {f"receiver_{k}": v for k, v in chan.stats.as_dict().items()}


def channel_throughput(
    transport: str = "grpc", total_mb: float = 100.0, message_mb: float = 10.0, timeout: float = 300.0
) -> dict[str, Any]:
    """Measure one-way throughput of a channel; returns a JSON-able dict (see module doc)."""
    from veil.testing import run_parties

    a, b = run_parties(
        _sender,
        _receiver,
        transport=transport,
        timeout=timeout,
        args_a=(total_mb, message_mb),
        args_b=(total_mb, message_mb),
    )
    return {"transport": transport, "tls": transport == "grpc", "message_mb": message_mb, **a, **b}


def main() -> None:
    ap = argparse.ArgumentParser(description="veil channel throughput")
    ap.add_argument("--transport", choices=["grpc", "memory"], default="grpc")
    ap.add_argument("--total-mb", type=float, default=100.0)
    ap.add_argument("--message-mb", type=float, default=10.0)
    args = ap.parse_args()
    print(json.dumps(channel_throughput(args.transport, args.total_mb, args.message_mb), indent=2))


if __name__ == "__main__":
    main()
