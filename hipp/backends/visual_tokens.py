"""Visual tokens as a level of the plan: a LLaVA passes on only the k image tokens its vision tower's
class token attends to most (FoPru / HiPrune-style ranking, before the language model); a CLIP-style
image tower keeps the k patches its class token attends to most after a chosen layer (EViT-style,
backends/tower_tokens.py). This module holds the budget, the ranking and the LLaVA path.

The ranking is training-free and computed in the forward pass: the class token's attention row in
the vision layer whose output LLaVA takes as image features (`rank_layer`), summed over the heads the
plan keeps there, so that a hard-gated model and its materialised copy rank alike. When the plan
drops that layer or all its heads, no attention is left to rank by and k evenly spaced tokens are
kept instead. The kept tokens stay in their original order.

The language model then sees a shorter prompt: of each image's run of placeholder tokens the first k
stay and receive the kept features, the rest leave the sequence (with their attention-mask
columns), so positions, the KV cache and generation are those of a prompt with k image tokens.
`install` makes a model do this itself in `forward` and `generate`; `generate` hands back the
caller's prompt ids in front of the new tokens, as transformers does. A model saved with
save_pretrained keeps its weights only: `hipp.load_model` re-installs the token budget an export
records in pruned_config.json.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.space import TokenLevel
from ..errors import HippError
from .modules import DroppedBlock

RULES = ("cls",)
ATTRIBUTE = "hipp_visual_tokens"  # where an installed budget rides on the model


@dataclass(frozen=True)
class VisualTokens:
    """A token budget: keep `kept` of each image's `of` tokens, ranked by `rule` at vision layer `layer`;
    for a LLaVA (`stage` "language") before the language model, for an image tower (`stage` its name)
    after its layer `layer`."""
    kept: int
    of: int
    layer: int
    rule: str = "cls"
    stage: str = "language"

    def __post_init__(self):
        if self.rule not in RULES:
            raise HippError(f"unknown visual-token rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if isinstance(self.kept, bool) or not isinstance(self.kept, int) or not 1 <= self.kept <= self.of:
            raise HippError(f"visual tokens kept must be a whole number from 1 to {self.of}, got {self.kept!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "visual_tokens") -> "VisualTokens":
        try:
            return cls(**{k: d[k] for k in ("kept", "of", "layer", "rule")}, stage=d.get("stage", "language"))
        except (KeyError, TypeError):
            raise HippError(f"{where} needs kept, of, layer and rule") from None


def _vision(model: nn.Module) -> nn.Module:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def _feature_layers(model: nn.Module) -> list[int]:
    layers = model.config.vision_feature_layer
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def rank_layer(model: nn.Module) -> int:
    """The vision layer whose output is the (last) image feature LLaVA takes; -1 when that is the
    embeddings' output, which no attention precedes."""
    n = len(_vision(model).encoder.layers)
    return max(h % (n + 1) for h in _feature_layers(model)) - 1


def token_level(model: nn.Module) -> TokenLevel:
    """The LLaVA's token level for the prune space: its image tokens, dropped before every language
    layer; the projector is paid per kept token, the ranking per kept head of the rank layer."""
    from .llava import LlavaBackend

    vision = _vision(model)
    image = LlavaBackend.image_tokens(model)
    projector = model.model.multi_modal_projector
    per_token = 2.0 * sum(lin.in_features * lin.out_features for lin in (projector.linear_1, projector.linear_2))
    layer = rank_layer(model)
    attn = vision.encoder.layers[layer].self_attn if layer >= 0 else None
    rank = 2.0 * attn.head_dim * vision.embeddings.num_positions if attn is not None else 0.0
    return TokenLevel("language", image, rule="cls", fixed_stage="vision", per_token_flops=per_token,
                      rank_stage="vision", rank_layer=layer, rank_flops=rank)


# --- ranking ---

def _ranking_attention(model: nn.Module, layer: int):
    """The rank layer's attention when the model (as gated or materialised now) still computes one."""
    if layer < 0:
        return None
    return ranking_attention(_vision(model).encoder.layers[layer])


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


def scores_of(rows: list, attn) -> torch.Tensor:
    """[B, T] class-token attention summed over the (gate-weighted) attention units."""
    probs = rows[-1]  # [B, H, T]
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


def select_features(model: nn.Module, pixel_values: torch.Tensor, spec: VisualTokens) -> torch.Tensor:
    """[images, k, D] projected features of the kept tokens."""
    inner = model.model
    attn = _ranking_attention(model, spec.layer)
    with recording(attn) as rows:
        out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = torch.cat([out.hidden_states[h] for h in _feature_layers(model)], dim=-1)
    scores = scores_of(rows, attn) if attn is not None else None
    if model.config.vision_feature_select_strategy == "default":  # the class token is no image feature
        hidden = hidden[:, 1:]
        scores = None if scores is None else scores[:, 1:]
    n = hidden.shape[1]
    if n != spec.of:
        raise HippError(f"the vision tower gives {n} image tokens; the token budget is for {spec.of}")
    idx = choose(scores, hidden.shape[0], n, spec.kept, hidden.device)
    kept = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return inner.multi_modal_projector(kept)


def kept_columns(model: nn.Module, input_ids: torch.Tensor, spec: VisualTokens) -> torch.Tensor:
    """[B, L] bool: the prompt positions that stay. Of each image's run of `of` placeholders the first
    `kept` stay (they receive the kept features, in order); every other position stays."""
    is_image = input_ids == model.config.image_token_id
    run = (is_image.long().cumsum(1) - 1) % spec.of
    keep = ~(is_image & (run >= spec.kept))
    lengths = keep.sum(1)
    if bool((lengths != lengths[0]).any()):
        raise HippError("with visual-token pruning every prompt of a batch needs the same number of images")
    return keep


def shorten(model: nn.Module, input_ids: torch.Tensor, attention_mask, spec: VisualTokens):
    """The prompt without the placeholders of the pruned tokens (kept_columns)."""
    keep = kept_columns(model, input_ids, spec)
    rows = input_ids.shape[0]
    ids = input_ids[keep].reshape(rows, -1)
    mask = None if attention_mask is None else attention_mask[keep].reshape(rows, -1)
    return ids, mask


def prune_inputs(model: nn.Module, input_ids, pixel_values, attention_mask, spec: VisualTokens):
    """(input ids, attention mask, mm_encoder_outputs) of the shortened prompt, for LLaVA's own
    forward and generate."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if input_ids is None:
        raise HippError("visual-token pruning needs input_ids (the prompt's image placeholders), not inputs_embeds")
    features = select_features(model, pixel_values, spec)
    ids, mask = shorten(model, input_ids, attention_mask, spec)
    return ids, mask, {"image": BaseModelOutputWithPooling(pooler_output=list(features))}


# --- installing a budget on a model ---

def _forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
             inputs_embeds=None, mm_encoder_outputs=None, **kwargs):
    spec = getattr(self, ATTRIBUTE)
    if pixel_values is not None:
        if position_ids is not None:
            raise HippError("visual-token pruning sets the positions itself; pass no position_ids with pixel_values")
        input_ids, attention_mask, mm_encoder_outputs = prune_inputs(self, input_ids, pixel_values, attention_mask, spec)
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs, **kwargs)


def _generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
    if pixel_values is None:
        return type(self).generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    ids, mask, encoded = prune_inputs(self, input_ids, pixel_values, attention_mask, getattr(self, ATTRIBUTE))
    out = type(self).generate(self, input_ids=ids, attention_mask=mask, mm_encoder_outputs=encoded, **kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    full = torch.cat([input_ids, sequences[:, ids.shape[1]:]], dim=1)
    if hasattr(out, "sequences"):
        out.sequences = full
        return out
    return full


def install(model: nn.Module, spec: VisualTokens | None) -> nn.Module:
    """Make `model` prune its visual tokens to `spec` (None, or every token kept: its own forward
    again): a LLaVA in forward and generate, an image tower after the budget's layer. Returns the model."""
    from . import tower_tokens

    for name in ("forward", "generate"):
        model.__dict__.pop(name, None)
    tower_tokens.remove(model)
    keep = spec is not None and spec.kept < spec.of
    setattr(model, ATTRIBUTE, spec if keep else None)
    if keep and spec.stage != "language":
        tower_tokens.attach(model, spec)
    elif keep:
        model.forward = types.MethodType(_forward, model)
        model.generate = types.MethodType(_generate, model)
    return model


def installed(model: nn.Module) -> VisualTokens | None:
    return getattr(model, ATTRIBUTE, None)


def for_plan(plan) -> VisualTokens | None:
    """The budget a plan sets (None when it keeps every token or has no token level)."""
    for level, k in zip(plan.space.tokens, plan.token_keep.tolist()):
        if k < level.tokens:
            return VisualTokens(int(k), level.tokens, level.rank_layer, level.rule, level.stage)
    return None


@contextmanager
def pruning(model: nn.Module, spec: VisualTokens | None):
    """Run `model` under a token budget inside the block; the one it had comes back on exit."""
    before = installed(model)
    install(model, spec)
    try:
        yield model
    finally:
        install(model, before)
