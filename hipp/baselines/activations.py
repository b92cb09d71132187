"""Per-feature activation moments of every block on calibration data (dense forward, hooks only).

For each block: the input of attention (ln_1 output), its q/k/v projections, the per-head outputs
entering out_proj, the attention branch output, and likewise the MLP input, hidden activation
(after the non-linearity) and output. Moments are over every token of every calibration sample;
the text tower also sees the hard-negative captions, as it would in use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backends import clear_gates, prunable_blocks
from ..data import to_input
from .calibration import Calibration

POINTS = ("attn_in", "qkv", "head_out", "attn_out", "mlp_in", "hidden", "mlp_out")


@dataclass
class Moments:
    count: int = 0
    sum: torch.Tensor | float = 0.0
    sumsq: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        self.count += x.shape[0]
        self.sum = self.sum + x.sum(0)
        self.sumsq = self.sumsq + x.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def rms(self) -> torch.Tensor:
        """Activation norm per feature, independent of how many tokens were seen."""
        return (self.sumsq / self.count).sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Fluctuation of a feature around its mean (FLAP's baseline fluctuation)."""
        return (self.sumsq / self.count - self.mean.pow(2)).clamp_min(0)


@dataclass
class BlockStats:
    points: dict[str, Moments] = field(default_factory=lambda: {p: Moments() for p in POINTS})

    def __getitem__(self, name: str) -> Moments:
        return self.points[name]


@torch.no_grad()
def activation_stats(model, calibration: Calibration, batch_size: int = 64) -> list[BlockStats]:
    """One BlockStats per block, in prune-space order."""
    blocks = prunable_blocks(model)
    stats = [BlockStats() for _ in blocks]
    hooks = []

    def attn_hook(s):
        def fn(module, args, output):
            x = args[0]
            s["attn_in"].add(x)
            s["qkv"].add(F.linear(x, module.qkv_weight, module.qkv_bias))
        return fn

    def io_hook(s, inp, out):
        def fn(module, args, output):
            if inp:
                s[inp].add(args[0])
            if out:
                s[out].add(output)
        return fn

    for block, s in zip(blocks, stats):
        hooks += [block.attn.register_forward_hook(attn_hook(s)),
                  block.attn.out_proj.register_forward_hook(io_hook(s, "head_out", "attn_out")),
                  block.mlp.fc_in.register_forward_hook(io_hook(s, "mlp_in", None)),
                  block.mlp.fc_out.register_forward_hook(io_hook(s, "hidden", "mlp_out"))]
    batch = calibration.batch
    device = next(model.parameters()).device
    images = to_input(batch.images, calibration.preprocess_cfg).to(device)
    texts = calibration.tokenizer(list(batch.captions) + list(batch.negatives)).to(device)
    try:
        clear_gates(model)
        for x in images.split(batch_size):
            model.encode_image(x)
        for x in texts.split(batch_size):
            model.encode_text(x)
    finally:
        for h in hooks:
            h.remove()
    return stats
