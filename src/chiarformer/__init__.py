"""CHIAR-Former: route each token by spectral entropy to DCT mixing or causal attention."""

from .config import ChiarConfig
from .hf_registration import register_with_transformers
from .model import ChiarForCausalLM, ChiarForSequenceClassification

register_with_transformers()

__all__ = ["ChiarConfig", "ChiarForCausalLM", "ChiarForSequenceClassification"]
