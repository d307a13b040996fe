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


def openapi_error_responses() -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses=`` for the error answers every veil.serve HTTP service may give."""
    schema = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "kind": {"type": "string"}},
        "required": ["error"],
    }
    content = {"application/json": {"schema": schema}}
    return {
        400: {"description": "Bad input (a veil InputError / ProtocolError)", "content": content},
        403: {
            "description": "Refused: missing/wrong admin token, or attestation refused",
            "content": content,
        },
        404: {"description": "Unknown model, key or replica", "content": content},
        409: {"description": "Conflict (e.g. key id already registered)", "content": content},
        413: {"description": "Request body too large (veil.limits)", "content": content},
        429: {
            "description": "Too many concurrent sessions / requests for this client (veil.limits)",
            "content": content,
        },
        503: {"description": "No ready replica / worker not ready", "content": content},
        504: {"description": "Gateway timeout: no answer within request_timeout_s", "content": content},
    }
