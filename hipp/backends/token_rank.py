"""A token budget and the training-free rules that rank tokens by it: one query's attention row in
one layer, summed over the attention units the plan keeps there (their gates weigh them), so that a
hard-gated model and its materialised copy rank alike. The query is the vision tower's class token
(rule "cls") or, inside a LLaVA's language model, the prompt's last token (rule "text", FastV-style).
Where the plan leaves that layer no attention, evenly spaced tokens are kept. Used by every place
tokens are pruned: before a LLaVA's language model (llava_tokens.py), inside it (decoder_tokens.py)
and inside a CLIP image tower (tower_tokens.py)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import HippError
from .modules import DroppedBlock

RULES = ("cls", "text")
ATTRIBUTE = "hipp_visual_tokens"  # where an installed budget rides on the model


@dataclass(frozen=True)
class VisualTokens:
    """A token budget: keep `kept` of each image's `of` tokens, ranked by `rule` at layer `layer` of
    `rank_stage`: for an image tower (`stage` its name) after its layer `layer`; for a LLaVA (`stage`
    "language") before the language model under "cls" (ranked at vision layer `layer`), after its
    layer `layer` under "text"."""
    kept: int
    of: int
    layer: int
    rule: str = "cls"
    stage: str = "language"

    def __post_init__(self):
        if self.rule not in RULES:
            raise HippError(f"unknown visual-token rule {self.rule!r}; expected one of {', '.join(RULES)}")
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not (whole(self.of) and whole(self.layer) and isinstance(self.stage, str)):
            raise HippError(f"a visual-token budget needs whole numbers of tokens and a layer, got "
                            f"of={self.of!r}, layer={self.layer!r}")
        if not whole(self.kept) or not 1 <= self.kept <= self.of:
            raise HippError(f"visual tokens kept must be a whole number from 1 to {self.of}, got {self.kept!r}")

    @property
    def rank_stage(self) -> str:
        return "vision" if self.stage == "language" and self.rule == "cls" else self.stage

    @property
    def after(self) -> int:
        """The layer of `stage` after which tokens leave (-1: before its first)."""
        return self.layer if self.rank_stage == self.stage else -1

    def shed_at(self, stage: str, index: int) -> int:
        """Tokens that layer `index` of `stage` no longer sees."""
        return self.of - self.kept if stage == self.stage and index > self.after else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "visual_tokens") -> "VisualTokens":
        try:
            return cls(**{k: d[k] for k in ("kept", "of", "layer", "rule")}, stage=d.get("stage", "language"))
        except (KeyError, TypeError):
            raise HippError(f"{where} needs kept, of, layer and rule") from None


def row_flops(heads: int, head_dim: int, positions: int) -> float:
    """FLOPs of the class token's attention row over `positions` keys in `heads` heads (one query
    against every key: 2 per multiply-accumulate, as torch.utils.flop_counter counts)."""
    return 2.0 * heads * head_dim * positions


def ranking_attention(block: nn.Module):
    """The block's attention, unless the block (as gated or materialised now) computes none."""
    if isinstance(block, DroppedBlock) or not hasattr(block, "attn") or block.attn.empty:
        return None
    gate = getattr(block, "layer_gate", None)
    heads = block.attn.head_gate
    if (gate is not None and not bool(torch.as_tensor(gate).ne(0).any())) or \
            (heads is not None and not bool(heads.ne(0).any())):
        return None  # hard-gated away: its materialised copy has no such attention
    return block.attn


@contextmanager
def recording(attn):
    if attn is None:
        yield None
        return
    attn.cls_row = []
    try:
        yield attn.cls_row
    finally:
        attn.cls_row = None


def record_from(block: nn.Module, query: int = 0) -> None:
    """Have the block's attention (if it computes one) record query `query`'s row in its next forward."""
    attn = ranking_attention(block)
    if attn is not None:
        attn.cls_row, attn.row_query = [], query


def recorded(block: nn.Module):
    """(the block's ranking attention or None, the rows it recorded or None); recording stops."""
    attn = ranking_attention(block)
    rows = None if attn is None else attn.cls_row
    if attn is not None:
        attn.cls_row, attn.row_query = None, 0
    return attn, rows


def scores_of(rows: list, attn, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] the recorded query's attention, summed over the (gate-weighted) attention units;
    `valid` [B, T] bool leaves padding out of the softmax."""
    logits = rows[-1]  # [B, H, T]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = logits.softmax(-1)
    b, h, t = probs.shape
    per_unit = probs.reshape(b, attn.units, h // attn.units, t).sum(2)  # [B, U, T]
    gate = attn.head_gate
    if gate is not None:
        per_unit = per_unit * gate.to(per_unit.dtype).reshape(gate.shape[:-1] + (attn.units, 1))
    return per_unit.sum(1)


def choose(scores: torch.Tensor | None, batch: int, n: int, k: int, device) -> torch.Tensor:
    """[B, k] indices of the kept tokens, ascending."""
    if scores is None:  # evenly spaced
        idx = ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * n / k).long()
        return idx.expand(batch, k)
    return scores.topk(k, dim=-1).indices.sort(-1).values


def installed(model: nn.Module) -> VisualTokens | None:
    return getattr(model, ATTRIBUTE, None)


def for_plan(plan) -> VisualTokens | None:
    """The budget a plan sets (None when it keeps every token or has no token level)."""
    for level, k in zip(plan.space.tokens, plan.token_keep.tolist()):
        if k < level.tokens:
            return VisualTokens(int(k), level.tokens, level.rank_layer, level.rule, level.stage)
    return None
