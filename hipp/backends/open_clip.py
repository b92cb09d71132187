"""open_clip backend: find the transformer blocks of each tower and describe the prune space."""
from __future__ import annotations

from torch import nn

from ..errors import HippError
from ..modules import DroppedBlock, PrunableBlock
from ..space import LayerSpec, PruneSpace


def text_module(model: nn.Module) -> nn.Module:
    """CLIP keeps the text tower's parts on the model itself; CustomTextCLIP wraps them in .text."""
    return model.text if hasattr(model, "text") else model


def tower_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    try:
        blocks = {"image": model.visual.transformer.resblocks,
                  "text": text_module(model).transformer.resblocks}
    except AttributeError:
        raise HippError(f"{type(model).__name__} is not an open_clip ViT CLIP model "
                        "(expected .visual.transformer and a text transformer)") from None
    return blocks


def _block_shape(block: nn.Module) -> tuple[int, int, int, int]:
    # head_dim is read, not derived from the width: a pruned layer keeps its head size with fewer
    # (possibly zero) heads; nn.MultiheadAttention and PrunableAttention both carry it
    attn = block.attn
    return attn.embed_dim, attn.num_heads, attn.head_dim, block.mlp.c_fc.out_features


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: nn.Module, channel_group: int = 1) -> PruneSpace:
    """The prune space of an open_clip CLIP / CustomTextCLIP with ViT image tower.

    Also describes a materialised (pruned) model as it is: its layers keep their original indices,
    dropped layers (DroppedBlock) are left out, so `dense_costs()` is that model's own cost through
    the same PruneSpace.costs that prices plans.
    """
    blocks = tower_blocks(model)
    visual, text = model.visual, text_module(model)
    tokens = {"image": visual.positional_embedding.shape[0], "text": text.positional_embedding.shape[0]}
    layers = []
    for tower, resblocks in blocks.items():
        for i, block in enumerate(resblocks):
            if isinstance(block, DroppedBlock):
                continue
            width, heads, head_dim, hidden = _block_shape(block)
            layers.append(LayerSpec(tower, i, width, heads, head_dim, hidden, tokens[tower], channel_group))
    conv = visual.conv1
    patches = tokens["image"] - 1
    embed_dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    proj_text = text.text_projection
    text_out = (proj_text.out_features if isinstance(proj_text, nn.Linear)
                else proj_text.shape[1] if proj_text is not None else 0)
    fixed_flops = {
        "image": 2.0 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        + (2.0 * visual.transformer.width * embed_dim if visual.proj is not None else 0.0),
        "text": 2.0 * text.transformer.width * text_out,
    }
    block_params = {t: sum(_count(b) for b in bl) for t, bl in blocks.items()}
    total = _count(model)
    fixed_params = {"image": float(_count(visual) - block_params["image"])}
    fixed_params["text"] = float(total - _count(visual) - block_params["text"])
    return PruneSpace(tuple(layers), fixed_flops, fixed_params)


def dense_flops(model: nn.Module) -> dict[str, float]:
    return {t: v for t, v in describe(model).dense_costs().items() if t.startswith("flops/")}


def num_params(model: nn.Module) -> int:
    return _count(model)


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def context_length(model: nn.Module) -> int:
    return int(text_module(model).positional_embedding.shape[0])


# --- prunable swap and gates ---

def make_prunable(model: nn.Module, channel_group: int = 1) -> PruneSpace:
    """Swap every block of both towers for a PrunableBlock in place (parameters shared, keys unchanged).

    Calling it again only changes the channel grouping. Returns the prune space, whose layer order
    (image layers, then text layers) is the order set_gates expects.
    """
    if not isinstance(channel_group, int) or channel_group < 1:
        raise HippError(f"channel_group must be a positive integer, got {channel_group!r}")
    swaps = []  # build every replacement first, so a failure leaves the model untouched
    for tower, resblocks in tower_blocks(model).items():
        for i, block in enumerate(resblocks):
            if isinstance(block, PrunableBlock):
                swaps.append((resblocks, i, block))
                continue
            try:
                swaps.append((resblocks, i, PrunableBlock.from_block(block, channel_group)))
            except (AttributeError, ValueError) as e:
                raise HippError(f"{tower} block {i} ({type(block).__name__}) cannot be made prunable: {e}") from None
    for resblocks, i, block in swaps:
        block.mlp.channel_group = channel_group
        resblocks[i] = block
    return describe(model, channel_group)


def prunable_blocks(model: nn.Module) -> list:
    """The PrunableBlocks in prune-space order: all image layers, then all text layers."""
    blocks = [b for resblocks in tower_blocks(model).values() for b in resblocks]
    if not all(isinstance(b, PrunableBlock) for b in blocks):
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
        if heads is not None and heads.shape[-1:] != (block.attn.num_heads,):
            raise HippError(f"head_keep[{i}] must end in {block.attn.num_heads}, got {tuple(heads.shape)}")
        groups = -(-block.mlp.hidden // block.mlp.channel_group)
        if chans is not None and chans.shape[-1:] != (groups,):
            raise HippError(f"channel_keep[{i}] must end in {groups}, got {tuple(chans.shape)}")
        block.set_gates(layer_keep[..., i] if layer_keep is not None else None, heads, chans)


def clear_gates(model: nn.Module) -> None:
    """Remove all gates: the model computes exactly its dense forward again."""
    for block in prunable_blocks(model):
        block.set_gates(None, None, None)
