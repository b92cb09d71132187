"""Polishing a bound query's plan, or a preference's plan under a bound: a short fixed-budget gate run
that starts from the controller.

The controller answers any budget at once; the per-budget gate training (baselines.fixed_budget,
the fixed-budget gates) answers one budget with a full training run. Polishing sits in between: the bound
search's winner becomes the starting point of a short run of those free gates at the FLOPs bound
(a fifth of the fixed-budget gates' steps, at a low temperature since the plan is already nearly hard). The
result is fitted to the bound by the search's own top-k + top-up, and replaces the plan only if its
ranking loss on the calibration batch is lower, so polishing never returns a plan the search
would have ranked worse. Measured in docs/studies/polishing.md.

A preference under a bound (hipp/query/trade_off.py) is polished on its own quality split, as the
controller weighs it (the recipe's loss scales), and is not ranked: no search ranked it, and the
split is what the user asked for. On a LLaVA this is what makes the split buy hallucination
robustness at a fixed cost; the controller alone ranks units alike for every split
(docs/studies/llava-controller-recipe.md). Unlike a bound query's, this polish is meant to move the
plan, so it runs hot (SPLIT: start temperature 1, learning rate 0.1), and its utility leaves the yes /
no answers to grounding, so that a zero hallucination weight asks nothing of them: chosen on validation
over the cold polish and the utility over every answer, for the larger gain in adversarial F1 from
weight 0 to 1 on each of three seeds. Its grounding margin is the answer against every token.
Measured there for generative models only, so only they take it.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from ..baselines.calibration import make_calibration
from ..baselines.fixed_budget import GateTraining, train_gates
from ..controller.network import Controller
from ..errors import HippError
from ..core.gates import Gates, map_gates
from ..core.plan import Plan
from ..core.budget import Units, fit, top_up
from .bound import Base
from .ranking import CALIB_IMAGES, CALIB_INSTRUCTIONS, RANK_BY, answer_differences, rank_losses, weighed

# measured on the embedded teacher (docs/studies/polishing.md): at 0.3 a higher learning rate or
# temperature undoes what the controller learned before the run settles, a lower one moves nothing
POLISH = GateTraining(steps=120, batch_size=64, lr=0.05, temperature_start=0.3, temperature_end=0.1)


# a preference's polish: how it reads the grounding margins, whether its utility also covers the
# yes / no answers (hipp.training.objectives: grounding_mode, utility_existence), and how far its gates
# may move from the controller's plan (start temperature and learning rate; POLISH's cold 0.3 / 0.05
# moved the plan less, for a smaller gain from the grounding weight on validation); its margin is the
# answer's against every token, so that a plan asked for grounding keeps answering yes or no (against
# no alone, other words took some answers, and F1 rose with the weight, Spearman >= 0.8, on one validation
# seed of three against all three; on test it did on one seed of three either way on 500 probes, and
# on two of three with this margin on 2000)
# utility_floor, batch_follows_split and scaled False (the user's weights without the recipe's scales) were
# measured on validation and not adopted (the study's last section)
SPLIT = {"grounding_mode": "hinge", "utility_existence": False, "temperature_start": 1.0, "lr": 0.1,
         "existence_margin": "every-token", "utility_floor": 0.0, "batch_follows_split": False, "scaled": True}

MAX_STEPS = 10_000  # 80 times POLISH.steps, hours on a CPU: more is a typo, not a plan
MAX_TRIES = 16


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        shown = repr(steps) if len(repr(steps)) <= 40 else repr(steps)[:37] + "..."
        raise HippError(f"polish steps must be a whole number >= 0 and at most {MAX_STEPS}, got {shown}")
    return steps


@torch.no_grad()
def plan_logits(controller: Controller, plan: Plan) -> Gates:
    """The controller's gate logits behind a bound-query plan (or a preference's plan under a bound),
    shifted by the fit's offset so that the plan's own units are the ones with logit > 0."""
    names = controller.objective_names
    pref = torch.tensor([[plan.preference.get(n, 0.0) for n in names]], dtype=torch.float64)
    if "search" in plan.meta:
        target, offset = plan.meta.get("flops_target"), plan.meta["search"]["logit_offset"]
    else:  # trade_off.own_logits reads the FLOPs bound as the target
        target, offset = plan.meta.get("max_flops"), plan.meta["trade_off"]["offset"]
    dtype = controller.trunk[0].weight.dtype
    targets = torch.tensor([math.nan if target is None else target], dtype=dtype) if controller.takes_target else None
    return map_gates(lambda t: t[0].detach().float().cpu() + offset, controller(pref.to(dtype), targets))


def on_its_split(controller: Controller, plan: Plan, training: GateTraining, split: dict = SPLIT) -> GateTraining:
    """`training` weighing utility and grounding as the controller weighs `plan`'s preference: its
    weights divided by the recipe's loss scales (objectives.scale), normalised; the losses read as
    `split` says (SPLIT), which may also set how far the gates move (temperature_start, lr) and the
    grounding margin (existence_margin; the controller's own where `split` is silent), the least
    share utility keeps (utility_floor) and whether the batches hold existence questions in the
    grounding's share (batch_follows_split; else every kind in turn, 3 in 10)."""
    objectives = (controller.extra.get("train_config") or {}).get("objectives") or {}
    scale = objectives.get("scale") or {}
    split = {"existence_margin": objectives.get("existence_margin", training.existence_margin), **split}
    if not split.pop("scaled", True):  # the user's weights as they stand
        scale = {}
    u, g = (plan.preference.get(n, 0.0) / scale.get(n, 1.0) for n in ("utility", "grounding"))
    floor = split.pop("utility_floor", 0.0)
    if not 0.0 <= floor < 1.0:
        raise HippError(f"the polish's utility floor must be in [0, 1), got {floor!r}"[:160])
    share = max(u / (u + g), floor)
    if split.pop("batch_follows_split", False):  # existence questions in the batch as the loss weighs them
        split["existence_share"] = 1.0 - share
    return replace(training, utility_weight=share, grounding_weight=1.0 - share, **split)


def polished_plan(base: Base, controller: Controller, plan: Plan, training: GateTraining = POLISH, seed: int = 0,
                  split: dict = SPLIT) -> tuple[Plan, dict]:
    """`plan` after a gate run with `training` from its logits, fitted to its bounds (not yet compared
    with `plan`), and that run's {train_seconds, expected_flops, ...}. A preference's plan under a
    bound trains on its own split (on_its_split)."""
    if not ("search" in plan.meta or "trade_off" in plan.meta) or "max_flops" not in plan.meta:
        raise HippError("polishing needs a plan from a --max-flops query")
    if "trade_off" in plan.meta:
        from ..storage.checkpoint import family
        if family(base.model) != "llava":
            raise HippError("polishing a preference under a bound is measured on generative (LLaVA) models only; "
                            "for this model polish a bound query (--max-flops without --pref)")
        training = on_its_split(controller, plan, training, split)
    bounds = {k: plan.meta[f"max_{k}"] for k in ("flops", "params") if f"max_{k}" in plan.meta}
    calibration = make_calibration(base.model, base.tokenizer, base.preprocess_cfg)
    gates, info = train_gates(base.model, controller.space, calibration, bounds["flops"], seed, training,
                              init=plan_logits(controller, plan), progress=True)
    units = Units(controller.space)
    flat = units.flat(map_gates(lambda t: t.detach().double().cpu(), gates()))
    mask, _ = top_up(units, flat, fit(units, flat, bounds, 0).k, bounds)
    return units.plan(mask, plan.preference, dict(plan.meta)), info


def pick_by_split(parts: list[tuple[float, float]], share: float, shares: list[float] | None = None) -> int:
    """The candidate whose answers differ least from the teacher's as a polish share weighs them: `share`
    x its share of yes / no answers differing + (1 - share) x its share of the others (`parts`, from
    ranking.answer_differences). Ties go to the candidate polished at the share nearest (`shares`), then
    to the first. Over one fixed pool this is a linear scalarisation, so the pick's yes / no part can
    only fall as `share` rises: a larger hallucination weight never picks a plan that keeps fewer of
    the teacher's yes / no answers on the calibration instructions."""
    if not parts:
        raise HippError("no candidate plans to pick from")
    own = shares if shares is not None else [share] * len(parts)
    if len(own) != len(parts):
        raise HippError(f"{len(own)} polish shares for {len(parts)} candidate plans")
    return min(range(len(parts)), key=lambda i: (weighed(parts[i], share), abs(own[i] - share), i))


def pool_picks(base: Base, controller: Controller, plans: list[Plan], split: dict = SPLIT,
               shares: list[float] | None = None) -> tuple[list[tuple[float, float]], list[float], list[int]]:
    """(each plan's answers differing from the teacher's on the calibration instructions, as
    ranking.answer_differences gives them; each plan's own polish share; for each of `shares` (default:
    the plans' own) the plan pick_by_split picks)."""
    parts = answer_differences(base, plans, CALIB_INSTRUCTIONS)
    own = [on_its_split(controller, p, POLISH, split).grounding_weight for p in plans]
    return parts, own, [pick_by_split(parts, s, own) for s in (own if shares is None else shares)]


def check_pool(pool) -> tuple[float, ...]:
    """A pool's grounding weights: numbers in [0, 1]."""
    if isinstance(pool, (str, bytes)) or not hasattr(pool, "__iter__"):
        raise HippError(f"a pool is a list of grounding weights, got {pool!r}"[:160])
    pool = tuple(pool)
    for w in pool:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise HippError(f"a pool's grounding weights must be numbers in [0, 1], got {w!r}"[:160])
    return pool


def resplit(controller: Controller, plan: Plan, weight: float) -> Plan:
    """The controller's plan under `plan`'s bounds for the preference it was asked, its quality weight
    split `1 - weight` to utility and `weight` to grounding (a pool candidate)."""
    from .trade_off import plan_for_preference

    meta = plan.meta
    if "max_latency" in meta or "round" in meta:
        raise HippError("a pool of splits is polished under FLOPs / params bounds, unrounded")
    (weight,) = check_pool([weight])
    asked = dict(meta["trade_off"]["asked"])
    quality = asked.get("utility", 0.0) + asked.get("grounding", 0.0)
    asked.update(utility=(1 - weight) * quality, grounding=weight * quality)
    return plan_for_preference(controller, asked, max_flops=meta.get("max_flops"), max_params=meta.get("max_params"))


def polish(base: Base, controller: Controller, plan: Plan, steps: int = POLISH.steps, seed: int = 0,
           rank_by: str = RANK_BY, split: dict = SPLIT, tries: int = 1, pool: tuple = ()) -> Plan:
    """`plan` (from query.plan_for_budget with a max_flops bound) after `steps` polishing steps, or
    `plan` itself when the polished plan ranks worse; meta["polish"] says what happened. A preference's
    plan may be polished `tries` times (seeds seed, seed + 1, ...) and, with `pool` (grounding weights),
    so may the controller's plans for those splits of its quality weight under the same bounds; of them
    all the one whose greedy answers differ least from the teacher's as its own split weighs them is kept
    (pick_by_split). One polish's draw moves a plan as much as a step of 0.25 in the split; three tries
    did not steady the rise of F1 with the weight on the one validation seed run, nor did a pool of the
    five weights 0, 0.25, ..., 1 on validation seed 0 (its 90 yes / no calibration answers could not tell
    the upper plans apart; docs/studies/llava-controller-recipe.md), so one polish of the own split is
    the default."""
    check_steps(steps)
    if isinstance(tries, bool) or not isinstance(tries, int) or not 1 <= tries <= MAX_TRIES:
        raise HippError(f"polish tries must be a whole number from 1 to {MAX_TRIES}, got {tries!r}"[:160])
    pool = check_pool(pool)
    if tries * (1 + len(pool)) > MAX_TRIES:
        raise HippError(f"at most {MAX_TRIES} polishes a plan (tries x (1 + pool)), got {tries} x {1 + len(pool)}")
    if pool and "trade_off" not in plan.meta:
        raise HippError("a pool of splits polishes a preference under a bound (--pref with --max-flops)")
    if steps == 0:
        return plan
    start = time.perf_counter()
    if "trade_off" in plan.meta:  # the user's split, not a ranking's pick: nothing to compare with
        candidates = [plan] + [resplit(controller, plan, w) for w in pool]
        runs = [(polished_plan(base, controller, c, replace(POLISH, steps=steps), seed + t, split), c)
                for c in candidates for t in range(tries)]
        best, scores = 0, None
        if len(runs) > 1:
            share = on_its_split(controller, plan, POLISH, split).grounding_weight
            parts, _, (best,) = pool_picks(base, controller, [p for (p, _), _ in runs], split, [share])
            scores = [weighed(part, share) for part in parts]
        (polished, info), made_for = runs[best]
        if best >= tries:  # another split's plan, under the same bounds: it answers the user's preference
            polished.preference, polished.meta = plan.preference, {**polished.meta, "trade_off": plan.meta["trade_off"]}
        polished.meta["polish"] = {"steps": steps, "kept": True, "split": "own" if best < tries else "pool",
                                   "expected_flops": info["expected_flops"], "tries": tries, "pool": list(pool),
                                   "picked": best, "made_for": dict(made_for.preference), "disagreement": scores,
                                   "seconds": time.perf_counter() - start}
        return polished
    polished, info = polished_plan(base, controller, plan, replace(POLISH, steps=steps), seed, split)
    search = plan.meta["search"]  # the search ranked `plan` already, unless on other terms
    calib_n = search.get("calibration_images", CALIB_IMAGES)  # the same images as the search's ranking
    (after,), how = rank_losses(base, [polished], rank_by, calib_n)
    before = search["loss"] if how == search["ranked_by"] else rank_losses(base, [plan], rank_by, calib_n)[0][0]
    chosen = polished if after < before else plan
    chosen.meta = dict(chosen.meta)
    chosen.meta["polish"] = {"steps": steps, "kept": chosen is polished, "loss_before": before, "loss_after": after,
                             "expected_flops": info["expected_flops"], "seconds": time.perf_counter() - start}
    return chosen
