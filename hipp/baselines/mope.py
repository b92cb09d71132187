"""MoPE-style importance: how much the cross-modal behaviour suffers when one module is removed.

Width first: every head and channel group is removed alone from the dense model (hard gate 0) and
its score is the calibration damage that causes (similarity distillation + hard-negative margins
vs the dense model, see calibration.Damage). The allocator spends the budget by score per FLOP.
Then depth: a layer is dropped when re-spending its FLOPs on the best remaining width of the other
layers lowers the damage of the whole plan, measured again on the calibration batch; this repeats
while it helps. Each round tries only the SCREEN kept layers whose removal from the dense model
hurts least (ECoFLaP's block importance, shared), which keeps the depth search to a few forwards.
"""
from __future__ import annotations

import torch

from ..core.plan import Plan
from ..core.space import PruneSpace
from .allocate import BudgetError, allocate
from .calibration import Damage
from .ecoflap import layer_importance
from .method import Context
from .units import Scores

SCREEN = 3


def _without(space: PruneSpace, layer: int, kind: str, index: int):
    lk, heads, chans = space.all_kept()
    (heads if kind == "head" else chans)[layer][index] = 0.0
    return lk, heads, chans


@torch.no_grad()
def ablation_scores(damage: Damage, space: PruneSpace) -> Scores:
    heads = [torch.zeros(l.num_heads, dtype=torch.float64) for l in space.layers]
    chans = [torch.zeros(l.num_channel_gates, dtype=torch.float64) for l in space.layers]
    base = damage()  # ~0: the dense model against itself
    for i, l in enumerate(space.layers):  # per layer, so the ablations start from its cached input
        units = [(kind, j) for kind, n in (("head", l.num_heads), ("channel", l.num_channel_gates)) for j in range(n)]
        got = damage.ablate(l.tower, [_without(space, i, *u) for u in units], start=l.index)
        for (kind, j), v in zip(units, got.tolist()):
            (heads if kind == "head" else chans)[i][j] = max(v - base, 0.0)
    return Scores(heads, chans)


def _droppable(space: PruneSpace, layer_keep: torch.Tensor) -> list[int]:
    """Kept layers whose tower would still keep another layer."""
    kept = {t: [i for i, l in enumerate(space.layers) if l.tower == t and layer_keep[i]] for t in space.stages}
    return [i for t in space.stages for i in kept[t] if len(kept[t]) > 1]


def mope_plan(ctx: Context, budget: float, max_rounds: int | None = None, screen: int = SCREEN) -> Plan:
    damage = ctx.damage()
    scores = ctx.cached("mope", lambda: ablation_scores(damage, ctx.space))
    importance = ctx.cached("layer_importance", lambda: layer_importance(damage, ctx.space))
    plan = allocate(ctx.space, budget, scores)
    best = damage(plan.gates)
    rounds = len(ctx.space.layers) if max_rounds is None else max_rounds
    for _ in range(rounds):
        candidates = []
        for i in sorted(_droppable(ctx.space, plan.layer_keep), key=lambda i: float(importance[i]))[:screen]:
            lk = plan.layer_keep.clone()
            lk[i] = 0.0
            try:
                candidates.append(allocate(ctx.space, budget, scores, layer_keep=lk))
            except BudgetError:  # the other layers cannot spend the budget: keep this one
                continue
        if not candidates:
            break
        value, k = min((damage(p.gates), k) for k, p in enumerate(candidates))
        if value >= best:
            break
        plan, best = candidates[k], value
    plan.meta["calibration_damage"] = best
    plan.meta["layers_dropped"] = int((plan.layer_keep == 0).sum())
    return plan
