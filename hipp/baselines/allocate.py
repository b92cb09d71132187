"""The shared allocator: per-unit scores (+ optional per-layer budgets) -> a hard Plan at a FLOPs ratio.

Importance is each method's business; cutting to a budget is this module's, so every method is
held to one rule (Torch-Pruning style). Greedy knapsack over heads and channel groups: units leave
in ascending order of key (score per FLOP by default) until every budget group fits, skipping a
unit whose removal would overshoot far below the budget while smaller ones can still go; then the
best removed units that still fit come back (see _fit). The plan lands at or just below the target.

The FLOPs ratio is over both towers and includes the fixed (non-prunable) costs, as Plan.costs()
reports it. Depth is decided by the methods (they pass `layer_keep`); the allocator only spends
width inside kept layers and, with `drop_empty`, drops a layer left with no head and no channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import HippError
from ..core.gates import topk_mask
from ..core.plan import Plan
from ..core.space import PruneSpace
from .units import Scores, unit_flops

TOLERANCE = 0.02  # an allocated plan's FLOPs ratio lies in [target - TOLERANCE, target]
KEYS = ("density", "score")


class BudgetError(HippError):
    """The requested FLOPs ratio cannot be met under the method's constraints."""


def check_target(target: float) -> float:
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise HippError(f"a FLOPs budget must be a number, got {target!r}") from None
    if not (math.isfinite(t) and 0 < t <= 1):
        raise HippError(f"a FLOPs budget must be a ratio in (0, 1], got {target!r}")
    return t


def width_budget(space: PruneSpace, target: float, towers=None) -> float:
    """Prunable FLOPs allowed in `towers` (default: every stage) so that their total (fixed costs
    included) is target * dense."""
    towers = space.stages if towers is None else towers
    return target * _dense(space, towers) - sum(space.fixed_flops.get(t, 0.0) for t in towers)


def _dense(space: PruneSpace, towers) -> float:
    dense = space.dense_costs()
    return sum(dense[f"flops/{t}"] for t in towers)


def finish(space: PruneSpace, target: float, layer_keep, head_keep, channel_keep, meta: dict | None,
           tolerance: float = TOLERANCE, drop_empty: bool = True) -> Plan:
    """Drop emptied layers (optional), build the Plan and hold it to the target window."""
    layer_keep = torch.as_tensor(layer_keep, dtype=torch.float64).clone()
    if drop_empty:
        for i in range(len(space.layers)):
            if head_keep[i].sum() == 0 and channel_keep[i].sum() == 0:
                layer_keep[i] = 0.0  # only two output biases were left: the layer is gone
    plan = Plan(space, layer_keep, head_keep, channel_keep, meta=dict(meta or {}))
    got = plan.costs()["flops_ratio"]
    if got > target + 1e-9:
        raise BudgetError(f"cannot prune down to a FLOPs ratio of {target:g}: the fixed costs and the units "
                          f"this method must keep already reach {got:.3f}")
    if got < target - tolerance:
        raise BudgetError(f"the plan reaches a FLOPs ratio of only {got:.3f} for a budget of {target:g} "
                          f"(too few layers kept to spend it)")
    plan.meta.update({"budget": target, "flops_ratio": got})
    return plan


def _protected(scores: torch.Tensor, min_keep: float) -> set[int]:
    """Indices of the ceil(min_keep * n) best-scored units of one layer and kind."""
    k = min(len(scores), math.ceil(min_keep * len(scores) - 1e-9)) if min_keep > 0 else 0
    return set(torch.nonzero(topk_mask(scores, k)).flatten().tolist()) if k else set()


@dataclass(frozen=True)
class _Unit:
    key: float
    layer: int
    kind: str   # "head" or "channel"
    index: int
    cost: float


def _fit(units: list[_Unit], idx: list[int], kept: list[bool], spent: float, budget: float, floor: float,
         eps: float) -> float:
    """Bring one budget group (units `idx`, ascending key) to at most `budget`, as close as it gets.

    Cut: units leave by ascending key while over budget, skipping any whose removal would land
    below `floor` (a head when channel groups would do). If still over, two completions are tried
    (lowest key first; the smallest unit that finishes the job) and each is followed by a fill
    that brings back the best removed units that fit; the fuller result wins. Updates `kept`
    in place and returns the group's new spending.
    """
    for n in idx:
        if spent > budget + eps and kept[n] and spent - units[n].cost >= floor:
            kept[n] = False
            spent -= units[n].cost
    results = []
    for rule in ("order", "smallest"):
        k, s = {n: kept[n] for n in idx}, spent
        while s > budget + eps:
            left = [n for n in idx if k[n]]
            if not left:
                break
            finishing = [n for n in left if units[n].cost >= s - budget - eps]
            n = min(finishing, key=lambda m: units[m].cost) if rule == "smallest" and finishing else left[0]
            k[n] = False
            s -= units[n].cost
        for n in reversed(idx):
            if not k[n] and s + units[n].cost <= budget + eps:
                k[n] = True
                s += units[n].cost
        results.append((s if s <= budget + eps else -math.inf, k, s))
    _, best, spent = max(results, key=lambda r: r[0])  # ties: lowest key first
    for n, v in best.items():
        kept[n] = v
    return spent


def allocate(space: PruneSpace, target: float, scores: Scores, *, key: str = "density", min_keep: float = 0.0,
             per_tower: bool = False, layer_keep=None, layer_budgets=None, drop_empty: bool = True,
             tolerance: float = TOLERANCE, meta: dict | None = None) -> Plan:
    """A hard plan whose FLOPs ratio lies in [target - tolerance, target].

    key:           "density" ranks units by score / FLOPs (greedy knapsack; scores must be >= 0),
                   "score" by the raw score (any sign; for methods whose scores are already comparable).
    min_keep:      every kept layer keeps at least ceil(min_keep * n) of its best heads and of its
                   best channel groups (avoids layer collapse).
    per_tower:     each tower meets the ratio on its own (no modality can be starved by the other).
    layer_keep:    [L] 0/1: layers the method dropped; their units are never spent on.
    layer_budgets: [L] prunable FLOPs per layer: each layer is first fitted to its own budget, then
                   the global pass settles what rounding left over.
    """
    target = check_target(target)
    if key not in KEYS:
        raise ValueError(f"unknown allocation key {key!r}")
    scores = scores.check(space)
    n_layers = len(space.layers)
    lk = torch.ones(n_layers, dtype=torch.float64) if layer_keep is None else \
        torch.as_tensor(layer_keep, dtype=torch.float64).clone()
    h_cost, c_cost = unit_flops(space)
    groups = {t: [t] for t in space.stages} if per_tower else {"all": list(space.stages)}  # budget group -> stages
    group_of = {i: (l.tower if per_tower else "all") for i, l in enumerate(space.layers)}
    spent = {g: 0.0 for g in groups}
    layer_spent = [0.0] * n_layers
    units: list[_Unit] = []
    for i, spec in enumerate(space.layers):
        if not lk[i]:
            continue
        for kind, s, cost in (("head", scores.heads[i], h_cost[i]), ("channel", scores.channels[i], c_cost[i])):
            spent[group_of[i]] += float(cost.sum())
            layer_spent[i] += float(cost.sum())
            protected = _protected(s, min_keep)
            for j in range(len(s)):
                if j in protected:
                    continue
                if key == "density" and s[j] < 0:
                    raise ValueError("density allocation needs scores >= 0")
                units.append(_Unit(float(s[j] / cost[j]) if key == "density" else float(s[j]), i, kind, j,
                                   float(cost[j])))
    order = sorted(range(len(units)), key=lambda n: units[n].key)  # stable: ties in space order
    units = [units[n] for n in order]
    kept = [True] * len(units)
    eps = 1e-9 * max(_dense(space, space.stages), 1.0)
    half = 0.5 * tolerance

    if layer_budgets is not None:
        lb = [float(b) for b in torch.as_tensor(layer_budgets, dtype=torch.float64)]
        if len(lb) != n_layers:
            raise ValueError(f"layer_budgets has {len(lb)} entries for {n_layers} layers")
        for i in range(n_layers):
            idx = [n for n, u in enumerate(units) if u.layer == i]
            dense = float(h_cost[i].sum() + c_cost[i].sum())
            after = _fit(units, idx, kept, layer_spent[i], lb[i], lb[i] - half * dense, eps)
            spent[group_of[i]] += after - layer_spent[i]
    for g, towers in groups.items():
        budget = width_budget(space, target, towers)
        idx = [n for n, u in enumerate(units) if group_of[u.layer] == g]
        spent[g] = _fit(units, idx, kept, spent[g], budget, budget - half * _dense(space, towers), eps)

    heads = [torch.full((l.num_heads,), float(lk[i]), dtype=torch.float64) for i, l in enumerate(space.layers)]
    chans = [torch.full((l.num_channel_gates,), float(lk[i]), dtype=torch.float64) for i, l in enumerate(space.layers)]
    for u, k in zip(units, kept):
        if not k:
            (heads if u.kind == "head" else chans)[u.layer][u.index] = 0.0
    info = {"key": key, "min_keep": min_keep, "per_tower": per_tower}
    return finish(space, target, lk, heads, chans, {**info, **(meta or {})}, tolerance, drop_empty)


def uniform(space: PruneSpace, target: float, scores: Scores, tolerance: float = TOLERANCE,
            meta: dict | None = None) -> Plan:
    """Every layer keeps the same share of its heads and of its channel groups (the best by `scores`).

    Heads are coarse (a few per layer), so their count is the rounded keep share; the channel count
    per layer then takes up the rest of the budget, and a last pass gives single layers one more
    channel group while it fits, so layers differ by at most one group.
    """
    target = check_target(target)
    scores = scores.check(space)
    layers = space.layers
    h_cost, c_cost = unit_flops(space)
    budget = width_budget(space, target)
    prunable = width_budget(space, 1.0)
    if budget < 0:
        raise BudgetError(f"cannot prune down to a FLOPs ratio of {target:g}: the fixed costs alone exceed it")
    share = budget / prunable
    # cumulative cost of a layer's k best channel groups, k = 0..num_channel_gates
    order = [torch.sort(s, descending=True, stable=True).indices for s in scores.channels]
    cum = [torch.cat([torch.zeros(1, dtype=torch.float64), c[o].cumsum(0)]) for c, o in zip(c_cost, order)]
    most = max(l.num_channel_gates for l in layers)

    def counts(m: int) -> list[int]:
        return [min(l.num_channel_gates, m * l.num_channel_gates // most) for l in layers]

    def channel_cost(k: list[int]) -> float:
        return sum(float(c[ki]) for c, ki in zip(cum, k))

    n_heads = [min(l.num_heads, round(share * l.num_heads)) for l in layers]
    while True:
        head_total = sum(k * float(h[0]) for k, h in zip(n_heads, h_cost) if k)
        if head_total <= budget or not any(n_heads):
            break
        n_heads = [max(k - 1, 0) for k in n_heads]
    room = budget - head_total
    lo, hi = 0, most  # largest m whose channel counts fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if channel_cost(counts(mid)) <= room else (lo, mid - 1)
    k = counts(lo)
    # one more group for single layers while it fits; further rounds only if still short of the window
    dense = _dense(space, space.stages)
    for _ in range(most):
        added = False
        for i, l in enumerate(layers):
            if k[i] < l.num_channel_gates and channel_cost(k) + float(cum[i][k[i] + 1] - cum[i][k[i]]) <= room:
                k[i] += 1
                added = True
        short = (room - channel_cost(k)) / dense > tolerance / 2
        if not (added and short):
            break
    heads = [topk_mask(s, n) for s, n in zip(scores.heads, n_heads)]
    chans = [topk_mask(s, n) for s, n in zip(scores.channels, k)]
    return finish(space, target, torch.ones(len(layers)), heads, chans, {"key": "uniform", **(meta or {})},
                  tolerance)
