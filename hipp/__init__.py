"""HiPP: preference-conditioned hierarchical pruning of vision-language models (CLIP-style dual
encoders, LLaVA-style generative models)."""
from .errors import HippError

__version__ = "0.1.0"
__all__ = ["load_model", "get_tokenizer", "get_preprocess", "load_controller", "materialize", "profile",
           "LatencyModel", "HippError"]

# Imported on first use (PEP 562): open_clip alone takes seconds to import, `hipp query --pref` needs
# only torch and the controller, and importing the package imports no torch at all, so a Ctrl-C while
# the CLI starts is caught by its handler instead of printing a traceback.
_LAZY = {"load_model": "storage.checkpoint", "get_tokenizer": "storage.checkpoint",
         "get_preprocess": "storage.checkpoint", "load_controller": "controller.files",
         "materialize": "export.slicing", "profile": "evaluation.profile", "LatencyModel": "core.latency"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
