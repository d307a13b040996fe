"""The throughput helper used by benchmarks/crypto.py reports consistent numbers."""

from __future__ import annotations

from veil.comm.bench import channel_throughput


def test_channel_throughput_memory() -> None:
    r = channel_throughput("memory", total_mb=4, message_mb=1, timeout=60)
    assert r["payload_bytes"] == 4 * 125_000 * 8 and r["messages"] == 4
    assert r["mb_per_s"] > 0
    assert r["sender_bytes_sent"] == r["receiver_bytes_received"] > r["payload_bytes"]
    assert r["sender_bytes_received"] == r["receiver_bytes_sent"]
