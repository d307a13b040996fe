"""Registry of HE backends: explicit, few, no silent fallback.

A backend is selected by name (argument, else ``VeilSettings.he_backend``). An unknown name or
a backend whose library is not installed raises :class:`veil.errors.ConfigError`; veil never
switches to another backend behind the user's back. Each selection is logged once per process.
"""

from __future__ import annotations

import importlib
import logging
import threading
from abc import ABC, abstractmethod
from typing import ClassVar

from veil.crypto.he.base import CiphertextArray, HEKeyPair, HEPublicKey, HESecretKey
from veil.errors import ConfigError

__all__ = ["HEBackend", "available_backends", "get_backend", "register_backend", "registered_backends"]

_log = logging.getLogger("veil.crypto.he")


class HEBackend(ABC):
    """Factory for one HE library."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    requires: ClassVar[str]  # what to install if missing (for the error message)

    @abstractmethod
    def keygen(self, scheme: str, key_bits: int) -> HEKeyPair: ...

    @abstractmethod
    def public_key_from_bytes(self, scheme: str, payload: bytes) -> HEPublicKey: ...

    @abstractmethod
    def secret_key_from_bytes(self, pk: HEPublicKey, payload: bytes) -> HESecretKey: ...

    @abstractmethod
    def ciphertexts_from_bytes(self, pk: HEPublicKey, count: int, payload: bytes) -> CiphertextArray: ...


# name -> "module:Class" (imported lazily, so a missing optional library fails only when chosen)
_REGISTRY: dict[str, str] = {
    "heu": "veil.crypto.he.heu_backend:HeuBackend",
    "phe": "veil.crypto.he.phe_backend:PheBackend",
}
_INSTANCES: dict[str, HEBackend] = {}
_LOGGED: set[tuple[str, str]] = set()
_LOCK = threading.Lock()


def register_backend(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (for third-party backends)."""
    if ":" not in target:
        raise ConfigError(f"backend target must be 'module:Class', got {target!r}")
    with _LOCK:
        _REGISTRY[name.lower()] = target
        _INSTANCES.pop(name.lower(), None)


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Registered backends whose library imports on this machine."""
    out = []
    for name in registered_backends():
        try:
            get_backend(name, log=False)
        except ConfigError:
            continue
        out.append(name)
    return out


def get_backend(name: str | None = None, *, log: bool = True, source: str = "argument") -> HEBackend:
    """The backend called ``name`` (``None``: ``VeilSettings.he_backend``). ConfigError if unknown
    or not installed."""
    if name is None:
        from veil.config import get_settings

        name, source = get_settings().he_backend, "config VEIL_HE_BACKEND"
    key = str(name).strip().lower()
    with _LOCK:
        inst = _INSTANCES.get(key)
        if inst is None:
            target = _REGISTRY.get(key)
            if target is None:
                raise ConfigError(
                    f"unknown HE backend {name!r}; registered backends: {', '.join(sorted(_REGISTRY))}"
                )
            mod_name, cls_name = target.split(":", 1)
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as exc:
                hint = ""
                reg = _REGISTRY_HINTS.get(key)
                if reg:
                    hint = f" (install {reg})"
                raise ConfigError(
                    f"HE backend {key!r} is not available on this machine: {exc}{hint}. "
                    "veil does not fall back to another backend; choose one explicitly "
                    "(argument backend=... or VEIL_HE_BACKEND)."
                ) from None
            inst = getattr(mod, cls_name)()
            _INSTANCES[key] = inst
        if log and (key, source) not in _LOGGED:
            _LOGGED.add((key, source))
            _log.info("HE backend selected: %s (from %s)", key, source)
    return inst


_REGISTRY_HINTS: dict[str, str] = {"heu": "sf-heu, e.g. pip install 'veil[boost]'", "phe": "phe and gmpy2"}
