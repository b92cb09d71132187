"""What a baseline is: a named function (context, budget) -> hard Plan, and the context it runs in.

The context carries a cache that is valid for one (model, space, calibration): scores that do not
depend on the budget (weight magnitudes, activation moments, ablation damages) are computed once
and shared by every budget and by every method that uses them.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..backends import describe, make_prunable
from ..errors import HippError
from ..core.plan import Plan
from ..core.space import PruneSpace
from .allocate import check_target
from .calibration import Calibration, Damage, GenerativeDamage, make_damage


@dataclass
class Context:
    model: object
    space: PruneSpace
    calibration: Calibration | None
    seed: int = 0
    cache: dict = field(default_factory=dict)

    def cached(self, key, compute: Callable):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def damage(self) -> Damage | GenerativeDamage:
        return self.cached("damage", lambda: make_damage(self.model, self.calibration, self.space))


@dataclass(frozen=True)
class Method:
    name: str
    plan: Callable[..., Plan]  # (context, budget, **options)
    summary: str
    needs_calibration: bool = True
    seeds: int = 1            # plans per budget the evaluation averages over (random: 3)
    compensate: bool = False  # evaluate with FLAP-style bias compensation (hipp.export.slicing.compensate_bias)
    trains: bool = False      # learns gates per budget (not training-free): fixed_budget
    families: tuple[str, ...] = ("contrastive", "generative")  # the model families it scores

    def __call__(self, model, space: PruneSpace, budget: float, calibration: Calibration | None = None,
                 seed: int = 0, cache: dict | None = None, options: dict | None = None) -> Plan:
        """The method's plan at FLOPs ratio `budget`; `model` is made prunable with the space's grouping.

        `options` are the method's own keyword settings (e.g. fixed_budget: {"steps": 50}).
        """
        budget = check_target(budget)
        if self.needs_calibration and calibration is None:
            raise HippError(f"baseline {self.name!r} needs calibration data (hipp.baselines.make_calibration)")
        group = space.layers[0].channel_group if space.layers else 1
        if describe(model, group) != space.with_tokens():  # the weights' space (a token level keeps every token)
            raise HippError(f"baseline {self.name!r}: the model does not match the prune space it was given")
        if self.needs_calibration and calibration.task.family not in self.families:
            raise HippError(f"baseline {self.name!r} scores {' and '.join(self.families)} models only")
        make_prunable(model, group)
        options = dict(options or {})
        accepted = inspect.signature(self.plan).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        unknown = [k for k in options if not takes_any and (k not in accepted or k in ("ctx", "budget"))]
        if unknown:
            raise HippError(f"baseline {self.name!r} has no option {unknown[0]!r}")
        start = time.perf_counter()
        ctx = Context(model, space, calibration, int(seed), cache if cache is not None else {})
        plan = self.plan(ctx, budget, **options)
        plan.meta.update({"method": self.name, "seed": int(seed), "compensate": self.compensate,
                          "seconds": time.perf_counter() - start})
        return plan
