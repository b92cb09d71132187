"""The field's pruning methods as baselines on HiPP's prune space, each yielding a hard Plan at a
requested FLOPs ratio so the same evaluation code measures every one of them.

Each method computes per-unit importance its own way; the shared allocator (allocate.py) turns
scores into a plan within TOLERANCE below the target. Use:

    cal = make_calibration(model, tokenizer, preprocess_cfg)        # for data-driven methods
    plan = make_plan("mope", model, space, 0.5, cal, seed=0)
    plans = make_plans("random", model, space, [0.3, 0.5, 0.7], cal, seed=1)

METHODS maps a name to a Method (callable: model, space, budget, calibration, seed, cache -> Plan);
Method.seeds says how many seeds an evaluation averages (random: 3) and Method.compensate whether
the plan is evaluated with FLAP-style bias compensation.
"""
from __future__ import annotations

from ..errors import HippError
from ..core.plan import Plan
from ..core.space import PruneSpace
from .allocate import TOLERANCE, BudgetError, allocate, uniform
from .calibration import Calibration, Damage, make_calibration
from .ecoflap import ecoflap_plan
from .fixed_budget import fixed_budget_plan
from .flap import flap_plan
from .method import Context, Method
from .mope import mope_plan
from .multiflow import multiflow_plan
from .shortgpt import shortgpt_plan
from .simple import magnitude_plan, random_plan, uniform_plan
from .taylor import taylor_plan, wanda_plan
from .units import Scores

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uniform", uniform_plan, "same share of heads and channels in every layer (largest L1 kept)",
           needs_calibration=False),
    Method("random", random_plan, "random removal order, mean of 3 seeds", needs_calibration=False, seeds=3),
    Method("magnitude", magnitude_plan, "global L1 magnitude per FLOP, each layer keeps >= 10%",
           needs_calibration=False),
    Method("shortgpt", shortgpt_plan, "ShortGPT-style: least block influence (1 - cos in/out) layers removed, "
                                      "magnitude width for the rest"),
    Method("taylor", taylor_plan, "LLM-Pruner-style first-order Taylor |dL/dg| on the task loss, global"),
    Method("wanda", wanda_plan, "Wanda-style structured: |W_out| x input norm of the unit's features, global"),
    Method("mope", mope_plan, "MoPE-style: calibration damage of removing each unit; width, then depth"),
    Method("multiflow", multiflow_plan, "MULTIFLOW-style: |w| x connected activation norms, per-tower budgets",
           families=("contrastive",)),
    Method("ecoflap", ecoflap_plan, "ECoFLaP-style: layer budgets from zeroth-order block importance, "
                                    "magnitude inside layers"),
    Method("flap", flap_plan, "FLAP-style: input fluctuation x weight norm, standardised, global; "
                              "bias compensation", compensate=True),
    Method("fixed_budget", fixed_budget_plan, "Gumbel-sigmoid gates with free logits and a Lagrangian, "
                                              "one training per budget", trains=True),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise HippError(f"unknown baseline method {name!r}; choose from {', '.join(METHODS)}") from None


def make_plan(method: str, model, space: PruneSpace, budget: float, calibration: Calibration | None = None,
              seed: int = 0, cache: dict | None = None, options: dict | None = None) -> Plan:
    """The hard plan of `method` at FLOPs ratio `budget` (within TOLERANCE below it).

    `model` is made prunable in place with the space's channel grouping and must match `space`.
    `cache` may be shared by calls on the same (model, space, calibration) to reuse scores;
    `options` are the method's own settings (fixed_budget: GateTraining fields; mope: max_rounds).
    """
    return get_method(method)(model, space, budget, calibration, seed, cache, options)


def make_plans(method: str, model, space: PruneSpace, budgets, calibration: Calibration | None = None,
               seed: int = 0, cache: dict | None = None, options: dict | None = None) -> list[Plan]:
    """One plan per budget, budget-independent scores computed once."""
    m = get_method(method)
    cache = {} if cache is None else cache
    return [m(model, space, b, calibration, seed, cache, options) for b in budgets]


__all__ = ["METHODS", "TOLERANCE", "BudgetError", "Calibration", "Context", "Damage", "Method", "Scores",
           "allocate", "get_method", "make_calibration", "make_plan", "make_plans", "uniform"]
