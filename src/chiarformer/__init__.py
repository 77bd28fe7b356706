"""CHIAR-Former: route each token by spectral entropy to DCT mixing or causal attention."""

from .config import ChiarConfig

__all__ = ["ChiarConfig"]
