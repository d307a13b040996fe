"""The ``tsm`` backend: confidential-VM evidence through the Linux configfs-tsm interface.

Linux (6.7+) exposes report generation for TDX and SEV-SNP guests under
``/sys/kernel/config/tsm/report``: ``mkdir`` an entry, write up to 64 bytes of report data to
``inblob``, read the evidence from ``outblob``, and read ``provider`` (``tdx_guest`` or
``sev_guest``) and ``generation`` (incremented on every ``inblob`` write; if it moved while we
read, another writer raced us and we retry). The entry is removed afterwards.

* TDX guests produce an Intel DCAP TD quote: evidence ``backend="tdx-dcap"``, verified like any
  DCAP quote (dcap-qvl with collateral, or a pinned root). The measurement is MRTD.
* SEV-SNP guests produce an AMD attestation report: evidence ``backend="sev-snp"``. veil does
  NOT verify SEV-SNP reports yet, so every :class:`~veil.tee.Verifier` refuses them as an unknown
  backend; the backend still produces them so an external verifier can.

Sealing is not offered by configfs-tsm: :meth:`TsmEnclave.seal` raises ``AttestationError``
(seal to a KMS instead). When the configfs tree is absent the backend refuses to load.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from veil.crypto.random import random_bytes
from veil.errors import AttestationError, InputError
from veil.tee.base import register_backend
from veil.tee.dcap.quote import parse_quote
from veil.tee.dcap.verify import evidence_from_quote
from veil.tee.evidence import REPORT_DATA_SIZE, Evidence, pad_report_data

__all__ = ["TSM_REPORT_ROOT", "TsmEnclave", "tsm_available"]

log = logging.getLogger("veil.tee.tsm")

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
_SNP_MEASUREMENT = slice(0x90, 0xC0)  # SEV-SNP ATTESTATION_REPORT.MEASUREMENT (48 bytes)
_SNP_REPORT_DATA = slice(0x50, 0x90)
_SNP_POLICY = slice(0x08, 0x10)
_SNP_POLICY_DEBUG = 1 << 19


def tsm_available(root: Path = TSM_REPORT_ROOT) -> bool:
    return root.is_dir()


class TsmEnclave:
    """A TDX or SEV-SNP confidential VM attesting through configfs-tsm (hardware; NOT simulated)."""

    simulated = False

    def __init__(
        self,
        *,
        code: Sequence[Path | bytes] = (),
        config: Mapping[str, Any] | None = None,
        root: Path = TSM_REPORT_ROOT,
        entry: str | None = None,
        retries: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.config = dict(config or {})
        self._entry = entry
        self._retries = retries
        self._clock = clock
        if not tsm_available(self.root):
            raise AttestationError(
                f"tsm backend: {self.root} not found — not a TDX/SEV-SNP guest with configfs-tsm "
                "(Linux 6.7+, configfs mounted); use backend='simulated' explicitly for development"
            )
        raw, provider = self._report(b"")
        self.provider = provider
        ev = self._evidence(raw, provider, b"")
        self.backend = ev.backend
        self.measurement = ev.measurement
        self.debug = ev.debug
        log.info("configfs-tsm provider %s, measurement %s", provider, self.measurement[:16])

    def _report(self, report_data: bytes) -> tuple[bytes, str]:
        name = self._entry or f"veil-{os.getpid()}-{random_bytes(6).hex()}"
        d = self.root / name
        created = not d.exists()
        try:
            if created:
                d.mkdir()
            for _ in range(max(1, self._retries)):
                (d / "inblob").write_bytes(pad_report_data(report_data))
                gen = (d / "generation").read_text().strip()
                out = (d / "outblob").read_bytes()
                provider = (d / "provider").read_text().strip()
                if (d / "generation").read_text().strip() == gen:
                    return out, provider
                log.warning("configfs-tsm report raced with another writer, retrying")
            raise AttestationError("tsm backend: report kept racing with another writer")
        except OSError as e:
            raise AttestationError(f"tsm backend: report generation under {d} failed: {e}") from e
        finally:
            if created:
                try:
                    d.rmdir()
                except OSError:
                    log.debug("could not remove configfs-tsm entry %s", d)

    def _evidence(self, raw: bytes, provider: str, report_data: bytes) -> Evidence:
        ts = float(self._clock())
        if provider.startswith("tdx"):
            ev = evidence_from_quote(raw, timestamp=ts)
            if not parse_quote(raw).is_tdx:
                raise AttestationError("tsm backend: tdx_guest provider returned a non-TDX quote")
            return ev
        if provider.startswith("sev"):
            if len(raw) < 0x4A0:
                raise AttestationError("tsm backend: SEV-SNP report is too short")
            policy = int.from_bytes(raw[_SNP_POLICY], "little")
            return Evidence(
                backend="sev-snp", measurement=raw[_SNP_MEASUREMENT].hex(), report_data=raw[_SNP_REPORT_DATA],
                timestamp=ts, debug=bool(policy & _SNP_POLICY_DEBUG), simulated=False, quote=raw,
            )
        raise AttestationError(f"tsm backend: unknown provider {provider!r}")

    def attest(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, bytes | bytearray) or len(report_data) > REPORT_DATA_SIZE:
            raise InputError(f"report_data must be at most {REPORT_DATA_SIZE} bytes")
        raw, provider = self._report(bytes(report_data))
        ev = self._evidence(raw, provider, bytes(report_data))
        if ev.report_data != pad_report_data(bytes(report_data)):
            raise AttestationError("tsm backend: the report does not carry the requested report data")
        return ev

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        raise AttestationError("tsm backend: configfs-tsm offers no sealing key; seal through the KMS")

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        raise AttestationError("tsm backend: configfs-tsm offers no sealing key; seal through the KMS")

    def __repr__(self) -> str:
        return f"TsmEnclave(provider={self.provider}, measurement={self.measurement[:16]}…)"


def _factory(
    *, code: Sequence[Path | bytes] = (), config: Mapping[str, Any] | None = None, **options: Any
) -> TsmEnclave:
    root = Path(options.pop("root", os.environ.get("VEIL_TSM_ROOT", str(TSM_REPORT_ROOT))))
    return TsmEnclave(code=code, config=config, root=root, **options)


register_backend("tsm", _factory)
