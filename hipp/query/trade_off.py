"""A preference under a bound: the controller's own plan for a preference's split between the quality
objectives, at the cost a bound allows (`hipp query --pref SPEC --max-flops R`).

A preference alone fixes how much is pruned as well as what for; a bound query (hipp/query/bound.py)
ranks plans made for every split by one calibration loss, so a user's split (hallucination robustness
over task utility, say) has no say in it. Here the split is kept. Along

    p(c) = (1 - c) q + c d,

q the preference's quality weights and d its cost weights (each normalised; d = the bounded costs where
the preference names none), the cost weight c is raised over a grid until the controller's own hard plan
comes closest to the bound; that plan's logits are then fitted to the bound by the project's one fitter
(hipp.core.budget: top-k, then top-up), so the plan meets the bound and keeps what the controller
learnt for that trade-off at that cost, not a cost-free preference cut down to it. No data, no model.
"""
from __future__ import annotations

import torch

from ..controller.network import Controller
from ..core.budget import Units, check_bounds, check_possible, fit, meets, ratios, top_up
from ..core.gates import map_gates
from ..core.plan import Plan
from ..core.preference import COSTS
from ..errors import HippError

POINTS = 201  # cost weights tried, 0 to 0.999 (1 would drop the quality weights altogether)


def split_and_direction(controller: Controller, pref: dict, bounds: dict) -> tuple[dict, dict]:
    """(q, d): the preference's quality weights and the cost weights to raise, each summing to 1."""
    names = controller.objective_names
    quality = {n: pref[n] for n in names if n not in COSTS}
    if sum(quality.values()) <= 0:
        raise HippError(f"a preference under a bound keeps its split between the quality objectives "
                        f"({', '.join(quality) or 'none here'}); this one gives them no weight")
    costs = {n: pref[n] for n in names if n in COSTS and pref[n] > 0}
    if not costs:  # none named: raise the bounded costs the controller was trained on (else its FLOPs)
        trained = [n for n in names if n in COSTS]
        costs = {n: 1.0 for n in trained if n in bounds} or {n: 1.0 for n in trained if n == "flops"}
    if not costs:
        raise HippError(f"this controller has no cost objective to trade against ({', '.join(names)})")
    norm = lambda w: {n: v / sum(w.values()) for n, v in w.items()}  # noqa: E731
    return norm(quality), norm(costs)


def matched_preference(controller: Controller, pref: dict, bounds: dict, latency=None,
                       points: int = POINTS) -> tuple[dict, float]:
    """(p(c), c) whose own hard plan lands closest to the bounds (the binding one: the largest ratio of
    cost to bound); ties go to the smaller c, i.e. the most quality weight."""
    q, d = split_and_direction(controller, pref, bounds)
    best = None
    for i in range(points):
        c = i / (points - 1) * 0.999
        p = {n: (1 - c) * q.get(n, 0.0) + c * d.get(n, 0.0) for n in controller.objective_names}
        r = ratios(controller.plan(p), latency)
        gap = abs(max(r[k] / v for k, v in bounds.items()) - 1)
        if best is None or gap < best[0] - 1e-12:
            best = (gap, p, c)
    return best[1], best[2]


@torch.no_grad()
def own_logits(controller: Controller, pref: dict, flops_target: float | None = None, latency=None
               ) -> tuple[Units, torch.Tensor]:
    """(units, one logit per unit) of the controller for `pref` (and `flops_target`, when it reads one),
    the units pricing the token count it keeps for that preference."""
    x = torch.tensor([[pref.get(n, 0.0) for n in controller.objective_names]], dtype=controller.trunk[0].weight.dtype)
    target = torch.tensor([flops_target], dtype=x.dtype) if controller.takes_target and flops_target else None
    own = controller.token_counts(x, target)[0].tolist() if controller.space.tokens else None
    units = Units(controller.space, latency, own)
    return units, units.flat(map_gates(lambda t: t[0].detach().cpu(), controller(x, target)))


@torch.no_grad()
def plan_for_preference(controller: Controller, pref, max_flops: float | None = None,
                        max_params: float | None = None, max_latency: float | None = None, latency=None,
                        rounding: tuple[int, int] | None = None, points: int = POINTS) -> Plan:
    """The plan for `pref`'s quality split that meets the bound(s) (see the module doc). `latency` (a
    LatencyModel) prices a latency bound; `rounding` (channels, units) as hipp.query.rounding."""
    bounds = check_bounds(max_flops, max_params, max_latency)
    if "latency" in bounds and latency is None:
        raise HippError("a latency bound needs a latency profile to price plans with")
    asked = controller.preference(pref)
    matched, c = matched_preference(controller, asked, bounds, latency, points)
    units, flat = own_logits(controller, matched, bounds.get("flops"), latency)
    units.check_keys(bounds)
    found = fit(units, flat, bounds)
    check_possible(units, found, bounds)
    mask, added = top_up(units, flat, found.k, bounds)
    meta = {**{f"max_{k}": v for k, v in bounds.items()}}
    if rounding is not None:
        from .rounding import round_to
        mask, added = round_to(units, flat, mask, bounds, *rounding)
        meta["round"] = {"channels": rounding[0], "units": rounding[1]}
    meta["trade_off"] = {"asked": asked, "cost_weight": c, "offset": found.offset, "added_by_top_up": added}
    plan = units.plan(mask, matched, meta)
    assert meets(units.measure(plan, bounds), bounds), "top-up crossed the bound"
    if latency is not None:
        plan.meta["latency"] = latency.plan_report(plan)
    return plan
