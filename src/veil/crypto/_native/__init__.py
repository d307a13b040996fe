"""Loader of the native OT-extension kernel (``otkernel.c``) for :mod:`veil.crypto.triples_ot`.

The C file ships inside the package and is compiled once, at first use, with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a cache directory (``$VEIL_CACHE_DIR``,
else ``$XDG_CACHE_HOME/veil``, else ``~/.cache/veil``), keyed by the SHA-256 of the source, the
flags and the compiler; the library is written under a temporary name and renamed into place
(atomic, so concurrent processes never load a half-written file). It is then loaded with
:mod:`ctypes` (which releases the GIL during the calls).

:func:`load` never raises: without x86, a compiler, a private cache directory, or a CPU with
AES-NI and SSE4.1 (checked by ``cpuid`` inside the library before any AES instruction runs), or
with ``VEIL_OT_NATIVE=0``, it returns ``(None, reason)`` and the caller keeps its numpy path.
The functions are public (bit transposes, a fixed-key hash, AES-CTR) but their inputs are secret
(base-OT keys, PRG columns, OT pads): the C code has no secret-dependent branches or memory
indices (AES by AES-NI), and the library is loaded only from a directory that belongs to this user
and that group/others cannot write (so nobody else can swap the code that sees those secrets).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from veil.crypto.mpc_ring import U8, U64

__all__ = ["ABI_VERSION", "OtKernel", "cache_dir", "load"]

ABI_VERSION = 3
SOURCE = Path(__file__).with_name("otkernel.c")
CFLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-std=gnu99")
_X86 = {"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"}
_OFF = {"0", "false", "no", "off"}

_vp = ctypes.c_void_p
_sz = ctypes.c_size_t


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


class OtKernel:
    """Typed wrappers around the C entry points; inputs are made C-contiguous uint8."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._lib = lib
        lib.veil_ot_transpose.argtypes = [_vp, _sz, _sz, _vp]
        lib.veil_ot_transpose.restype = None
        lib.veil_ot_tccr.argtypes = [_vp, _vp, _sz, ctypes.c_uint64, _vp]
        lib.veil_ot_tccr.restype = None
        lib.veil_ot_finish.argtypes = [_vp, _vp, _vp, _vp, _sz, ctypes.c_uint64, _vp, _vp, _vp, _vp]
        lib.veil_ot_finish.restype = None
        lib.veil_ot_ctr256.argtypes = [_vp, _sz, ctypes.c_uint64, _sz, _vp]
        lib.veil_ot_ctr256.restype = None
        lib.veil_oh_send.argtypes = [_vp, _vp, _sz, _sz, _sz, _sz, ctypes.c_uint64, _vp, _vp, _vp, _vp]
        lib.veil_oh_send.restype = None
        lib.veil_oh_recv.argtypes = [_vp, _vp, _vp, _sz, _sz, _sz, _sz, ctypes.c_uint64, _vp, _vp, _vp]
        lib.veil_oh_recv.restype = None
        lib.veil_ggm_expand.argtypes = [_vp, _sz, _sz, _sz, _vp, _vp, _vp, _vp]
        lib.veil_ggm_expand.restype = None
        lib.veil_ggm_punctured.argtypes = [_vp, _vp, _sz, _sz, _sz, _vp, _vp, _vp]
        lib.veil_ggm_punctured.restype = None

    def transpose(self, cols: U8, m: int) -> U8:
        """(128, m/8) column bit-matrix -> (m, 16) rows (``m % 8 == 0``, checked by the caller)."""
        c = np.ascontiguousarray(cols, dtype=np.uint8)
        if c.ndim != 2 or c.shape[0] != 128 or m % 8 or m < 0 or c.shape[1] < m // 8:
            raise ValueError("OtKernel.transpose: cols must be (128, >= m/8), m a multiple of 8")
        out = np.empty((m, 16), dtype=np.uint8)
        self._lib.veil_ot_transpose(_ptr(c), c.shape[1], m // 8, _ptr(out))
        return out

    def tccr(self, rows: U8, start: int, key: bytes) -> U8:
        r = np.ascontiguousarray(rows, dtype=np.uint8)
        if r.ndim != 2 or r.shape[1] != 16 or len(key) != 16:
            raise ValueError("OtKernel.tccr: rows must be (n, 16), key 16 bytes")
        out = np.empty_like(r)
        k = np.frombuffer(key, dtype=np.uint8)
        self._lib.veil_ot_tccr(_ptr(r), _ptr(out), r.shape[0], start % (1 << 64), _ptr(k))
        return out

    def ctr(self, keys: U8, offset: int, nbytes: int) -> U8:
        """Keystream bytes ``[offset, offset + nbytes)`` of AES-256-CTR (counter block 0 first, a
        128-bit big-endian counter) under each of the (n, 32) ``keys``: (n, nbytes)."""
        k = np.ascontiguousarray(keys, dtype=np.uint8)
        if k.ndim != 2 or k.shape[1] != 32 or offset < 0:
            raise ValueError("OtKernel.ctr: keys must be (n, 32), offset >= 0")
        out = np.empty((k.shape[0], nbytes), dtype=np.uint8)
        self._lib.veil_ot_ctr256(_ptr(k), k.shape[0], offset, nbytes, _ptr(out))
        return out

    def finish(self, t_cols: U8, q_cols: U8, peer_u: U8, s_row: U8, m: int, start: int,
               key: bytes) -> tuple[U8, U8, U8]:
        """``(H(Q), H(Q ^ s), H(T))`` with ``Q = transpose(q_cols ^ (s & peer_u))`` and
        ``T = transpose(t_cols)``; all column arrays (128, m/8)."""
        t = np.ascontiguousarray(t_cols, dtype=np.uint8)
        q = np.ascontiguousarray(q_cols, dtype=np.uint8)
        u = np.ascontiguousarray(peer_u, dtype=np.uint8)
        s = np.ascontiguousarray(s_row, dtype=np.uint8)
        nbytes = m // 8
        if m % 8 or not (t.shape == q.shape == u.shape == (128, nbytes) and s.shape == (16,)
                         and len(key) == 16):
            raise ValueError("OtKernel.finish: wrong shapes")
        k = np.frombuffer(key, dtype=np.uint8)
        m0 = np.empty((m, 16), dtype=np.uint8)
        m1 = np.empty((m, 16), dtype=np.uint8)
        mc = np.empty((m, 16), dtype=np.uint8)
        self._lib.veil_ot_finish(_ptr(t), _ptr(q), _ptr(u), _ptr(s), nbytes, start % (1 << 64), _ptr(k),
                                 _ptr(m0), _ptr(m1), _ptr(mc))
        return m0, m1, mc


    def onehot_send(self, leaves: U8, x: U64, tweak: int, key: bytes) -> tuple[U64, U64]:
        """Sender step of :mod:`veil.crypto.onehot`: ``leaves`` (n, F, L, 16), ``x`` (n, c) ->
        ``(d (n, F, c), acc (F, L, c))``."""
        lv = np.ascontiguousarray(leaves, dtype=np.uint8)
        xs = np.ascontiguousarray(x, dtype=np.uint64)
        if lv.ndim != 4 or lv.shape[3] != 16 or xs.ndim != 2 or xs.shape[0] != lv.shape[0] or len(key) != 16:
            raise ValueError("OtKernel.onehot_send: leaves (n, F, L, 16), x (n, c), key 16 bytes")
        n, f, nl, _ = lv.shape
        c = xs.shape[1]
        d = np.empty((n, f, c), dtype=np.uint64)
        acc = np.empty((f, nl, c), dtype=np.uint64)
        scratch = _scratch(f, nl, c)
        k = np.frombuffer(key, dtype=np.uint8)
        self._lib.veil_oh_send(_ptr(lv), _ptr(xs), n, f, nl, c, tweak % (1 << 64), _ptr(k), _ptr(d),
                               _ptr(acc), _ptr(scratch))
        return d, acc

    def onehot_recv(self, leaves: U8, bins: np.ndarray, d: U64, tweak: int, key: bytes) -> U64:
        """Receiver step: ``leaves`` (n, F, L, 16), ``bins`` (n, F) in [0, L), ``d`` (n, F, c) ->
        ``acc (F, L, c)``."""
        lv = np.ascontiguousarray(leaves, dtype=np.uint8)
        b = np.ascontiguousarray(bins, dtype=np.int32)
        dd = np.ascontiguousarray(d, dtype=np.uint64)
        if (lv.ndim != 4 or lv.shape[3] != 16 or b.shape != lv.shape[:2] or dd.ndim != 3
                or dd.shape[:2] != lv.shape[:2] or len(key) != 16):
            raise ValueError("OtKernel.onehot_recv: leaves (n, F, L, 16), bins (n, F), d (n, F, c)")
        n, f, nl, _ = lv.shape
        c = dd.shape[2]
        if b.size and (int(b.min()) < 0 or int(b.max()) >= nl):
            raise ValueError("OtKernel.onehot_recv: bin index out of range")
        acc = np.empty((f, nl, c), dtype=np.uint64)
        scratch = _scratch(f, nl, c)
        k = np.frombuffer(key, dtype=np.uint8)
        self._lib.veil_oh_recv(_ptr(lv), _ptr(b), _ptr(dd), n, f, nl, c, tweak % (1 << 64), _ptr(k),
                               _ptr(acc), _ptr(scratch))
        return acc


    def ggm_expand(self, roots: U8, depth: int, keep: int, key: bytes) -> tuple[U8, U8]:
        """GGM set-up, sender: (m, 16) roots -> (leaves (m, keep, 16), sums (m, depth, 2, 16))."""
        r = np.ascontiguousarray(roots, dtype=np.uint8)
        if (r.ndim != 2 or r.shape[1] != 16 or not 1 <= depth <= 20 or not 0 <= keep <= 1 << depth
                or len(key) != 16):
            raise ValueError("OtKernel.ggm_expand: roots (m, 16), 1 <= depth <= 20, keep <= 2^depth")
        m = r.shape[0]
        leaves = np.empty((m, keep, 16), dtype=np.uint8)
        sums = np.empty((m, depth, 2, 16), dtype=np.uint8)
        scratch = _aligned(2 * (2 << depth))
        k = np.frombuffer(key, dtype=np.uint8)
        self._lib.veil_ggm_expand(_ptr(r), m, depth, keep, _ptr(k), _ptr(leaves), _ptr(sums), _ptr(scratch))
        return leaves, sums

    def ggm_punctured(self, alpha: np.ndarray, got: U8, depth: int, keep: int, key: bytes) -> U8:
        """GGM set-up, owner: every leaf but ``alpha`` (m,) from ``got`` (m, depth, 16): (m, keep, 16)."""
        a = np.ascontiguousarray(alpha, dtype=np.int32)
        g = np.ascontiguousarray(got, dtype=np.uint8)
        if (a.ndim != 1 or g.shape != (a.shape[0], depth, 16) or not 1 <= depth <= 20
                or not 0 <= keep <= 1 << depth or len(key) != 16):
            raise ValueError("OtKernel.ggm_punctured: alpha (m,), got (m, depth, 16), keep <= 2^depth")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= 1 << depth):
            raise ValueError("OtKernel.ggm_punctured: alpha out of range")
        leaves = np.empty((a.shape[0], keep, 16), dtype=np.uint8)
        scratch = _aligned(2 * (2 << depth))
        k = np.frombuffer(key, dtype=np.uint8)
        self._lib.veil_ggm_punctured(_ptr(a), _ptr(g), a.shape[0], depth, keep, _ptr(k), _ptr(leaves),
                                     _ptr(scratch))
        return leaves


def _aligned(words: int) -> U64:
    """``words`` uint64 (at least 2), 16-byte aligned."""
    raw = np.empty(max(2, words) + 2, dtype=np.uint64)
    off = (-raw.ctypes.data % 16) // 8
    return raw[off : off + max(2, words)]


def _scratch(f: int, nl: int, c: int) -> U64:
    """16-byte aligned scratch of (f * nl + f) * ceil(c / 2) vectors for the one-hot kernel."""
    return _aligned(2 * max(1, (f * nl + f) * ((c + 1) // 2)))


def cache_dir() -> Path:
    env = os.environ.get("VEIL_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "veil"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _private_dir(d: Path) -> str | None:
    """Create ``d`` (0700) if needed; a reason string if it is not safe to load code from it."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"cache directory {d} belongs to another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"cache directory {d} is writable by group/others"
    return None


def _build(cc: str, out: Path) -> str | None:
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=180, check=False)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["?"])[0]
            return f"compile failed ({cc}): {first}"
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"compile failed ({cc}): {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> tuple[OtKernel | None, str]:
    """``(kernel, where it came from)`` or ``(None, why not)``; never raises."""
    if os.environ.get("VEIL_OT_NATIVE", "1").strip().lower() in _OFF:
        return None, "disabled by VEIL_OT_NATIVE=0"
    machine = platform.machine().lower()
    if machine not in _X86:
        return None, f"no native kernel for {machine or 'this CPU'} (x86 with AES-NI only)"
    try:
        src = SOURCE.read_bytes()
    except OSError as exc:
        return None, f"kernel source missing: {exc}"
    cc = _compiler()
    try:
        d = cache_dir()
        bad = _private_dir(d)
        if bad:
            return None, bad
        h = hashlib.sha256(src)
        for part in (*CFLAGS, cc or "", machine, str(ABI_VERSION)):
            h.update(b"\0" + part.encode())
        so = d / f"otkernel-{h.hexdigest()[:20]}.so"
        if not so.exists():
            if cc is None:
                return None, "no C compiler (cc/gcc/clang or $CC) to build the kernel"
            err = _build(cc, so)
            if err:
                return None, err
        lib = ctypes.CDLL(str(so))
        if lib.veil_ot_abi_version() != ABI_VERSION:
            return None, f"{so}: ABI version mismatch"
        if not lib.veil_ot_cpu_ok():
            return None, "CPU lacks AES-NI or SSE4.1"
        return OtKernel(lib, so), f"native kernel {so}"
    except (OSError, AttributeError, RuntimeError, ValueError) as exc:  # RuntimeError: no home dir
        return None, f"native kernel unavailable: {exc}"
