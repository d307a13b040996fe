"""Errors of veil.serve (all below the :mod:`veil.errors` tree)."""

from __future__ import annotations

from veil.errors import ConfigError, InputError, IntegrityError, KMSError, VeilError

__all__ = [
    "InferenceInputError",
    "ModelNotFound",
    "PackageError",
    "ServeError",
    "ServiceUnavailable",
    "UnknownKey",
]


class ServeError(VeilError):
    """A serving component failed a request."""


class PackageError(IntegrityError):
    """An encrypted model package is malformed, tampered, too large or fails its signature."""


class InferenceInputError(InputError):
    """An inference request does not match the model's input schema."""


class ModelNotFound(InputError):
    """No model with that name is served here."""


class ServiceUnavailable(ServeError):
    """No replica could answer (all dead or not ready)."""


class UnknownKey(KMSError):
    """The KMS has no (unretired) key for the requested key id."""


_ = ConfigError  # re-exported for callers that import every serve error from here
