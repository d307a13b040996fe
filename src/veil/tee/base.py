"""The :class:`Enclave` protocol and the backend registry behind :func:`load_enclave`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from veil.errors import ConfigError
from veil.tee.evidence import Evidence

__all__ = ["BACKENDS", "Enclave", "load_enclave", "register_backend"]

log = logging.getLogger("veil.tee")


@runtime_checkable
class Enclave(Protocol):
    """A trusted execution environment veil code runs in (or pretends to, for ``simulated``)."""

    backend: str
    simulated: bool
    measurement: str

    def attest(self, report_data: bytes) -> Evidence:
        """Evidence binding ``report_data`` (at most 64 bytes, zero-padded) to this enclave."""
        ...

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        """Encrypt ``data`` under a key only this measurement on this platform can derive."""
        ...

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        """Inverse of :meth:`seal`; ``DecryptionError`` on tamper, wrong aad or other enclave."""
        ...


Factory = Callable[..., Enclave]
BACKENDS: dict[str, Factory] = {}
_logged: set[str] = set()


def register_backend(name: str, factory: Factory) -> None:
    """Register an enclave backend under ``name`` (done by the backend modules themselves)."""
    BACKENDS[name] = factory


def _ensure_registered() -> None:
    # importing the modules registers them; explicit, no plugin discovery
    from veil.tee import gramine, simulated, tsm  # noqa: F401


def load_enclave(
    backend: str = "simulated",
    *,
    code: Sequence[Path | bytes] = (),
    config: Mapping[str, Any] | None = None,
    **options: Any,
) -> Enclave:
    """Load the enclave backend ``backend`` for this code and config.

    There is no silent fallback: an unknown backend or one whose hardware is absent raises
    :class:`ConfigError` / :class:`AttestationError`. The selection is logged once per backend.
    """
    _ensure_registered()
    factory = BACKENDS.get(backend)
    if factory is None:
        raise ConfigError(f"unknown TEE backend {backend!r}; choose one of {sorted(BACKENDS)}")
    enclave = factory(code=code, config=dict(config or {}), **options)
    if backend not in _logged:
        _logged.add(backend)
        if enclave.simulated:
            log.warning("TEE backend %s selected: SIMULATED enclave, no hardware protection", backend)
        else:
            log.info("TEE backend %s selected", backend)
    return enclave
