"""One exception tree for all of veil.

Every error a user can cause or meet is a :class:`VeilError`; the CLI turns it into one clear
line and a non-zero exit code. Engines may add subclasses in their own packages, but always
below one of these.
"""

from __future__ import annotations


class VeilError(Exception):
    """Root of every error veil raises on purpose."""

    exit_code: int = 1


class ConfigError(VeilError):
    """Invalid configuration or command-line options."""

    exit_code = 2


class InputError(VeilError):
    """Bad user input: a missing file, a malformed table, a non-numeric column, ..."""

    exit_code = 2


class ResourceLimitError(VeilError):
    """A configured limit (message size, rows, sequence length, sessions) was exceeded."""


class CryptoError(VeilError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError):
    """Authenticated decryption failed: tampered, replayed, reordered, truncated or wrong key."""


class HEError(CryptoError):
    """A homomorphic-encryption operation failed or a value is out of the plaintext range."""


class AttestationError(VeilError):
    """Evidence was refused by a verifier policy, or could not be produced."""


class ChannelError(VeilError):
    """A transport problem between two parties."""


class ChannelTimeout(ChannelError):
    """A receive waited longer than its timeout."""


class ChannelClosed(ChannelError):
    """The peer closed the channel or the connection was lost."""


class PeerError(ChannelError):
    """The peer reported a failure and aborted the protocol."""


class ProtocolError(VeilError):
    """A message arrived in the wrong stage, of the wrong type, or with an invalid payload."""


class IntegrityError(VeilError):
    """A stored artefact (model, package, checkpoint) failed its integrity check."""


class KMSError(VeilError):
    """The key management service refused or failed a request."""
