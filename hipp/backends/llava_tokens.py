"""Visual tokens of a LLaVA: only the k image tokens its vision tower's class token attends to most
(token_rank.py) are projected and passed on to the language model (FoPru / HiPrune-style).

The vision tower runs on every patch; the class token's row in the layer whose output LLaVA takes as
features ranks them; the kept ones stay in their original order. The language model then sees a
shorter prompt: of each image's run of placeholder tokens the first k stay and receive the kept
features, the rest leave the sequence (with their attention-mask columns), so positions, the KV cache
and generation are those of a prompt with k image tokens. `attach` makes a model do this itself in
`forward` and `generate`; `generate` hands back the caller's prompt ids in front of the new tokens,
as transformers does.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..core.space import TokenLevel
from ..errors import HippError
from .token_rank import ATTRIBUTE, VisualTokens, choose, ranking_attention, recording, row_flops, scores_of


def vision(model: nn.Module) -> nn.Module:
    """The module holding the vision tower's embeddings and encoder (transformers 5 flattened
    CLIPVisionModel; SiglipVisionModel still nests a vision_model)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)


def image_tokens(model: nn.Module) -> int:
    """Image features LLaVA puts into the prompt: the tower's positions, less CLIP's class token
    under the "default" feature selection."""
    positions = vision(model).embeddings.num_positions
    return positions - (model.config.vision_feature_select_strategy == "default")


def _feature_layers(model: nn.Module) -> list[int]:
    layers = model.config.vision_feature_layer
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def rank_layer(model: nn.Module) -> int:
    """The vision layer whose output is the (last) image feature LLaVA takes; -1 when that is the
    embeddings' output, which no attention precedes."""
    n = len(vision(model).encoder.layers)
    return max(h % (n + 1) for h in _feature_layers(model)) - 1


def token_level(model: nn.Module) -> TokenLevel:
    """The LLaVA's token level for the prune space: its image tokens, dropped before every language
    layer; the projector is paid per kept token, the ranking per kept head of the rank layer."""
    tower = vision(model)
    image = image_tokens(model)
    projector = model.model.multi_modal_projector
    per_token = 2.0 * sum(lin.in_features * lin.out_features for lin in (projector.linear_1, projector.linear_2))
    layer = rank_layer(model)
    attn = tower.encoder.layers[layer].self_attn if layer >= 0 else None
    rank = row_flops(1, attn.head_dim, tower.embeddings.num_positions) if attn is not None else 0.0
    return TokenLevel("language", image, rule="cls", fixed_stage="vision", per_token_flops=per_token,
                      rank_stage="vision", rank_layer=layer, rank_flops=rank)


def rank_attention(model: nn.Module, layer: int):
    """The rank layer's attention when the model (as gated or materialised now) still computes one."""
    if layer < 0:
        return None
    return ranking_attention(vision(model).encoder.layers[layer])


def select_features(model: nn.Module, pixel_values: torch.Tensor, spec: VisualTokens) -> torch.Tensor:
    """[images, k, D] projected features of the kept tokens."""
    inner = model.model
    attn = rank_attention(model, spec.layer)
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


def attach(model: nn.Module) -> None:
    """Make `model` prune to its installed budget (token_rank.ATTRIBUTE) in forward and generate."""
    model.forward = types.MethodType(_forward, model)
    model.generate = types.MethodType(_generate, model)


def remove(model: nn.Module) -> None:
    for name in ("forward", "generate"):
        model.__dict__.pop(name, None)
