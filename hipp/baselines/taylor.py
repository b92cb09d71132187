"""First-order Taylor importance (LLM-Pruner-style) and Wanda-style structured scores.

Taylor: a unit's score is |dL/dg| at g = 1, with g the gate on the unit's output and L the task's own
loss on the calibration batch against its ground truth (not against the dense model, whose
distillation loss has zero gradient at the dense point): answer-token cross-entropy for a LLaVA, the
symmetric image-text contrastive loss (hard negatives among the texts) for a CLIP. Since the gate
scales what the unit writes through its output weights, dL/dg is the sum of W * dL/dW over those
weights: LLM-Pruner's first-order term for the unit's output group.

Wanda-style (Wanda-sp, as FLAP's authors adapt Wanda to structure): |W| times the input norm of the
feature it reads, summed over the unit's columns of the output projection (o_proj / out_proj for a
head or key/value group, down_proj / c_proj for a channel).

Both spend the budget globally by score per FLOP, each layer keeping at least 10% of its units
(as the magnitude baseline). The published methods cut one ratio per layer; with magnitude scores
that rule was the weaker one on the LLaVA teacher at 0.3, 0.5 and 0.7, but the stronger one on the
CLIP teacher at 0.5 and 0.7 (uniform vs global magnitude in BENCHMARKS). These two scores were not
tried per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import gated, prunable_blocks
from ..core.plan import Plan
from ..data import to_input
from .allocate import allocate
from .calibration import Calibration
from .method import Context
from .multiflow import activations
from .simple import MIN_KEEP
from .units import Scores, group_sum, head_sum


def _task_loss(model, calibration: Calibration) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = calibration.batch
    if calibration.generative:
        from ..data.words import encode
        enc = encode(calibration.tokenizer, batch.samples, train=True)
        return model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False).loss
    images = to_input(batch.images, calibration.preprocess_cfg).to(device)
    texts = calibration.tokenizer(list(batch.captions) + list(batch.negatives)).to(device)
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(texts, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T  # [B, B + negatives]: caption i is text i
    target = torch.arange(img.shape[0], device=device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :img.shape[0]].T, target))


def taylor_scores(ctx: Context) -> Scores:
    model, space = ctx.model, ctx.space
    _, heads, chans = space.all_kept()
    gates = ([h.float().requires_grad_() for h in heads], [c.float().requires_grad_() for c in chans])
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with gated(model, (torch.ones(len(space.layers)), *gates)):
            _task_loss(model, ctx.calibration).backward()
    finally:
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
    return Scores([g.grad.detach().double().abs() for g in gates[0]],
                  [g.grad.detach().double().abs() for g in gates[1]])


@torch.no_grad()
def wanda_scores(ctx: Context) -> Scores:
    heads, channels = [], []
    for block, spec, s in zip(prunable_blocks(ctx.model), ctx.space.layers, activations(ctx)):
        w_out = block.attn.out_layer.weight.detach().double().abs().sum(0)  # [H * hd]
        w_down = block.mlp.fc_out.weight.detach().double().abs().sum(0)      # [hidden]
        heads.append(head_sum(w_out * s["head_out"].rms, spec))
        channels.append(group_sum(w_down * s["hidden"].rms, spec))
    return Scores(heads, channels)


def taylor_plan(ctx: Context, budget: float) -> Plan:
    return allocate(ctx.space, budget, ctx.cached("taylor", lambda: taylor_scores(ctx)), min_keep=MIN_KEEP)


def wanda_plan(ctx: Context, budget: float) -> Plan:
    return allocate(ctx.space, budget, ctx.cached("wanda", lambda: wanda_scores(ctx)), min_keep=MIN_KEEP)
