"""VeilSettings: defaults, VEIL_ env prefix, invalid values -> ConfigError."""

from __future__ import annotations

import pytest

from veil.config import VeilSettings, get_settings, reset_settings
from veil.errors import ConfigError


def test_defaults() -> None:
    s = VeilSettings()
    assert s.he_backend == "heu" and s.he_scheme == "ou" and s.he_key_bits == 2048
    assert s.frac_bits == 20 and s.max_message_bytes == 1 << 30 and s.aead_cipher == "aes-256-gcm"


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HE_BACKEND", " PHE ")
    monkeypatch.setenv("VEIL_FRAC_BITS", "16")
    reset_settings()
    try:
        s = get_settings()
        assert s.he_backend == "phe" and s.frac_bits == 16
        assert get_settings() is s  # cached
    finally:
        monkeypatch.undo()
        reset_settings()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VEIL_FRAC_BITS", "60"),
        ("VEIL_HE_SCHEME", "rsa"),
        ("VEIL_HE_KEY_BITS", "abc"),
        ("VEIL_AEAD_CIPHER", "des"),
    ],
)
def test_invalid_env_is_config_error(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    reset_settings()
    try:
        with pytest.raises(ConfigError, match=var):
            get_settings()
    finally:
        monkeypatch.undo()
        reset_settings()
