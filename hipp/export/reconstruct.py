"""Least-squares reconstruction of a materialised LLaVA's output projections (no gradient steps).

Pruning a head or an MLP channel removes its share of the branch output. The kept units are often
correlated with the removed ones, so the kept columns of each output projection (attention's o_proj /
out_proj, the MLP's down_proj / fc2) can be refitted, in closed form, to reproduce the dense branch
output from what the smaller model still computes:

    W' = argmin_W  sum_t |y_t - W x_t|^2 + lam |W - W_0|^2  =  (Y^T X + lam W_0) (X^T X + lam I)^-1

x_t: the smaller model's input to that projection on calibration token t (with a 1 appended where the
projection has a bias), y_t: the dense model's projection output on the same token, W_0: the sliced
weights (the ridge pulls toward them, so a poorly-determined direction keeps its dense value), lam:
`damp` times the mean diagonal of X^T X. Layers are refitted in forward order, each after the earlier
ones, so every fit sees the inputs the finished model will see (as SparseGPT-style one-shot pruners
do). It is a closed-form fit on calibration instructions, not training: no gradient, no optimiser.
Dropped layers and emptied branches have nothing to refit.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends import tower_blocks, visual_tokens
from ..backends.modules import DroppedBlock
from ..errors import HippError

DAMP = 0.01
CALIB_N = 256


def _kept_branches(dense: nn.Module, small: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(dense projection, smaller model's projection) for every kept, non-empty branch, in forward order."""
    pairs = []
    for (tower, d_blocks), s_blocks in zip(tower_blocks(dense).items(), tower_blocks(small).values()):
        for d, s in zip(d_blocks, s_blocks):
            if isinstance(s, DroppedBlock):
                continue
            for name in ("attn", "mlp"):
                d_branch, s_branch = _branch(d, name), getattr(s, name)
                if not s_branch.empty:
                    pairs.append((d_branch, s_branch.out_layer))
    return pairs


def _branch(block: nn.Module, name: str) -> nn.Linear:
    """The dense block's output projection of a branch (a plain transformers layer or a gated block)."""
    gated = getattr(block, name, None)
    if gated is not None and hasattr(gated, "out_layer"):
        return gated.out_layer
    attn = getattr(block, "self_attn", None)
    if name == "attn":
        return attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    mlp = block.mlp
    return mlp.down_proj if hasattr(mlp, "down_proj") else mlp.fc2


def calibration_batches(processor, n: int = CALIB_N, batch_size: int = 32, seed: int = 0) -> list[dict]:
    """Model inputs of `n` teacher-forced training instructions (prompt, image and answer), every kind in turn."""
    from ..data import words
    from ..data.instruct import make_samples

    samples = make_samples("train", n, seed, words.image_side(processor))
    out = []
    for i in range(0, n, batch_size):
        enc = words.encode(processor, samples[i:i + batch_size], train=True)
        enc.pop("labels")
        out.append(enc)
    return out


@torch.no_grad()
def refit(dense: nn.Module, small: nn.Module, batches: list[dict], damp: float = DAMP) -> dict:
    """Refit `small`'s kept output projections in place against `dense` on `batches` (model inputs with
    an attention_mask); returns what was done, for the export's record."""
    if visual_tokens.installed(small) is not None:
        raise HippError("reconstruction needs the dense and the pruned model to see the same tokens: "
                        "it is not available for a plan that prunes visual tokens")
    pairs = _kept_branches(dense, small)
    device = next(dense.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    modes = dense.training, small.training
    dense.eval(), small.eval()
    tokens = 0
    for k, (d_proj, s_proj) in enumerate(pairs):
        grab: dict[str, list] = {"x": [], "y": []}
        h1 = d_proj.register_forward_hook(lambda m, i, o: grab["y"].append(o.detach()))
        h2 = s_proj.register_forward_hook(lambda m, i, o: grab["x"].append(i[0].detach()))
        bias = s_proj.bias is not None
        n_in = s_proj.in_features + int(bias)
        xtx = torch.zeros(n_in, n_in, dtype=torch.float64)
        ytx = torch.zeros(s_proj.out_features, n_in, dtype=torch.float64)
        try:
            for batch in batches:
                grab["x"].clear(), grab["y"].clear()
                dense(**batch, use_cache=False)
                small(**batch, use_cache=False)
                for x, y in zip(grab["x"], grab["y"]):  # the vision tower sees no padding
                    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                    if x.shape[0] == batch["attention_mask"].numel():
                        keep = batch["attention_mask"].reshape(-1).bool()
                        x, y = x[keep], y[keep]
                    if bias:
                        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
                    x, y = x.double().cpu(), y.double().cpu()
                    xtx += x.T @ x
                    ytx += y.T @ x
                    tokens += len(x) if k == 0 else 0
        finally:
            h1.remove(), h2.remove()
        w0 = s_proj.weight.detach().double().cpu()
        if bias:
            w0 = torch.cat([w0, s_proj.bias.detach().double().cpu()[:, None]], 1)
        lam = damp * float(xtx.diagonal().mean())
        eye = torch.eye(n_in, dtype=torch.float64)
        w = torch.linalg.solve(xtx + lam * eye, (ytx + lam * w0).T).T  # A symmetric: (B A^-1)^T = A^-1 B^T
        s_proj.weight.copy_(w[:, :s_proj.in_features].to(s_proj.weight.dtype))
        if bias:
            s_proj.bias.copy_(w[:, -1].to(s_proj.bias.dtype))
    dense.train(modes[0]), small.train(modes[1])
    return {"method": "least squares on the base's branch outputs", "instructions": sum(len(b["input_ids"]) for b in batches),
            "tokens": tokens, "projections": len(pairs), "damp": damp}
