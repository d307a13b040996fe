"""veil: train and serve ML models together without sharing data or models."""
__version__ = "0.1.0"
