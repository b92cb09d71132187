"""Backends: where a model family keeps its transformer blocks. Everything else is shared.

A backend (base.Backend, registered per family: open_clip, hf, llava) answers a few questions about its
models: its stages (blocks, tokens per sample, FLOPs and parameters outside the blocks), block
shapes, input sizes, and how to wrap one block in the project's gated classes. The functions here —
the prune space, the swap to prunable blocks, attaching gates — work the same for every backend on
top of those answers.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ..errors import HippError
from .base import Backend, DualEncoder, Stage, backend_for, register, registered, unregister
from .base import get as get_backend
from .modules import DroppedBlock, GatedBlock, carry_hooks
from . import visual_tokens
from .token_rank import row_flops
from ..core.gates import map_gates
from ..core.space import LayerSpec, PruneSpace

__all__ = ["Backend", "DualEncoder", "Stage", "backend_for", "get_backend", "register", "registered", "unregister",
           "tower_blocks", "image_size", "context_length", "num_params", "describe", "dense_flops",
           "make_prunable", "prunable_blocks", "set_gates", "gated", "clear_gates"]


def tower_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    return backend_for(model).blocks(model)


def image_size(model: nn.Module) -> int:
    return backend_for(model).image_size(model)


def context_length(model: nn.Module) -> int:
    return backend_for(model).context_length(model)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: nn.Module, channel_group: int = 1, tokens: bool | str = False) -> PruneSpace:
    """The prune space of a model, plain or prunable; with `tokens`, also its backend's token levels
    (True: ranked by its default rule; a rule's name: by that one).

    Also describes a materialised (pruned) model as it is: its layers keep their original indices,
    dropped layers (DroppedBlock) are left out, so `dense_costs()` is that model's own cost through
    the same PruneSpace.costs that prices plans.
    """
    b = backend_for(model)
    stages = b.stages(model)
    fixed = {n: s.fixed_flops for n, s in stages.items()}
    budget = visual_tokens.installed(model)
    # a budget pruning after a layer shortens the later ones (before a LLaVA's language model, its stages say)
    within = budget if budget is not None and budget.after >= 0 else None
    layers = []
    for name, stage in stages.items():
        for i, block in enumerate(stage.blocks):
            if within is not None and (name, i) == (within.stage, within.layer):
                attn = visual_tokens.ranking_attention(block)  # the attention row it ranks by
                fixed[name] += 0.0 if attn is None else row_flops(attn.num_heads, attn.head_dim, stage.tokens)
            if isinstance(block, DroppedBlock):
                continue
            width, heads, head_dim, hidden = b.block_shape(block)
            layers.append(LayerSpec(name, i, width, heads, head_dim, hidden,
                                    stage.tokens - (within.shed_at(name, i) if within else 0),
                                    channel_group, **b.layer_fields(block)))
    levels = b.token_levels(model, None if tokens is True else tokens) if tokens else ()
    if tokens and not levels:
        raise HippError(f"a {b.name} model has no token level to prune (it needs a class token to rank by)")
    return PruneSpace(tuple(layers), fixed, {n: float(s.fixed_params) for n, s in stages.items()}, tuple(levels))


def dense_flops(model: nn.Module) -> dict[str, float]:
    return {t: v for t, v in describe(model).dense_costs().items() if t.startswith("flops/")}


def make_prunable(model: nn.Module, channel_group: int = 1, tokens: bool | str = False) -> PruneSpace:
    """Swap every block of both towers for its gated class in place (parameters shared, keys unchanged).

    Calling it again only changes the channel grouping. Returns the prune space, whose layer order
    (image layers, then text layers) is the order set_gates expects; with `tokens`, the space also
    holds the backend's token levels.
    """
    if not isinstance(channel_group, int) or channel_group < 1:
        raise HippError(f"channel_group must be a positive integer, got {channel_group!r}")
    b = backend_for(model)
    swaps = []  # build every replacement first, so a failure leaves the model untouched
    for tower, resblocks in b.blocks(model).items():
        for i, block in enumerate(resblocks):
            if isinstance(block, GatedBlock):
                swaps.append((resblocks, i, block))
                continue
            try:
                swaps.append((resblocks, i, b.gated_block(block, channel_group)))
            except (AttributeError, ValueError) as e:
                raise HippError(f"{tower} block {i} ({type(block).__name__}) cannot be made prunable: {e}") from None
    for resblocks, i, block in swaps:
        block.mlp.channel_group = channel_group
        resblocks[i] = carry_hooks(resblocks[i], block)
    return describe(model, channel_group, tokens)


def prunable_blocks(model: nn.Module) -> list[GatedBlock]:
    """The gated blocks in prune-space order: all image layers, then all text layers."""
    blocks = [blk for resblocks in tower_blocks(model).values() for blk in resblocks]
    if not all(isinstance(blk, GatedBlock) for blk in blocks):
        raise HippError("model is not prunable: call make_prunable(model) first")
    return blocks


def set_gates(model: nn.Module, layer_keep=None, head_keep=None, channel_keep=None) -> None:
    """Attach gates (soft or hard, optionally with a leading batch dimension) to every block.

    Same triple as PruneSpace.costs: layer_keep [..., L]; head_keep / channel_keep lists of
    [..., num_heads] / [..., num_channel_gates] per layer. None leaves that kind ungated.
    The tensors are used as given (no copy), so gradients flow back to them.
    """
    blocks = prunable_blocks(model)
    n = len(blocks)
    if layer_keep is not None and layer_keep.shape[-1:] != (n,):
        raise HippError(f"layer_keep must end in {n} layers, got shape {tuple(layer_keep.shape)}")
    for name, gates in (("head_keep", head_keep), ("channel_keep", channel_keep)):
        if gates is not None and len(gates) != n:
            raise HippError(f"{name} must hold one tensor per layer ({n}), got {len(gates)}")
    for i, block in enumerate(blocks):
        heads = head_keep[i] if head_keep is not None else None
        chans = channel_keep[i] if channel_keep is not None else None
        if heads is not None and heads.shape[-1:] != (block.attn.units,):
            raise HippError(f"head_keep[{i}] must end in {block.attn.units}, got {tuple(heads.shape)}")
        groups = -(-block.mlp.hidden // block.mlp.channel_group)
        if chans is not None and chans.shape[-1:] != (groups,):
            raise HippError(f"channel_keep[{i}] must end in {groups}, got {tuple(chans.shape)}")
        block.set_gates(layer_keep[..., i] if layer_keep is not None else None, heads, chans)


@contextmanager
def gated(model: nn.Module, gates):
    """Run `model` under `gates` (the triple set_gates takes, e.g. a Plan's `.gates`) inside the block;
    whatever gates the blocks held before come back on exit, also when the block raises."""
    blocks = prunable_blocks(model)
    saved = [(b.layer_gate, b.attn.head_gate, b.mlp.channel_gate) for b in blocks]
    try:
        set_gates(model, *gates)  # inside: a shape refused at block i leaves blocks before it gated
        yield model
    finally:
        for block, before in zip(blocks, saved):
            block.set_gates(*before)


@contextmanager
def hard_plan(model: nn.Module, plan):
    """Run `model` as a hard plan prunes it inside the block: its gates (as float32 where the model
    lives) and its visual-token budget, as its materialised copy computes."""
    import torch

    device = next(model.parameters()).device
    gates = map_gates(lambda t: t.to(device, torch.float32), plan.gates)
    with gated(model, gates), visual_tokens.pruning(model, visual_tokens.for_plan(plan)):
        yield model


def clear_gates(model: nn.Module) -> None:
    """Remove all gates: the model computes exactly its dense forward again."""
    for block in prunable_blocks(model):
        block.set_gates(None, None, None)
