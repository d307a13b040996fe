"""veil.crypto: the fenced cryptography package (randomness, AEAD, HE, sharing, conversions, PSI)."""
