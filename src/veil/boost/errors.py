"""Errors of veil.boost (all below :class:`veil.errors.VeilError`)."""

from __future__ import annotations

from veil.errors import ConfigError, InputError, ProtocolError


class BoostConfigError(ConfigError):
    """Invalid training / prediction parameters, or parameters the two parties disagree on."""


class BoostInputError(InputError):
    """Bad training data: non-numeric column, missing label, mismatched ids, empty intersection."""


class BoostProtocolError(ProtocolError):
    """The peer sent something the boost protocol did not expect at this stage."""
