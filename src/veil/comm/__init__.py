"""veil.comm: typed two-party channels (in-memory and gRPC over mutual TLS) with traffic counters.

Wire = msgspec structs (:class:`Message`) with numpy arrays as MessagePack extension types;
nothing is ever pickled. See docs/protocols/comm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from veil.comm import codec
from veil.comm.channel import Abort, Channel, ChannelStats, Close, FrameChannel, MemoryChannel
from veil.comm.codec import DEFAULT_MAX_MESSAGE_BYTES, Codec, Message, decode, encode

if TYPE_CHECKING:
    from veil.comm.grpc_channel import GrpcChannel
    from veil.comm.identity import PartyIdentity

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Abort",
    "Channel",
    "ChannelStats",
    "Close",
    "Codec",
    "FrameChannel",
    "GrpcChannel",
    "MemoryChannel",
    "Message",
    "PartyIdentity",
    "codec",
    "decode",
    "encode",
]


def __getattr__(name: str) -> Any:
    # grpc and the certificate code are imported lazily: MemoryChannel users do not pay for them.
    if name == "GrpcChannel":
        from veil.comm.grpc_channel import GrpcChannel

        return GrpcChannel
    if name == "PartyIdentity":
        from veil.comm.identity import PartyIdentity

        return PartyIdentity
    raise AttributeError(f"module 'veil.comm' has no attribute {name!r}")
