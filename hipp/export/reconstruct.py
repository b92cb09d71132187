"""Least-squares reconstruction of a materialised model's output projections (no gradient steps).

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
Dropped layers and emptied branches have nothing to refit. A LLaVA fits on its model inputs (padding
left out), a CLIP model on its two towers' images and captions.

Each projection costs a forward pass of both models over the calibration set, stopped once the
projection has run (later layers are not needed); a CLIP batch is passed over for the tower it does
not run once its first pass has shown it. Seconds a layer on the embedded teachers; at billions of
parameters one would rather keep each layer's inputs between fits.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends import backend_for, tower_blocks, visual_tokens
from ..backends.modules import DroppedBlock, GatedBlock
from ..errors import HippError

DAMP = 0.001  # chosen on validation (0.001 / 0.01 / 0.1, three controllers): docs/studies/reconstruction.md
CALIB_N = 256


def _kept_branches(dense: nn.Module, small: nn.Module) -> list[tuple[str, nn.Linear, nn.Linear]]:
    """(tower, dense projection, smaller model's projection) for every kept, non-empty branch, in forward order."""
    backend = backend_for(dense)
    pairs = []
    for tower, d_blocks, s_blocks in zip(tower_blocks(dense), tower_blocks(dense).values(), tower_blocks(small).values()):
        for d, s in zip(d_blocks, s_blocks):
            if isinstance(s, DroppedBlock):
                continue
            d = d if isinstance(d, GatedBlock) else backend.gated_block(d, 1)  # parameters shared
            pairs += [(tower, getattr(d, n).out_layer, getattr(s, n).out_layer) for n in ("attn", "mlp")
                      if not getattr(s, n).empty]
    return pairs


class _Reached(Exception):
    """Raised by the hook of the projection being fitted once it has run: the rest of the pass is not needed."""


def forward_pass(model: nn.Module, batch: dict) -> None:
    """One forward pass: a LLaVA on its inputs, a CLIP model's image or text tower."""
    if "images" in batch:
        model.encode_image(batch["images"])
    elif "texts" in batch:
        model.encode_text(batch["texts"])
    else:
        model(**batch, use_cache=False)


def _run_to(model: nn.Module, batch: dict, proj: nn.Linear, take) -> None:
    """Run `model` on `batch` until `proj` has run once, handing take(input, output) to its hook."""
    def hook(module, inputs, output):
        take(inputs[0].detach(), output.detach())
        raise _Reached
    handle = proj.register_forward_hook(hook)
    try:
        forward_pass(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()


def calibration_batches(processor, n: int = CALIB_N, batch_size: int = 32, seed: int = 0) -> list[dict]:
    """A LLaVA's inputs for `n` teacher-forced training instructions (prompt, image and answer), every kind in turn."""
    from ..data import words
    from ..data.instruct import make_samples

    samples = make_samples("train", n, seed, words.image_side(processor))
    out = []
    for i in range(0, n, batch_size):
        enc = words.encode(processor, samples[i:i + batch_size], train=True)
        enc.pop("labels")
        out.append(enc)
    return out


def contrastive_batches(base, n: int = CALIB_N, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """A CLIP model's inputs: `n` training shape scenes with their captions, and as many of the first
    Fashion-MNIST training images with a class caption when that dataset is installed (the validation
    and test sets, and the val scenes the bound search ranks on, are never fitted to)."""
    from ..query.ranking import calibration

    images, tokens = calibration(base, n, seed, fmnist=n, split="train")
    return [{"images": x} for x in images.split(batch_size)] + [{"texts": t} for t in tokens.split(batch_size)]


def calibration_for(base, n: int = CALIB_N) -> list[dict]:
    """The refit's inputs for `base` (hipp.query.bound.Base): a LLaVA's training instructions through
    its processor, a CLIP model's training scenes, captions and Fashion-MNIST images."""
    if backend_for(base.model).name == "llava":
        return calibration_batches(base.tokenizer, n)
    return contrastive_batches(base, n)


def refitted_from(base, n: int = CALIB_N, damp: float = DAMP):
    """plan -> (the plan materialised on `base` and refitted, the refit's record), for `hipp bench
    --reconstruct`: every row refitted alike, on calibration drawn once."""
    from .slicing import materialize

    batches = calibration_for(base, n)

    def run(plan):
        small = materialize(base.model, plan)
        return small.eval(), refit(base.model, small, batches, damp)
    return run


@torch.no_grad()
def refit(dense: nn.Module, small: nn.Module, batches: list[dict], damp: float = DAMP) -> dict:
    """Refit `small`'s kept output projections in place against `dense` on `batches` (a LLaVA's model
    inputs with an attention_mask, or a CLIP model's {"images": ...} / {"texts": ...}); returns what
    was done, for the export's record."""
    if visual_tokens.installed(small) is not None:
        raise HippError("reconstruction needs the dense and the pruned model to see the same tokens: "
                        "it is not available for a plan that prunes visual tokens")
    pairs = _kept_branches(dense, small)
    device = next(dense.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    modes = dense.training, small.training
    dense.eval(), small.eval()
    try:
        tokens = _fit_all(dense, small, pairs, batches, damp)
    finally:
        dense.train(modes[0]), small.train(modes[1])
    return {"method": "least squares on the base's branch outputs", "inputs": input_counts(batches),
            "tokens": tokens, "projections": len(pairs), "damp": damp}


def input_counts(batches: list[dict]) -> dict:
    """How many calibration inputs of each kind were fitted on: a CLIP batch feeds one tower and is
    counted under its key; a LLaVA batch (ids and masks together) counts its sequences."""
    counts = {}
    for b in batches:
        kind = next(iter(b)) if len(b) == 1 else "sequences"
        counts[kind] = counts.get(kind, 0) + len(next(iter(b.values())))
    return counts


def _fit_all(dense: nn.Module, small: nn.Module, pairs, batches: list[dict], damp: float) -> int:
    """Refit each pair's projection in turn; returns the tokens the first one was fitted on."""
    tokens = 0
    unreached = set()  # (batch, tower): a CLIP batch runs one tower only, a LLaVA's both
    for k, (tower, d_proj, s_proj) in enumerate(pairs):
        bias = s_proj.bias is not None
        n_in = s_proj.in_features + int(bias)
        xtx = torch.zeros(n_in, n_in, dtype=torch.float64)
        ytx = torch.zeros(s_proj.out_features, n_in, dtype=torch.float64)
        for i, batch in enumerate(batches):
            if (i, tower) in unreached:
                continue
            got = {}
            _run_to(dense, batch, d_proj, lambda x, y: got.setdefault("y", y))
            _run_to(small, batch, s_proj, lambda x, y: got.setdefault("x", x))
            if len(got) < 2:  # this batch's pass never reaches the tower: skipped for its later layers too
                unreached.add((i, tower))
                continue
            x, y = got["x"].reshape(-1, got["x"].shape[-1]), got["y"].reshape(-1, got["y"].shape[-1])
            mask = batch.get("attention_mask")
            if mask is not None and x.shape[0] == mask.numel():  # a LLaVA's padding; its vision tower has none
                keep = mask.reshape(-1).bool()
                x, y = x[keep], y[keep]
            if bias:
                x = torch.cat([x, x.new_ones(len(x), 1)], 1)
            x, y = x.double().cpu(), y.double().cpu()
            xtx += x.T @ x
            ytx += y.T @ x
            tokens += len(x) if k == 0 else 0
        w0 = s_proj.weight.detach().double().cpu()
        if bias:
            w0 = torch.cat([w0, s_proj.bias.detach().double().cpu()[:, None]], 1)
        lam = damp * float(xtx.diagonal().mean()) + 1e-12  # an input that is always zero stays solvable
        eye = torch.eye(n_in, dtype=torch.float64)
        w = torch.linalg.solve(xtx + lam * eye, (ytx + lam * w0).T).T  # A symmetric: (B A^-1)^T = A^-1 B^T
        s_proj.weight.copy_(w[:, :s_proj.in_features].to(s_proj.weight.dtype))
        if bias:
            s_proj.bias.copy_(w[:, -1].to(s_proj.bias.dtype))
    return tokens
