"""Visual tokens leaving inside a LLaVA's language model (FastV-style, rule "text"): every language
layer up to K sees the whole prompt; the prompt's last token's attention in layer K, summed over the
key/value groups the plan keeps there (token_rank.py), ranks each image's tokens, and layers after K
see only the text and the k best image tokens of each image.

Hooks on the language layers do it, so hard-gated and materialised models run the same code: layer
K records the row and gathers the kept positions from its output; each later layer gets its rotary
embeddings, position ids and mask narrowed to them (the KV cache of those layers then holds the
shorter sequence, the earlier layers' the whole one; decoding keeps the prompt's positions, as
FastV does); the last layer scatters its output back to the prompt's length, with zeros at the
pruned positions, so logits line up with the input ids for every caller. The model's `forward` is
patched to tell the hooks where the image tokens are (a prefill) or that a decoding step runs.

Training a controller that chooses the count (`weighing`) keeps every position instead: layer K ranks
alike, and each later layer's attention weighs an image token's key by its chunk's gate
(hipp/core/token_gates.py). With 0/1 gates the text's outputs are those of the dropped tokens, since
positions are kept as FastV keeps them and the causal mask hides the rest.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import nn

from ..core import token_gates
from ..core.space import TokenLevel
from ..errors import HippError
from .base import backend_for
from .token_rank import VisualTokens, choose, recorded, record_from, row_flops, scores_of


RULE = "text"  # also the one rule a controller can learn a count under: its soft weights equal dropping


def default_after(layers: int) -> int:
    """FastV keeps LLaVA-1.5's first 2 of 32 layers whole (prunes after layer index 1); scaled to the
    decoder's depth, never before layer 1 when there are three or more: on the 4-layer teacher's
    validation data, pruning after layer 1 kept more than after layer 0 (docs/studies/visual-tokens.md)."""
    return min(max(1, round(layers / 16) - 1), layers - 2)


def level(model: nn.Module, after: int | None = None) -> TokenLevel:
    """The token level of a LLaVA pruning its image tokens after language layer `after`; the ranking
    row costs one query over the declared prompt per query head of each kept key/value group."""
    from .llava_tokens import image_tokens

    blocks = backend_for(model).blocks(model)["language"]
    after = default_after(len(blocks)) if after is None else after
    if not 0 <= after < len(blocks) - 1:
        raise HippError(f"visual tokens can leave after language layer 0 to {len(blocks) - 2}, not {after}")
    text = model.model.language_model.config
    group = text.num_attention_heads // text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    prompt = backend_for(model).context_length(model)
    return TokenLevel("language", image_tokens(model), after=after, rule=RULE, rank_stage="language",
                      rank_layer=after, rank_flops=row_flops(group, head_dim, prompt))


def _positions(keep: torch.Tensor) -> torch.Tensor:
    """[B, n] the kept positions of each row, ascending (every row keeps as many)."""
    return keep.nonzero()[:, 1].reshape(keep.shape[0], -1)


def _narrow(t: torch.Tensor, dim: int, idx: torch.Tensor, full: int) -> torch.Tensor:
    """`t` with its positions along `dim` (the prompt's `full` ones, then decoded ones, all kept)
    narrowed to idx [B, n]; a batch dimension of 1 is broadcast first. Shorter: a decoding step's."""
    length = t.shape[dim]
    if length < full:
        return t
    batch = idx.shape[0]
    idx = torch.cat([idx, torch.arange(full, length, device=idx.device).expand(batch, -1)], dim=1)
    t = t.expand(batch, *t.shape[1:]).movedim(dim, 1)
    view = idx.reshape(batch, -1, *([1] * (t.dim() - 2))).expand(batch, idx.shape[1], *t.shape[2:])
    return t.gather(1, view).movedim(1, dim)


class DropTokens:
    """The hooks' shared state: the image positions of the prefill running now, and the positions
    the layers after K kept in the last prefill."""

    def __init__(self, spec: VisualTokens, image_token_id: int):
        self.spec, self.image_token_id = spec, image_token_id
        self.image = self.valid = self.keep = None
        self.seen = 0  # positions of the sequence so far, pruned ones included

    def start(self, input_ids, attention_mask, prefill: bool, cached: bool):
        """Note what runs now; for a decoding step, the position ids of its tokens."""
        if prefill:
            if input_ids is None:
                raise HippError("visual-token pruning needs input_ids (the prompt's image placeholders), not inputs_embeds")
            self.image, self.keep = input_ids == self.image_token_id, None
            self.valid = None if attention_mask is None else attention_mask.bool()
            self.seen = input_ids.shape[1]
            return None
        self.image = None
        if not cached or self.keep is None or input_ids is None:  # a new text-only sequence: nothing was pruned
            self.keep = None
            return None
        # transformers would read the position from the cache's layer 0, which is one of the shorter
        # ones when the plan leaves no attention up to layer K
        positions = torch.arange(self.seen, self.seen + input_ids.shape[1], device=input_ids.device)[None]
        self.seen += input_ids.shape[1]
        return positions

    # --- layer K ---
    def rank_before(self, block: nn.Module, args) -> None:
        if self.image is not None:
            record_from(block, query=-1)

    def rank_after(self, block: nn.Module, args, output):
        attn, rows = recorded(block)
        if self.image is None:
            return output
        x = output[0] if isinstance(output, tuple) else output
        batch, of = x.shape[0], self.spec.of
        runs = _image_runs(self.image, of)
        scores = scores_of(rows, attn, self.valid).gather(1, runs.reshape(batch, -1)).reshape_as(runs) if rows else None
        kept = runs.gather(1, choose(scores, runs.shape[0], of, self.spec.kept, x.device))
        self.keep = ~self.image
        self.keep[torch.arange(batch, device=x.device).repeat_interleave(kept.numel() // batch), kept.flatten()] = True
        short = x.gather(1, _positions(self.keep).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return (short, *output[1:]) if isinstance(output, tuple) else short

    # --- the layers after K ---
    def narrow(self, block: nn.Module, args, kwargs):
        if self.keep is None:
            return None
        idx, full = _positions(self.keep), self.keep.shape[1]
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(_narrow(t, 1, idx, full) for t in cos_sin)
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = _narrow(kwargs["position_ids"], 1, idx, full)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):  # [B, 1, queries, keys]
            kwargs["attention_mask"] = _narrow(_narrow(mask, 2, idx, full), 3, idx, full)
        return args, kwargs

    def restore(self, block: nn.Module, args, output):
        if self.image is None or self.keep is None:
            return output
        x = output[0] if isinstance(output, tuple) else output
        full = x.new_zeros(*self.keep.shape, x.shape[-1])
        full[self.keep] = x.reshape(-1, x.shape[-1])
        return (full, *output[1:]) if isinstance(output, tuple) else full


def _forward(self, input_ids=None, pixel_values=None, attention_mask=None, cache=None, position_ids=None, **kwargs):
    past = cache if cache is not None else kwargs.get("past_key_values")
    cached = past is not None and past.get_seq_length() > 0
    positions = self.hipp_drop_tokens.start(input_ids, attention_mask, pixel_values is not None, cached)
    return type(self).forward(self, input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              cache=cache, position_ids=position_ids if position_ids is not None else positions,
                              **kwargs)


def attach(model: nn.Module, spec: VisualTokens) -> None:
    blocks = backend_for(model).blocks(model)["language"]
    if not 0 <= spec.layer < len(blocks) - 1:
        raise HippError(f"the model has no language layer {spec.layer} to prune tokens after (0 to {len(blocks) - 2})")
    hooks = DropTokens(spec, model.config.image_token_id)
    blocks[spec.layer].register_forward_pre_hook(hooks.rank_before)
    blocks[spec.layer].register_forward_hook(hooks.rank_after)
    for block in blocks[spec.layer + 1:]:
        block.register_forward_pre_hook(hooks.narrow, with_kwargs=True)
    blocks[-1].register_forward_hook(hooks.restore)
    model.hipp_drop_tokens = hooks
    model.forward = types.MethodType(_forward, model)


def remove(model: nn.Module) -> None:
    """Take every DropTokens hook off the model's modules, and the forward patch."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), DropTokens)]:
                del hooks[key]
    if "hipp_drop_tokens" in model.__dict__:
        del model.hipp_drop_tokens
        model.__dict__.pop("forward", None)


def _image_runs(image: torch.Tensor, of: int) -> torch.Tensor:
    """[runs, of] the positions of each image's tokens in the prompt, or one line saying they do not fit."""
    batch = image.shape[0]
    positions = _positions(image) if image.any() else image.new_zeros(batch, 0, dtype=torch.long)
    if positions.shape[1] % of or not positions.shape[1]:
        raise HippError(f"the prompt holds {positions.shape[1]} image tokens per row; the token budget is for "
                        f"{of} per image")
    return positions.reshape(batch * (positions.shape[1] // of), of)


@contextmanager
def weighing(model: nn.Module, level: TokenLevel, chunks: torch.Tensor, input_ids: torch.Tensor, attention_mask=None):
    """Run the prefill of `input_ids` with the image tokens after language layer `level.after` weighed
    by `chunks` [G] (kept chunks, soft or 0/1), ranked as DropTokens ranks them."""
    blocks = backend_for(model).blocks(model)["language"]
    image = input_ids == model.config.image_token_id
    valid = None if attention_mask is None else attention_mask.bool()
    runs = _image_runs(image, level.tokens)
    later = [b.attn for b in blocks[level.after + 1:] if hasattr(b, "attn")]

    def rank(block, args, output):
        attn, rows = recorded(block)
        if rows:
            scores = scores_of(rows, attn, valid).gather(1, runs.reshape(image.shape[0], -1))
            order = scores.reshape_as(runs).argsort(dim=-1, descending=True, stable=True)
            w = token_gates.token_weights(order.argsort(dim=-1), chunks, level.tokens)
        else:  # no attention to rank by: the evenly spaced tokens of the hard count, as DropTokens keeps
            k = int(token_gates.kept_count(chunks.detach().round(), level.tokens))
            kept = choose(None, runs.shape[0], level.tokens, k, input_ids.device)
            w = chunks.new_zeros(runs.shape).scatter(1, kept, 1.0)
        weight = torch.ones(image.shape, dtype=w.dtype, device=w.device)
        weight = weight.masked_scatter(image, w.reshape(-1))
        for attn in later:
            attn.key_weight = weight
        return output

    handles = [blocks[level.after].register_forward_pre_hook(lambda block, args: record_from(block, query=-1)),
               blocks[level.after].register_forward_hook(rank)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for attn in later:
            attn.key_weight = None
        recorded(blocks[level.after])
