"""veil's root settings: one pydantic-settings model, read from ``VEIL_*`` environment variables.

Example: ``VEIL_HE_BACKEND=phe VEIL_HE_KEY_BITS=3072 veil boost train ...``.
Engines may nest their own settings models; this root holds what the shared packages need.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from veil.errors import ConfigError

__all__ = ["VeilSettings", "get_settings", "reset_settings"]


class VeilSettings(BaseSettings):
    """Root configuration. Every field can be set as ``VEIL_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="VEIL_", extra="ignore", frozen=True)

    he_backend: str = Field(default="heu", description="homomorphic-encryption backend: 'heu' or 'phe'")
    he_scheme: Literal["ou", "paillier"] = Field(
        default="ou", description="HE scheme: 'ou' (Okamoto-Uchiyama, heu only) or 'paillier'"
    )
    he_key_bits: int = Field(default=2048, ge=512, le=8192, description="HE key size in bits")
    frac_bits: int = Field(default=20, ge=0, le=52, description="fixed-point fractional bits over Z_2^64")
    max_message_bytes: int = Field(
        default=1 << 30, ge=1024, description="largest single wire message accepted (bytes)"
    )
    aead_cipher: Literal["aes-256-gcm", "chacha20-poly1305"] = Field(
        default="aes-256-gcm", description="AEAD cipher for secure sessions"
    )
    log_level: str = Field(default="INFO", description="log level for the 'veil' loggers")

    @field_validator("he_backend")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()


@lru_cache(maxsize=1)
def get_settings() -> VeilSettings:
    """The process-wide settings (read once from the environment). ConfigError if invalid."""
    try:
        return VeilSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"VEIL_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid veil settings: {problems}") from None


def reset_settings() -> None:
    """Forget cached settings (tests, or after changing the environment)."""
    get_settings.cache_clear()
