"""CHIAR-Former: route each token by spectral entropy to DCT mixing or causal attention."""

from .config import ChiarConfig
from .model import ChiarForCausalLM, ChiarForSequenceClassification

__all__ = ["ChiarConfig", "ChiarForCausalLM", "ChiarForSequenceClassification"]
