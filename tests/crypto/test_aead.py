"""Known-answer tests (RFC 5869, RFC 7748, NIST GCM spec, RFC 8439) and AEAD behaviour."""

from __future__ import annotations

import pytest

from veil.crypto.aead import X25519KeyPair, aead_decrypt, aead_encrypt, hkdf_sha256
from veil.errors import ConfigError, CryptoError, DecryptionError

h = bytes.fromhex

# RFC 5869 appendix A, test cases 1-3 (SHA-256)
HKDF_VECTORS = [
    (
        h("0b" * 22),
        h("000102030405060708090a0b0c"),
        h("f0f1f2f3f4f5f6f7f8f9"),
        42,
        h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    ),
    (
        bytes(range(0x00, 0x50)),
        bytes(range(0x60, 0xB0)),
        bytes(range(0xB0, 0x100)),
        82,
        h(
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f1d87"
        ),
    ),
    (
        h("0b" * 22),
        b"",
        b"",
        42,
        h("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), HKDF_VECTORS)
def test_hkdf_rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int, okm: bytes) -> None:
    assert hkdf_sha256(ikm, salt=salt, info=info, length=length) == okm


def test_hkdf_bad_length() -> None:
    with pytest.raises(CryptoError):
        hkdf_sha256(b"k", salt=b"", info=b"", length=255 * 32 + 1)


def test_x25519_rfc7748_section_6_1() -> None:
    alice = X25519KeyPair.from_private_bytes(
        h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob = X25519KeyPair.from_private_bytes(
        h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    )
    assert alice.public_bytes == h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert bob.public_bytes == h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert alice.exchange(bob.public_bytes) == shared
    assert bob.exchange(alice.public_bytes) == shared


def test_x25519_rfc7748_section_5_2() -> None:
    k = X25519KeyPair.from_private_bytes(
        h("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    )
    u = h("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert k.exchange(u) == h("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")


def test_x25519_generate_and_reject_bad_points() -> None:
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    assert a.public_bytes != b.public_bytes
    assert a.exchange(b.public_bytes) == b.exchange(a.public_bytes)
    with pytest.raises(CryptoError):
        a.exchange(bytes(32))  # small-order point -> all-zero secret
    with pytest.raises(CryptoError):
        a.exchange(b"short")


# The Galois/Counter Mode of Operation (McGrew & Viega, NIST submission), test cases 14 and 16
GCM_VECTORS = [
    (
        bytes(32),
        bytes(12),
        bytes(16),
        b"",
        h("cea7403d4d606b6e074ec5d3baf39d18"),
        h("d0d1c8a799996bf0265b98b5d48ab919"),
    ),
    (
        h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"),
        h("cafebabefacedbaddecaf888"),
        h(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
            "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
        ),
        h("feedfacedeadbeeffeedfacedeadbeefabaddad2"),
        h(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
            "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
        ),
        h("76fc6ece0f4e1768cddf8853bb2d551b"),
    ),
]


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_aes256gcm_known_answer(key: bytes, iv: bytes, pt: bytes, aad: bytes, ct: bytes, tag: bytes) -> None:
    assert aead_encrypt(key, iv, pt, aad, "aes-256-gcm") == ct + tag
    assert aead_decrypt(key, iv, ct + tag, aad, "aes-256-gcm") == pt


def test_chacha20poly1305_rfc8439_2_8_2() -> None:
    pt = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    aad = h("50515253c0c1c2c3c4c5c6c7")
    key = bytes(range(0x80, 0xA0))
    nonce = h("070000004041424344454647")
    ct = h(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
    )
    tag = h("1ae10b594f09e26a7e902ecbd0600691")
    assert aead_encrypt(key, nonce, pt, aad, "chacha20-poly1305") == ct + tag
    assert aead_decrypt(key, nonce, ct + tag, aad, "chacha20-poly1305") == pt


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_aead_rejects_tampering(cipher: str) -> None:
    key, nonce = bytes(range(32)), bytes(12)
    blob = aead_encrypt(key, nonce, b"secret payload", b"hdr", cipher)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            aead_decrypt(key, nonce, bytes(bad), b"hdr", cipher)
    with pytest.raises(DecryptionError):
        aead_decrypt(key, nonce, blob, b"other", cipher)
    with pytest.raises(DecryptionError):
        aead_decrypt(bytes(32), nonce, blob, b"hdr", cipher)
    with pytest.raises(DecryptionError):
        aead_decrypt(key, nonce, blob[:-1], b"hdr", cipher)
    with pytest.raises(DecryptionError):
        aead_decrypt(key, nonce, blob[:5], b"hdr", cipher)


def test_aead_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        aead_encrypt(bytes(32), bytes(12), b"x", cipher="des")
    with pytest.raises(CryptoError):
        aead_encrypt(bytes(16), bytes(12), b"x")
    with pytest.raises(CryptoError):
        aead_encrypt(bytes(32), bytes(8), b"x")
