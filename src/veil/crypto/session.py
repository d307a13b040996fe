"""A secure, strictly ordered message session over an established shared secret.

Key schedule (both sides compute the same values; see ``docs/protocols/crypto.md``)::

    th         = SHA-256("veil/session/v1/transcript" || transcript)
    k_i2r      = HKDF-SHA256(secret, salt=th, info="veil/session/v1/key/i2r/" || cipher, 32)
    k_r2i      = HKDF-SHA256(secret, salt=th, info="veil/session/v1/key/r2i/" || cipher, 32)
    iv_i2r     = HKDF-SHA256(secret, salt=th, info="veil/session/v1/iv/i2r/"  || cipher, 4)
    iv_r2i     = HKDF-SHA256(secret, salt=th, info="veil/session/v1/iv/r2i/"  || cipher, 4)
    session_id = HKDF-SHA256(secret, salt=th, info="veil/session/v1/id/"      || cipher, 16)

The initiator sends with ``k_i2r`` and receives with ``k_r2i``; the responder the other way
round. Frame for message number ``seq`` (0, 1, 2, ... per direction)::

    frame = seq (8 bytes, big-endian) || AEAD(key, nonce = iv || seq, plaintext, aad = seq || aad)

The receiver accepts only the next expected ``seq``: a replayed, reordered, dropped-then-later,
truncated, tampered or wrong-key frame raises :class:`veil.errors.DecryptionError`, returns no
plaintext and does not advance the receive counter.

End of stream: the top bit of the 8-byte sequence field is the authenticated FINAL flag
(``encrypt(..., final=True)``). After a final frame the direction is closed: the sender refuses
to seal more and the receiver rejects anything further. A protocol that checks
``peer_finished`` at its end therefore detects a stream cut short (its last frames dropped).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from typing import Final

from veil.crypto.aead import CIPHERS, TAG_BYTES, aead_decrypt, aead_encrypt, hkdf_sha256
from veil.errors import ConfigError, CryptoError, DecryptionError

__all__ = ["FRAME_OVERHEAD", "SecureSession"]

_SEQ = struct.Struct(">Q")
_FINAL: Final = 1 << 63
_MAX_SEQ: Final = _FINAL - 1
FRAME_OVERHEAD: Final = _SEQ.size + TAG_BYTES
"""Bytes a frame adds to its plaintext (sequence number + tag)."""


class SecureSession:
    """Per-direction AEAD keys with 64-bit message counters and strict in-order acceptance.

    Thread-safe: ``encrypt`` and ``decrypt`` each hold their own lock, so one thread may send
    while another receives.
    """

    def __init__(
        self,
        *,
        send_key: bytes,
        recv_key: bytes,
        send_iv: bytes,
        recv_iv: bytes,
        session_id: bytes,
        cipher: str = "aes-256-gcm",
    ) -> None:
        if cipher not in CIPHERS:
            raise ConfigError(f"unknown AEAD cipher {cipher!r}; choose one of {', '.join(CIPHERS)}")
        if len(send_iv) != 4 or len(recv_iv) != 4:
            raise CryptoError("session IVs must be 4 bytes")
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_iv = send_iv
        self._recv_iv = recv_iv
        self.session_id: bytes = session_id
        self.cipher: str = cipher
        self._send_seq = 0
        self._recv_seq = 0
        self._send_final = False
        self._recv_final = False
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()

    @classmethod
    def from_shared_secret(
        cls,
        secret: bytes,
        *,
        initiator: bool,
        transcript: bytes = b"",
        cipher: str = "aes-256-gcm",
    ) -> SecureSession:
        """Derive both directions' keys from ``secret`` bound to ``transcript`` (e.g. both public
        keys, the attestation evidence, the protocol name)."""
        if cipher not in CIPHERS:
            raise ConfigError(f"unknown AEAD cipher {cipher!r}; choose one of {', '.join(CIPHERS)}")
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise CryptoError("session secret must be at least 16 bytes")
        th = hashlib.sha256(b"veil/session/v1/transcript" + bytes(transcript)).digest()
        c = cipher.encode()

        def derive(label: bytes, n: int) -> bytes:
            return hkdf_sha256(bytes(secret), salt=th, info=b"veil/session/v1/" + label + b"/" + c, length=n)

        k_i2r, k_r2i = derive(b"key/i2r", 32), derive(b"key/r2i", 32)
        iv_i2r, iv_r2i = derive(b"iv/i2r", 4), derive(b"iv/r2i", 4)
        sid = derive(b"id", 16)
        if initiator:
            return cls(
                send_key=k_i2r, recv_key=k_r2i, send_iv=iv_i2r, recv_iv=iv_r2i, session_id=sid, cipher=cipher
            )
        return cls(
            send_key=k_r2i, recv_key=k_i2r, send_iv=iv_r2i, recv_iv=iv_i2r, session_id=sid, cipher=cipher
        )

    @property
    def messages_sent(self) -> int:
        return self._send_seq

    @property
    def messages_received(self) -> int:
        return self._recv_seq

    @property
    def finished(self) -> bool:
        """True once this side has sent its final frame."""
        return self._send_final

    @property
    def peer_finished(self) -> bool:
        """True once the peer's final frame has been accepted (the stream was not cut short)."""
        return self._recv_final

    def encrypt(self, plaintext: bytes, aad: bytes = b"", *, final: bool = False) -> bytes:
        """Seal the next outgoing message; returns ``seq || ciphertext || tag``. ``final=True``
        marks the last message of this direction."""
        with self._send_lock:
            if self._send_final:
                raise CryptoError("this session already sent its final frame")
            seq = self._send_seq
            if seq >= _MAX_SEQ:
                raise CryptoError("session message counter exhausted; establish a new session")
            header = _SEQ.pack(seq | (_FINAL if final else 0))
            frame = header + aead_encrypt(
                self._send_key, self._send_iv + header, plaintext, header + bytes(aad), self.cipher
            )
            self._send_seq = seq + 1
            self._send_final = final
            return frame

    def decrypt(self, frame: bytes, aad: bytes = b"") -> bytes:
        """Open the next incoming frame. :class:`DecryptionError` (and no plaintext) unless it is
        exactly the next expected message, intact, under this session's key."""
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise DecryptionError("frame must be bytes")
        frame = bytes(frame)
        if len(frame) < FRAME_OVERHEAD:
            raise DecryptionError(f"frame truncated: {len(frame)} bytes < minimum {FRAME_OVERHEAD}")
        header = frame[: _SEQ.size]
        (field,) = _SEQ.unpack(header)
        seq, final = field & _MAX_SEQ, bool(field & _FINAL)
        with self._recv_lock:
            if self._recv_final:
                raise DecryptionError("frame after the peer's final frame")
            expected = self._recv_seq
            if seq != expected:
                kind = "replayed" if seq < expected else "out of order (a message is missing)"
                raise DecryptionError(f"frame {kind}: sequence {seq}, expected {expected}")
            plaintext = aead_decrypt(
                self._recv_key, self._recv_iv + header, frame[_SEQ.size :], header + bytes(aad), self.cipher
            )
            self._recv_seq = expected + 1
            self._recv_final = final
            return plaintext

    def __repr__(self) -> str:
        return (
            f"SecureSession(id={self.session_id.hex()}, cipher={self.cipher}, "
            f"sent={self._send_seq}, received={self._recv_seq})"
        )
