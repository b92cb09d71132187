"""Experiment: refine a bound query's plan by swapping units, judged on calibration data.

Each round ablates the `pool` kept heads / channel groups with the lowest controller logits and
adds, one at a time, the `pool` pruned ones with the highest (not tried before), measures each
toggle's change of the ranking loss on a search set, then applies the most gainful additions paid
for by the least damaging removals (staying within the bound) and keeps the result if the search
loss fell. The refined plan is finally checked on the query's own ranking calibration (disjoint from
the search set) and the full test sets.

    python benchmarks/swap_study.py --controller runs/hipp-tiny --budgets 0.3,0.5,0.7
"""
import argparse
import json
import time

import torch

from hipp.controller.files import load_controller
from hipp.evaluation.pareto import evaluate_plan
from hipp.query.polish import plan_logits
from hipp.core.budget import Units, meets, ratios
from hipp.query.bound import load_base, plan_for_budget
from hipp.query.ranking import calibration, rank_losses, utility_losses, zero_shot_calibration, zero_shot_losses


def search_set(base, n, fmnist_start):
    """The ranking loss (zero-shot + distillation) on val scenes of another seed and later Fashion-MNIST
    train images than the query's own ranking set, built once for every evaluation of the search."""
    zs = zero_shot_calibration(base, n, seed=1, fmnist_start=fmnist_start)
    dist = calibration(base, n, seed=1, fmnist=n, fmnist_start=fmnist_start)
    return lambda plans: [a + b for a, b in zip(zero_shot_losses(base, plans, zs), utility_losses(base, plans, dist))]


def refine(units, plan, logits, bounds, loss, rounds, pool):
    eff = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep]).clone()
    flat = units.flat(logits)
    cur = loss([plan])[0]
    tried, evals = set(), 1
    for r in range(rounds):
        prunable = [u for u in range(len(eff)) if units.kind[u] != "layer" and eff[units.layer[u]] == 1]
        kept = sorted((u for u in prunable if eff[u] == 1 and u not in tried), key=lambda u: float(flat[u]))[:pool]
        free = sorted((u for u in prunable if eff[u] == 0 and u not in tried), key=lambda u: -float(flat[u]))[:pool]
        tried.update(kept + free)
        toggles = []
        for u in kept + free:
            m = eff.clone()
            m[u] = 1 - m[u]
            toggles.append(units.plan(m, {}))
        deltas = loss(toggles)
        evals += len(toggles)
        damage = {u: d - cur for u, d in zip(kept, deltas[:len(kept)])}
        gain = {u: cur - d for u, d in zip(free, deltas[len(kept):])}
        adds = sorted((u for u in free if gain[u] > 0), key=lambda u: -gain[u])
        removes = sorted(kept, key=lambda u: damage[u])
        start, saved = eff.clone(), 0.0
        for u in kept:  # units whose removal lowers the loss go anyway
            if damage[u] < 0:
                start[u], saved = 0, saved - damage[u]
        best = None
        for n_add in range(len(adds), -1, -1):  # most additions first, fewer when they do not pay
            m, predicted = start.clone(), saved + sum(gain[u] for u in adds[:n_add])
            for u in adds[:n_add]:
                m[u] = 1
            for u in removes:  # pay for the additions with the least damaging removals
                if meets(ratios(units.plan(m, {})), bounds):
                    break
                if m[u]:
                    m[u], predicted = 0, predicted - damage[u]
            if predicted <= 0 or not meets(ratios(units.plan(m, {})), bounds):
                continue
            got = loss([units.plan(m, {})])[0]
            evals += 1
            if got < cur:
                best = (m, got)
                break
        print(f"  round {r}: loss {cur:.5f} -> {best[1] if best else cur:.5f} "
              f"(adds {len(adds)}, evals {evals})", flush=True)
        if best:
            eff, cur = best
    return units.plan(eff, plan.preference, dict(plan.meta)), cur, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", default="runs/hipp-tiny")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    units = Units(controller.space)
    loss = search_set(base, args.n, fmnist_start=1000)
    utility = lambda p: evaluate_plan(base.model, p, base.tokenizer, base.preprocess_cfg, n=1000,
                                      fmnist_limit=None)["utility"]
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = plan_for_budget(controller, max_flops=budget, base=base)
        t0 = time.perf_counter()
        refined, search_loss, evals = refine(units, plan, plan_logits(controller, plan), {"flops": budget},
                                             loss, args.rounds, args.pool)
        seconds = time.perf_counter() - t0
        held = rank_losses(base, [plan, refined])[0]
        print(json.dumps({"budget": budget, "utility_before": utility(plan), "utility_after": utility(refined),
                          "held_out_before": held[0], "held_out_after": held[1], "flops": ratios(refined)["flops"],
                          "evals": evals, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
