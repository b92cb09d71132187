"""Per-feature activation moments of every block on calibration data (dense forward, hooks only).

For each block: the input of attention (ln_1 output), its q/k/v projections (packed in_proj models
only), the per-head outputs entering the output projection, the attention branch output, and likewise
the MLP input, hidden activation (after the non-linearity, times up under SwiGLU) and output; and the
block's influence, 1 - cos(input, output) averaged over tokens (ShortGPT's). Moments are over every
token of every calibration sample; the text tower also sees the hard-negative captions, as it would
in use; a LLaVA reads its calibration instructions (prompt and answer, teacher-forced).
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
    cos_sum: float = 0.0   # cosine of each token's hidden state before and after the block, summed
    tokens: int = 0

    @property
    def influence(self) -> float:
        """ShortGPT's block influence: 1 - the mean cosine between the block's input and output."""
        return 1.0 - self.cos_sum / max(self.tokens, 1)

    def __getitem__(self, name: str) -> Moments:
        return self.points[name]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def calibration_forward(model, calibration: Calibration, batch_size: int = 64) -> None:
    """Dense forwards over the calibration batch (gates cleared), for hooks to watch."""
    device = next(model.parameters()).device
    batch = calibration.batch
    clear_gates(model)
    if calibration.generative:
        from ..data.words import encode
        for lo in range(0, len(batch.samples), batch_size):
            enc = encode(calibration.tokenizer, batch.samples[lo:lo + batch_size], train=True)
            enc.pop("labels")
            model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False)
        return
    images = to_input(batch.images, calibration.preprocess_cfg).to(device)
    texts = calibration.tokenizer(list(batch.captions) + list(batch.negatives)).to(device)
    for x in images.split(batch_size):
        model.encode_image(x)
    for x in texts.split(batch_size):
        model.encode_text(x)


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
            if hasattr(module, "qkv_weight"):  # packed in_proj (open_clip, CLIP): MULTIFLOW reads it
                s["qkv"].add(F.linear(x, module.qkv_weight, module.qkv_bias))
        return fn

    def io_hook(s, inp, out):
        def fn(module, args, output):
            if inp:
                s[inp].add(args[0])
            if out:
                s[out].add(output)
        return fn

    def block_hook(s):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            x, y = x.detach().float(), _first(output).detach().float()
            s.cos_sum += float(F.cosine_similarity(x, y, dim=-1).sum())
            s.tokens += x.shape[:-1].numel()
        return fn

    for block, s in zip(blocks, stats):
        hooks += [block.register_forward_hook(block_hook(s), with_kwargs=True),
                  block.attn.register_forward_hook(attn_hook(s)),
                  block.attn.out_layer.register_forward_hook(io_hook(s, "head_out", "attn_out")),
                  block.mlp.fc_in.register_forward_hook(io_hook(s, "mlp_in", None)),
                  block.mlp.fc_out.register_forward_hook(io_hook(s, "hidden", "mlp_out"))]
    try:
        calibration_forward(model, calibration, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return stats
