"""From a hard plan to a physically smaller model (any backend), by slicing the frozen weights.

A plan is the triple PruneSpace.costs takes, with hard 0/1 values and no batch dimension:
layer_keep [L], head_keep [[num_heads]] * L, channel_keep [[num_channel_gates]] * L, in prune-space
order (image layers, then text layers). The hierarchy applies: a layer kept at 0 is dropped whatever
its heads and channels say. Kept units are sliced into the same prunable classes the gated model
uses, so a hard-gated forward and the smaller model compute the same function. A dropped layer
becomes a weightless identity (DroppedBlock), which keeps state-dict indices equal to original layer
indices and keeps a tower valid even with every layer gone.

`structure` describes the result (per tower, per layer: kept, heads, channels) in plain JSON, and
`empty_model` rebuilds a model of that shape from its backend's model_cfg, so an exported
model.safetensors loads strictly without pickles. `compensate_bias` is the optional FLAP-style
variant that folds the mean output of removed units into the output biases.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..backends import backend_for, describe, get_backend, prunable_blocks, set_gates, tower_blocks, visual_tokens
from ..errors import HippError
from ..backends.modules import DroppedBlock, GatedBlock, carry_hooks
from ..core.space import PruneSpace


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps, as indices into the original heads and MLP channels."""
    tower: str
    index: int
    kept: bool
    heads: torch.Tensor     # long, sorted
    channels: torch.Tensor  # long, sorted


# --- reading a hard plan ---

def _hard(values, what: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach()
    if t.dim() != 1:
        raise HippError(f"{what} must be one hard plan (1-D), got shape {tuple(t.shape)}")
    if not bool(((t == 0) | (t == 1)).all()):
        raise HippError(f"{what} must hold hard 0/1 values")
    return t.bool().cpu()


def _gated(model: nn.Module) -> list[tuple[str, int, GatedBlock, bool]]:
    """(tower, index, block as a gated class, was it gated already) for every block of the model.
    A plain block is wrapped (parameters shared), so the slicing below serves both."""
    b = backend_for(model)
    out = []
    for tower, resblocks in b.blocks(model).items():
        for i, block in enumerate(resblocks):
            if isinstance(block, DroppedBlock):
                raise HippError("model is already materialised; pass the full model")
            gated = isinstance(block, GatedBlock)
            out.append((tower, i, block if gated else b.gated_block(block, 1), gated))
    return out


def _channel_group(block: GatedBlock, known: bool, n_gates: int) -> int:
    hidden = block.mlp.hidden
    # a plain block has no grouping of its own: infer it from the number of gates
    group = block.mlp.channel_group if known else -(-hidden // max(n_gates, 1))
    if -(-hidden // group) != n_gates:
        raise HippError(f"{n_gates} channel gates do not fit an MLP of {hidden} channels in groups of {group}")
    return group


def layer_plans(model: nn.Module, layer_keep, head_keep, channel_keep) -> list[LayerPlan]:
    """The hard plan as kept indices per layer, in prune-space order (validated against the model)."""
    blocks = _gated(model)
    layers = _hard(layer_keep, "layer_keep")
    if len(layers) != len(blocks) or len(head_keep) != len(blocks) or len(channel_keep) != len(blocks):
        raise HippError(f"the plan must cover {len(blocks)} layers")
    plans = []
    for n, (tower, i, block, known) in enumerate(blocks):
        heads, chans = _hard(head_keep[n], f"head_keep[{n}]"), _hard(channel_keep[n], f"channel_keep[{n}]")
        if len(heads) != block.attn.units:
            raise HippError(f"head_keep[{n}] has {len(heads)} values for {block.attn.units} attention units")
        group = _channel_group(block, known, len(chans))
        per_channel = chans.repeat_interleave(group)[:block.mlp.hidden]
        plans.append(LayerPlan(tower, i, bool(layers[n]),
                               heads.nonzero().flatten(), per_channel.nonzero().flatten()))
    return plans


# --- slicing: each gated class copies out its own kept units (backends/modules.py) ---

def _dropped_like(block: GatedBlock) -> DroppedBlock:
    w = block.mlp.fc_in.weight
    return DroppedBlock(w.dtype, w.device)


def _unpack(model, layer_keep, head_keep, channel_keep):
    """Accept a Plan (anything with .gates) in place of the triple: `materialize(model, plan)`; a Plan
    must be for this model's prune space."""
    if head_keep is None and channel_keep is None and hasattr(layer_keep, "gates"):
        space = getattr(layer_keep, "space", None)
        if space is not None and space.layers:
            own = describe(model, space.layers[0].channel_group)
            if own != space.with_tokens():  # the token level is the plan's choice (which layer, which rule)
                raise HippError(f"the plan is for another model: its prune space ({_shape(space)}) is not this "
                                f"model's ({_shape(own)})")
        return layer_keep.gates
    if head_keep is None or channel_keep is None:
        raise HippError("give a Plan or all of layer_keep, head_keep and channel_keep")
    return layer_keep, head_keep, channel_keep


def _shape(space) -> str:
    """A prune space in a few words: layers, attention units and MLP width per stage."""
    return "; ".join(f"{t}: {len(ls)} layers, {ls[0].num_heads} attention units, {ls[0].mlp_hidden} channels"
                     for t in space.stages if (ls := [l for l in space.layers if l.tower == t]))


def materialize(model: nn.Module, layer_keep, head_keep=None, channel_keep=None) -> nn.Module:
    """A new, physically smaller copy of `model` for a hard plan (a Plan or its gate triple);
    `model` itself is left untouched. A Plan that prunes visual tokens is installed on the copy
    (backends/visual_tokens.py), which then prunes them itself."""
    plan = layer_keep if head_keep is None and channel_keep is None and hasattr(layer_keep, "token_keep") else None
    layer_keep, head_keep, channel_keep = _unpack(model, layer_keep, head_keep, channel_keep)
    plans = iter(layer_plans(model, layer_keep, head_keep, channel_keep))
    gated = iter(_gated(model))
    replaced = {}
    for resblocks in tower_blocks(model).values():
        new = nn.ModuleList()
        for old in resblocks:
            p, (_, _, block, _) = next(plans), next(gated)
            new.append(carry_hooks(old, block.shrunk(p.heads, p.channels) if p.kept else _dropped_like(block)))
        replaced[id(resblocks)] = new
    # deepcopy everything but the blocks: the memo hands back the sliced lists instead of copying
    # the originals (which may also carry non-leaf gate tensors that deepcopy refuses)
    smaller = copy.deepcopy(model, memo=replaced)
    backend_for(smaller).rebind(smaller)
    if plan is not None and plan.prunes_tokens:
        visual_tokens.install(smaller, visual_tokens.for_plan(plan))
    return smaller


# --- structure: the shape of a smaller model, as JSON ---

def structure(space: PruneSpace, layer_keep, head_keep, channel_keep) -> dict:
    """Per tower, per original layer: {"kept", "heads", "channels"} of the model a hard plan gives."""
    layers = _hard(layer_keep, "layer_keep")
    out = {t: [] for t in space.stages}
    for n, spec in enumerate(space.layers):
        heads, chans = _hard(head_keep[n], f"head_keep[{n}]"), _hard(channel_keep[n], f"channel_keep[{n}]")
        kept = bool(layers[n])
        n_chans = int((chans.double() * spec.channel_sizes()).sum())
        out[spec.tower].append({"kept": kept, "heads": int(heads.sum()) if kept else 0,
                                "channels": n_chans if kept else 0})
    return out


def model_structure(model: nn.Module) -> dict:
    """The structure of a (materialised or full) model, read from its modules."""
    b = backend_for(model)
    out = {}
    for tower, resblocks in b.blocks(model).items():
        out[tower] = []
        for blk in resblocks:
            if isinstance(blk, DroppedBlock):
                out[tower].append({"kept": False, "heads": 0, "channels": 0})
            else:
                _, heads, _, hidden = b.block_shape(blk)
                out[tower].append({"kept": True, "heads": heads, "channels": hidden})
    return out


def empty_model(model_cfg: dict, struct: dict, backend_name: str = "open_clip") -> nn.Module:
    """A model built from its backend's config and resized to `struct`, ready for a strict load.

    For open_clip, model_cfg is open_clip's config dict (as open_clip.get_model_config returns,
    `custom_text` selecting CustomTextCLIP); for hf, the transformers config as a dict. The blocks
    are resized by slicing the freshly built ones: their values are placeholders the load replaces.
    """
    b = get_backend(backend_name)
    base = b.build(copy.deepcopy(dict(model_cfg)))
    for tower, resblocks in b.blocks(base).items():
        layers = struct.get(tower) if isinstance(struct, dict) else None
        if not isinstance(layers, list) or len(layers) != len(resblocks):
            raise HippError(f"structure must list {len(resblocks)} {tower} layers")
        for i, (block, entry) in enumerate(zip(resblocks, layers)):
            try:
                kept, heads, chans = bool(entry["kept"]), int(entry["heads"]), int(entry["channels"])
            except (KeyError, TypeError, ValueError):
                raise HippError(f"structure {tower} layer {i} needs kept / heads / channels") from None
            gated = b.gated_block(block, 1)
            if not (0 <= heads <= gated.attn.units and 0 <= chans <= gated.mlp.hidden):
                raise HippError(f"structure {tower} layer {i} is larger than the base model")
            smaller = gated.shrunk(torch.arange(heads), torch.arange(chans)) if kept else _dropped_like(gated)
            resblocks[i] = carry_hooks(block, smaller)
    b.rebind(base)
    return base


# --- FLAP-style bias compensation ---

def compensate_bias(model: nn.Module, layer_keep, head_keep=None, channel_keep=None,
                    images: torch.Tensor | None = None, texts: torch.Tensor | None = None,
                    batch_size: int = 32) -> nn.Module:
    """materialize(), then fold the mean contribution of removed heads / channels into the output biases.

    `model` must be prunable (make_prunable). The means are measured on the calibration inputs while
    the model runs as the pruned network would (hard gates on), so each layer sees the inputs it
    will see after pruning. Removed MLP channel j adds mean(h_j) * c_proj.weight[:, j] to c_proj.bias;
    removed head k adds out_proj.weight[:, head k] @ mean(head k output) to out_proj.bias.
    A tower without calibration inputs is left uncompensated; dropped layers are not compensated.
    """
    layer_keep, head_keep, channel_keep = _unpack(model, layer_keep, head_keep, channel_keep)
    blocks = prunable_blocks(model)
    plans = layer_plans(model, layer_keep, head_keep, channel_keep)
    saved = [(b.layer_gate, b.attn.head_gate, b.mlp.channel_gate) for b in blocks]
    was_training = model.training
    ref = blocks[0].mlp.fc_in.weight
    f = lambda t: torch.as_tensor(t).to(device=ref.device, dtype=ref.dtype)  # noqa: E731
    try:
        for b, p in zip(blocks, plans):
            b.attn.stats, b.mlp.stats = ({}, {}) if p.kept else (None, None)
        set_gates(model, f(layer_keep), [f(h) for h in head_keep], [f(c) for c in channel_keep])
        model.eval()
        with torch.no_grad():
            for x in (images.split(batch_size) if images is not None else ()):
                model.encode_image(x.to(ref.device))
            for x in (texts.split(batch_size) if texts is not None else ()):
                model.encode_text(x.to(ref.device))
        stats = [(b.attn.stats, b.mlp.stats) for b in blocks]
    finally:
        for b, (z, h, c) in zip(blocks, saved):
            b.set_gates(z, h, c)
            b.attn.stats = b.mlp.stats = None
        model.train(was_training)

    smaller = materialize(model, layer_keep, head_keep, channel_keep)
    new_blocks = [b for rb in tower_blocks(smaller).values() for b in rb]
    with torch.no_grad():
        for old, new, p, (a_stats, m_stats) in zip(blocks, new_blocks, plans, stats):
            if not p.kept:
                continue
            if a_stats and new.attn.out_layer.bias is not None:
                removed = _complement(p.heads, old.attn.units)
                mean = (a_stats["sum"] / a_stats["count"])[removed]  # [r, dims per unit]
                w = old.attn.out_layer.weight.detach().float().view(old.attn.embed_dim, old.attn.units, -1)
                delta = torch.einsum("drk,rk->d", w[:, removed.to(w.device)], mean.to(w.device))
                new.attn.out_layer.bias.add_(delta.to(new.attn.out_layer.bias.dtype))
            if m_stats and new.mlp.fc_out.bias is not None:
                removed = _complement(p.channels, old.mlp.hidden)
                mean = (m_stats["sum"] / m_stats["count"])[removed]
                w = old.mlp.fc_out.weight.detach().float()[:, removed.to(ref.device)]
                new.mlp.fc_out.bias.add_((w @ mean.to(w.device)).to(new.mlp.fc_out.bias.dtype))
    return smaller


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask.nonzero().flatten()
