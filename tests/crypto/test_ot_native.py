"""Native OT-extension kernel (veil.crypto._native, otkernel.c): byte-identical to the numpy
reference for the transpose, the TCCR hash and the fused end of an extension call; parties on
different paths interoperate; the loader falls back cleanly."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from veil.comm import Channel
from veil.crypto import _native
from veil.crypto import triples_ot as T
from veil.errors import ProtocolError
from veil.testing import run_parties

native = T._load_native()[0]
needs_native = pytest.mark.skipif(native is None, reason=f"native OT kernel unavailable: "
                                  f"{T.native_status()['reason']}")

# m multiple of 8; 136 and 1000 are not multiples of 128; 520 and 4104 end in a 1-byte tail of the
# kernel's 64-byte blocks; _CHUNK + 1032 crosses the numpy transpose's chunk boundary
SIZES = [0, 8, 64, 136, 520, 1000, 4104, T._CHUNK + 1032]


def _u8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


@needs_native
@pytest.mark.parametrize("m", SIZES)
def test_transpose_native_equals_numpy(m: int) -> None:
    rng = np.random.default_rng(m)
    cols = _u8(rng, 128, m // 8)
    before = cols.copy()
    ref = T._transpose(cols, m)
    got = native.transpose(cols, m)
    assert got.shape == (m, 16)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(cols, before)  # neither path writes to its input (numpy did for m = 8)
    # a single set bit lands where the definition says: column byte b bit c of row j -> OT 8b + c,
    # row byte j // 8 bit j % 8
    if m >= 64:
        one = np.zeros_like(cols)
        one[77, 5] = 1 << 3
        rows = native.transpose(one, m)
        assert np.count_nonzero(rows) == 1 and rows[8 * 5 + 3, 77 // 8] == 1 << (77 % 8)


@needs_native
def test_kernel_wrappers_refuse_bad_shapes() -> None:
    """The C code trusts its sizes: the wrappers check them (no out-of-bounds read)."""
    cols = np.zeros((128, 10), dtype=np.uint8)
    for bad in (lambda: native.transpose(cols, 160), lambda: native.transpose(cols[:64], 80),
                lambda: native.transpose(cols, 12),
                lambda: native.tccr(np.zeros((4, 8), np.uint8), 0, T._PI_KEY),
                lambda: native.finish(cols, cols, cols[:, :9], np.zeros(16, np.uint8), 80, 0, T._PI_KEY),
                lambda: native.ctr(np.zeros((2, 16), np.uint8), 0, 8)):
        with pytest.raises(ValueError):
            bad()


@needs_native
def test_transpose_native_strided_input() -> None:
    rng = np.random.default_rng(1)
    wide = _u8(rng, 128, 300)
    cols = wide[:, 7:207]  # not contiguous: the wrapper copies
    ref = T._transpose(np.ascontiguousarray(cols), 1600)
    np.testing.assert_array_equal(native.transpose(cols, 1600), ref)


@needs_native
@pytest.mark.parametrize(("m", "start"), [(m, 0) for m in SIZES]
                         + [(m, s) for m in SIZES[:-1] for s in (12345, (1 << 40) + 7)])
def test_tccr_native_equals_numpy(m: int, start: int) -> None:
    rng = np.random.default_rng(m + start)
    rows = _u8(rng, m, 16)
    got = native.tccr(rows, start, T._PI_KEY)
    np.testing.assert_array_equal(got, T._tccr(rows, start))
    if m:
        # the tweak matters: another start gives other outputs
        assert not np.array_equal(native.tccr(rows, start + 1, T._PI_KEY)[0], got[0])


def test_pi_is_fixed_key_aes() -> None:
    """Known answer for the numpy reference itself: pi(0) = AES-128_{_PI_KEY}(0^128)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(T._PI_KEY), modes.ECB()).encryptor()
    expect = np.frombuffer(enc.update(bytes(32)), dtype=np.uint8).reshape(2, 16)
    np.testing.assert_array_equal(T._pi(np.zeros((2, 16), dtype=np.uint8)), expect)
    # TCCR on one row: pi(pi(x) ^ i) ^ pi(x) with i in the low 8 bytes, little-endian
    p = expect[0]
    x = p.copy()
    x[:8] ^= np.frombuffer((5).to_bytes(8, "little"), dtype=np.uint8)
    want = np.frombuffer(Cipher(algorithms.AES(T._PI_KEY), modes.ECB()).encryptor()
                         .update(x.tobytes()), dtype=np.uint8) ^ p
    np.testing.assert_array_equal(T._tccr(np.zeros((1, 16), dtype=np.uint8), 5)[0], want)


@needs_native
@pytest.mark.parametrize("m", SIZES)
def test_finish_native_equals_numpy(m: int) -> None:
    rng = np.random.default_rng(100 + m)
    t, q, u = (_u8(rng, 128, m // 8) for _ in range(3))
    s_row = _u8(rng, 16)
    s_bits = np.unpackbits(s_row, bitorder="little")
    q_in = q.copy()
    got = native.finish(t, q, u, s_row, m, 999, T._PI_KEY)
    np.testing.assert_array_equal(q, q_in)  # the native call does not touch its inputs
    ref = T._finish_numpy(t, q.copy(), u, s_bits, s_row, m, 999)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    # the definition, spelled out: m1 = H(Q ^ s) with Q = transpose(q ^ (s & u))
    masked = q ^ (u & np.where(s_bits[:, None] == 1, 255, 0).astype(np.uint8))
    np.testing.assert_array_equal(got[1], T._tccr(T._transpose(masked, m) ^ s_row[None, :], 999))


@needs_native
@pytest.mark.parametrize(("offset", "nbytes"), [(0, 0), (0, 1), (0, 131072 + 3), (7, 16), (16, 33),
                                                (12345, 1000), ((1 << 33) + 9, 40)])
def test_ctr_native_equals_cryptography(offset: int, nbytes: int) -> None:
    rng = np.random.default_rng(offset + nbytes)
    keys = _u8(rng, 5, 32)
    got = native.ctr(keys, offset, nbytes)
    assert got.shape == (5, nbytes)
    for i in range(5):
        # the persistent reader positioned at offset, and (small offsets) one read from byte 0
        assert got[i].tobytes() == T._stream(keys[i].tobytes(), offset).update(bytes(nbytes))
        if offset < 1 << 20:
            assert got[i].tobytes() == T._stream(keys[i].tobytes()).update(bytes(offset + nbytes))[offset:]
    if nbytes:
        assert not np.array_equal(got[0], got[1])


def test_stream_at_offset_continues_the_stream() -> None:
    key = bytes(range(32))
    whole = T._stream(key).update(bytes(100))
    for off in (0, 1, 15, 16, 17, 64, 99):
        assert T._stream(key, off).update(bytes(100 - off)) == whole[off:]


def _switching_role(p: int, flips: list[bool]) -> Any:
    def f(ch: Channel) -> list[Any]:
        ot = T.OTExtension(ch, p, timeout=60)
        out = []
        for i, use_native in enumerate(flips):
            ot._native = native if use_native else None
            m = 8 * (3 + 5 * i)  # odd byte counts: offsets inside a 16-byte keystream block
            c = (np.arange(m) % (2 + p) == 0).astype(np.uint8)
            out.append((c, ot.random_ots(m, c)))
        return out

    return f


@needs_native
def test_path_switch_between_calls_keeps_streams_in_step() -> None:
    """A party may change path between calls: the numpy readers are re-positioned at the native
    offset (party 0 switches every call, party 1 never / always)."""
    for other in (False, True):
        r0, r1 = run_parties(_switching_role(0, [True, False, True, False, False, True]),
                             _switching_role(1, [other] * 6), timeout=120)
        for (c0, (m0_a, m1_a, mc_a)), (c1, (m0_b, m1_b, mc_b)) in zip(r0, r1, strict=True):
            np.testing.assert_array_equal(mc_b, np.where(c1[:, None] == 1, m1_a, m0_a))
            np.testing.assert_array_equal(mc_a, np.where(c0[:, None] == 1, m1_b, m0_b))


def _mixed_role(p: int, paths: tuple[bool, bool], choices: list[np.ndarray], bits: list[np.ndarray]) -> Any:
    def f(ch: Channel) -> dict[str, Any]:
        ot = T.OTExtension(ch, p, timeout=60)
        if not paths[p]:
            ot._native = None
        assert (ot._native is not None) == paths[p]
        return {"rot": ot.random_ots(choices[p].size, choices[p]), "and": ot.and_triples(40),
                "beaver": ot.beaver(17), "bitp": ot.bit_product(bits[p]), "count": ot._count}

    return f


@needs_native
@pytest.mark.parametrize("paths", [(True, False), (False, True), (True, True)])
def test_parties_on_different_paths_interoperate(paths: tuple[bool, bool]) -> None:
    rng = np.random.default_rng(7)
    choices = [rng.integers(0, 2, 1032).astype(np.uint8) for _ in range(2)]
    bits = [rng.integers(0, 2, 301).astype(np.uint64) for _ in range(2)]
    r0, r1 = run_parties(_mixed_role(0, paths, choices, bits), _mixed_role(1, paths, choices, bits),
                         timeout=120)
    (m0_a, m1_a, mc_a), (m0_b, m1_b, mc_b) = r0["rot"], r1["rot"]
    np.testing.assert_array_equal(mc_b, np.where(choices[1][:, None] == 1, m1_a, m0_a))
    np.testing.assert_array_equal(mc_a, np.where(choices[0][:, None] == 1, m1_b, m0_b))
    assert not np.array_equal(m0_a, m1_a)
    (a0, b0, c0), (a1, b1, c1) = r0["and"], r1["and"]
    np.testing.assert_array_equal((a0 ^ a1) & (b0 ^ b1), c0 ^ c1)
    (a0, b0, c0), (a1, b1, c1) = r0["beaver"], r1["beaver"]
    np.testing.assert_array_equal((a0 + a1) * (b0 + b1), c0 + c1)
    np.testing.assert_array_equal(r0["bitp"] + r1["bitp"], bits[0] * bits[1])
    assert r0["count"] == r1["count"] > 1032


def test_numpy_only_run_is_correct() -> None:
    """Both parties forced to numpy (the fallback) still give correct triples."""
    rng = np.random.default_rng(8)
    choices = [rng.integers(0, 2, 136).astype(np.uint8) for _ in range(2)]
    bits = [rng.integers(0, 2, 33).astype(np.uint64) for _ in range(2)]
    r0, r1 = run_parties(_mixed_role(0, (False, False), choices, bits),
                         _mixed_role(1, (False, False), choices, bits), timeout=120)
    (a0, b0, c0), (a1, b1, c1) = r0["beaver"], r1["beaver"]
    np.testing.assert_array_equal((a0 + a1) * (b0 + b1), c0 + c1)
    np.testing.assert_array_equal(r0["bitp"] + r1["bitp"], bits[0] * bits[1])


def test_random_ots_rejects_bad_sizes() -> None:
    def role(p: int) -> Any:
        def f(ch: Channel) -> Any:
            ot = T.OTExtension(ch, p, timeout=30)
            with pytest.raises(ProtocolError):
                ot.random_ots(12, np.zeros(12, np.uint8))
            with pytest.raises(ProtocolError):
                ot.random_ots(16, np.zeros(8, np.uint8))
            return ot.random_ots(8, np.ones(8, np.uint8))  # still in step afterwards

        return f

    (_, m1, _), (_, _, mc) = run_parties(role(0), role(1), timeout=60)
    np.testing.assert_array_equal(mc, m1)


# ---- loader


def test_status_and_lazy_attribute() -> None:
    st = T.native_status()
    assert st["native"] is (native is not None) and isinstance(st["reason"], str) and st["reason"]
    assert T.NATIVE is st["native"]
    with pytest.raises(AttributeError):
        _ = T.NO_SUCH_THING  # type: ignore[attr-defined]


def test_env_switch_forces_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_OT_NATIVE", "0")
    kernel, why = _native.load()
    assert kernel is None and "VEIL_OT_NATIVE=0" in why


def test_no_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VEIL_OT_NATIVE", raising=False)
    monkeypatch.setenv("VEIL_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernel, why = _native.load()
    if _native.platform.machine().lower() not in _native._X86:
        assert kernel is None
        return
    assert kernel is None and "no C compiler" in why
    assert list((tmp_path / "c").iterdir()) == []


def test_shared_cache_dir_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VEIL_OT_NATIVE", raising=False)
    if _native.platform.machine().lower() not in _native._X86:
        pytest.skip("loader stops earlier on non-x86")
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv("VEIL_CACHE_DIR", str(d))
    kernel, why = _native.load()
    assert kernel is None and "writable by group/others" in why


@needs_native
def test_fresh_cache_builds_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    d = tmp_path / "fresh" / "veil"
    monkeypatch.setenv("VEIL_CACHE_DIR", str(d))
    k1, why1 = _native.load()
    assert k1 is not None, why1
    files = sorted(p.name for p in d.iterdir())
    assert len(files) == 1 and files[0].startswith("otkernel-") and files[0].endswith(".so")  # no temp left
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    mtime = (d / files[0]).stat().st_mtime_ns
    k2, _ = _native.load()
    assert k2 is not None and (d / files[0]).stat().st_mtime_ns == mtime  # reused, not rebuilt
    rows = np.arange(64 * 16, dtype=np.uint8).reshape(64, 16)
    np.testing.assert_array_equal(k2.tccr(rows, 3, T._PI_KEY), T._tccr(rows, 3))
