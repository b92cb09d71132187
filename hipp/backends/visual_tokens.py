"""Visual tokens as a level of the plan, the public face: install a token budget on a model (a LLaVA
prunes before its language model, llava_tokens.py, or after one of its layers, decoder_tokens.py; a
CLIP-style image tower after a chosen layer, tower_tokens.py), run a model under one, and read the
budget a plan sets. The budget and the ranking every place shares are in token_rank.py. A model saved with save_pretrained or
open_clip keeps its weights only: `hipp.load_model` re-installs the budget an export records in
pruned_config.json.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from . import decoder_tokens, llava_tokens, tower_tokens
from .llava_tokens import kept_columns, select_features
from .token_rank import (ATTRIBUTE, RULES, VisualTokens, choose, for_plan, installed, ranking_attention, recording,
                         scores_of)

__all__ = ["RULES", "VisualTokens", "choose", "for_plan", "install", "installed", "kept_columns", "pruning",
           "ranking_attention", "recording", "scores_of", "select_features"]


def install(model: nn.Module, spec: VisualTokens | None) -> nn.Module:
    """Make `model` prune its visual tokens to `spec` (None, or every token kept: its own forward
    again): a LLaVA before its language model or after the budget's language layer, an image tower
    after the budget's layer. Returns the model."""
    for place in (llava_tokens, decoder_tokens, tower_tokens):
        place.remove(model)
    keep = spec is not None and spec.kept < spec.of
    setattr(model, ATTRIBUTE, spec if keep else None)
    if keep and spec.stage != "language":
        tower_tokens.attach(model, spec)
    elif keep and spec.rule == "text":
        decoder_tokens.attach(model, spec)
    elif keep:
        llava_tokens.attach(model)
    return model


@contextmanager
def pruning(model: nn.Module, spec: VisualTokens | None):
    """Run `model` under a token budget inside the block; the one it had comes back on exit."""
    before = installed(model)
    install(model, spec)
    try:
        yield model
    finally:
        install(model, before)
