"""HiPP: preference-conditioned hierarchical pruning of CLIP-style vision-language models."""
from .checkpoint import get_preprocess, get_tokenizer, load_model
from .errors import HippError

__version__ = "0.1.0"
__all__ = ["load_model", "get_tokenizer", "get_preprocess", "HippError"]
