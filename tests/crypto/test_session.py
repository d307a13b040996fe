"""SecureSession: round trips and rejection of tampered / replayed / reordered / truncated /
wrong-key frames, each with DecryptionError and without advancing the receiver."""

from __future__ import annotations

import threading

import pytest

from veil.crypto.aead import X25519KeyPair
from veil.crypto.session import FRAME_OVERHEAD, SecureSession
from veil.errors import ConfigError, CryptoError, DecryptionError

CIPHERS = ["aes-256-gcm", "chacha20-poly1305"]


def pair(cipher: str = "aes-256-gcm", transcript: bytes = b"t") -> tuple[SecureSession, SecureSession]:
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    tr = transcript + a.public_bytes + b.public_bytes
    s_a = SecureSession.from_shared_secret(
        a.exchange(b.public_bytes), initiator=True, transcript=tr, cipher=cipher
    )
    s_b = SecureSession.from_shared_secret(
        b.exchange(a.public_bytes), initiator=False, transcript=tr, cipher=cipher
    )
    return s_a, s_b


@pytest.mark.parametrize("cipher", CIPHERS)
def test_round_trip_both_directions(cipher: str) -> None:
    a, b = pair(cipher)
    assert a.session_id == b.session_id and len(a.session_id) == 16
    for i in range(5):
        msg = bytes([i]) * (i * 100)
        f = a.encrypt(msg, b"ctx")
        assert len(f) == len(msg) + FRAME_OVERHEAD
        assert int.from_bytes(f[:8], "big") == i
        assert b.decrypt(f, b"ctx") == msg
        assert a.decrypt(b.encrypt(msg[::-1])) == msg[::-1]
    assert a.messages_sent == b.messages_received == 5


def test_directions_use_different_keys() -> None:
    a, b = pair()
    f = a.encrypt(b"hello")
    # reflecting a frame back to its sender must fail (different direction key)
    with pytest.raises(DecryptionError):
        a.decrypt(f)
    assert b.decrypt(f) == b"hello"
    # same plaintext, same seq, opposite direction -> different ciphertext
    assert b.encrypt(b"hello")[8:] != f[8:]


@pytest.mark.parametrize("cipher", CIPHERS)
def test_tampered_byte_rejected_everywhere(cipher: str) -> None:
    a, b = pair(cipher)
    f = a.encrypt(b"transfer 100 to bob")
    for i in range(len(f)):
        bad = bytearray(f)
        bad[i] ^= 0x80
        with pytest.raises(DecryptionError):
            b.decrypt(bytes(bad))
    assert b.messages_received == 0
    assert b.decrypt(f) == b"transfer 100 to bob"  # the genuine one still goes through


def test_replay_rejected() -> None:
    a, b = pair()
    f0 = a.encrypt(b"m0")
    assert b.decrypt(f0) == b"m0"
    with pytest.raises(DecryptionError, match="replayed"):
        b.decrypt(f0)
    f1 = a.encrypt(b"m1")
    assert b.decrypt(f1) == b"m1"
    with pytest.raises(DecryptionError, match="replayed"):
        b.decrypt(f0)


def test_reorder_rejected() -> None:
    a, b = pair()
    f0, f1 = a.encrypt(b"m0"), a.encrypt(b"m1")
    with pytest.raises(DecryptionError, match="out of order"):
        b.decrypt(f1)
    assert b.messages_received == 0
    assert b.decrypt(f0) == b"m0"
    assert b.decrypt(f1) == b"m1"


def test_sequence_rewrite_rejected() -> None:
    # attacker relabels frame 1 as frame 0: the seq is bound in nonce and AAD
    a, b = pair()
    _f0, f1 = a.encrypt(b"m0"), a.encrypt(b"m1")
    forged = (0).to_bytes(8, "big") + f1[8:]
    with pytest.raises(DecryptionError):
        b.decrypt(forged)


@pytest.mark.parametrize("cut", [0, 1, 8, 20, 23, 24, -1])
def test_truncated_frame_rejected(cut: int) -> None:
    a, b = pair()
    f = a.encrypt(b"some payload bytes")
    bad = f[:cut]
    with pytest.raises(DecryptionError):
        b.decrypt(bad)
    assert b.messages_received == 0


def test_wrong_key_rejected() -> None:
    a, _ = pair()
    _, c = pair()  # another session entirely
    with pytest.raises(DecryptionError):
        c.decrypt(a.encrypt(b"for b only"))
    # same secret but different transcript -> different keys
    s = bytes(range(32))
    x = SecureSession.from_shared_secret(s, initiator=True, transcript=b"A")
    y = SecureSession.from_shared_secret(s, initiator=False, transcript=b"B")
    assert x.session_id != y.session_id
    with pytest.raises(DecryptionError):
        y.decrypt(x.encrypt(b"hi"))
    # same secret, different cipher -> refused
    z = SecureSession.from_shared_secret(s, initiator=False, transcript=b"A", cipher="chacha20-poly1305")
    with pytest.raises(DecryptionError):
        z.decrypt(x.encrypt(b"hi"))


def test_wrong_aad_rejected() -> None:
    a, b = pair()
    with pytest.raises(DecryptionError):
        b.decrypt(a.encrypt(b"x", b"stage-1"), b"stage-2")


def test_bad_config() -> None:
    with pytest.raises(ConfigError):
        SecureSession.from_shared_secret(bytes(32), initiator=True, cipher="rc4")
    with pytest.raises(CryptoError):
        SecureSession.from_shared_secret(b"short", initiator=True)
    a, _ = pair()
    with pytest.raises(DecryptionError):
        a.decrypt("not bytes")  # type: ignore[arg-type]


def test_concurrent_senders_keep_unique_sequence_numbers() -> None:
    a, b = pair()
    frames: list[bytes] = []
    lock = threading.Lock()

    def send() -> None:
        for _ in range(50):
            f = a.encrypt(b"x")
            with lock:
                frames.append(f)

    ts = [threading.Thread(target=send) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    seqs = sorted(int.from_bytes(f[:8], "big") for f in frames)
    assert seqs == list(range(200))
    for f in sorted(frames, key=lambda f: f[:8]):
        assert b.decrypt(f) == b"x"


def test_final_frame_detects_stream_truncation() -> None:
    a, b = pair()
    frames = [a.encrypt(b"m0"), a.encrypt(b"m1"), a.encrypt(b"end", final=True)]
    assert a.finished
    with pytest.raises(CryptoError):
        a.encrypt(b"more")
    # the stream cut before its final frame: receiver has not seen the end
    assert b.decrypt(frames[0]) == b"m0" and b.decrypt(frames[1]) == b"m1"
    assert not b.peer_finished
    # flipping the FINAL flag on a normal frame (or clearing it) breaks authentication
    forged = bytes([frames[2][0] & 0x7F]) + frames[2][1:]
    with pytest.raises(DecryptionError):
        b.decrypt(forged)
    assert not b.peer_finished
    assert b.decrypt(frames[2]) == b"end"
    assert b.peer_finished
    with pytest.raises(DecryptionError):
        b.decrypt(frames[2])
    # the other direction is still open
    assert a.decrypt(b.encrypt(b"ack")) == b"ack"


def test_final_flag_cannot_be_added() -> None:
    a, b = pair()
    f = a.encrypt(b"not the end")
    forged = bytes([f[0] | 0x80]) + f[1:]
    with pytest.raises(DecryptionError):
        b.decrypt(forged)
    assert b.decrypt(f) == b"not the end" and not b.peer_finished
