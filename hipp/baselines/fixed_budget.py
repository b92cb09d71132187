"""Fixed-budget gates (CoFi / UPop style): the controller's gates without the controller.

One free logit per layer, head and channel group, trained for one FLOPs target with the same
Gumbel-sigmoid straight-through gates, temperature schedule, data and teacher pass as the
controller (trainer.Distiller, or the generative distiller for a LLaVA), batches drawn from the calibration's task. The loss is utility +
grounding (when the task has hard negatives) plus a Lagrangian that holds the expected FLOPs ratio
at the target: lambda1 * (f - t) + lambda2 * (f - t)^2, the multipliers updated by gradient ascent.
One such search is needed per budget, which is the cost the preference-conditioned controller
avoids; its wall time is reported as train_seconds.

The hard plan keeps layers whose logit is > 0 and spends the width budget in logit order, so it
meets the target exactly like every other baseline.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backends import clear_gates, image_size
from ..errors import HippError
from ..core.gates import TemperatureSchedule, sample_gates
from ..training.objectives import ObjectiveConfig, Objectives
from ..core.plan import Plan
from ..core.space import PruneSpace
from ..training.trainer import Distiller, lr_factor, set_lr
from .allocate import BudgetError, allocate, width_budget
from .calibration import Calibration
from .method import Context
from .units import Scores


@dataclass
class GateTraining:
    steps: int = 120
    batch_size: int = 32
    shape_fraction: float = 0.5
    negatives: int = 2
    lr: float = 0.1
    lr_schedule: str = "constant"  # trainer.lr_factor; constant measured best here (see matched_to)
    lambda_lr: float = 0.1
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    layer_init: float = 3.0  # layers start kept; widths start at the target's keep share
    utility_weight: float = 1.0    # quality = these weights times the raw losses: the plain sum by default;
    grounding_weight: float = 1.0  # (1 - w, w) trains the gates for one utility : grounding split
    existence_margin: str = "yes-no"  # a LLaVA's grounding margin (hipp.training.objectives)
    grounding_mode: str = "hinge"  # how that margin is read (hipp.training.objectives)
    utility_existence: bool = True  # a LLaVA's utility also covers the yes / no answers (hipp.training.objectives)
    existence_share: float | None = None  # a LLaVA's batches: this share existence questions (None: kinds in turn)

    def __post_init__(self):
        ok = (self.steps >= 1 and self.batch_size >= 2 and 0 < self.shape_fraction <= 1 and self.negatives >= 1
              and self.lr > 0 and self.lambda_lr > 0 and min(self.utility_weight, self.grounding_weight) >= 0
              and self.utility_weight + self.grounding_weight > 0
              and (self.existence_share is None or 0 <= self.existence_share <= 1))
        if not ok:
            raise HippError("fixed_budget options need steps >= 1, batch_size >= 2, 0 < shape_fraction <= 1, "
                            "negatives >= 1, positive learning rates, quality weights >= 0, not both 0, and an "
                            "existence share in [0, 1]")
        lr_factor(self.lr_schedule, 0, self.steps)  # an unknown schedule fails here


def matched_to(train_config: dict) -> dict:
    """GateTraining options giving each per-budget run the controller's own training budget: as many
    steps, as many samples a step (pref_groups x batch), the same data mix and temperature schedule.
    The learning rate stays the fixed-budget gates' own: the controller's cosine decay cost it 2 points at a
    FLOPs ratio of 0.3 (0.802 vs 0.822, BENCHMARKS.md)."""
    data = train_config.get("data", {})
    return {"steps": train_config["steps"],
            "batch_size": data.get("batch_size", 64) * train_config.get("pref_groups", 1),
            "shape_fraction": data.get("shape_fraction", 0.5), "negatives": data.get("negatives", 2),
            "temperature_start": train_config.get("temperature_start", 1.0),
            "temperature_end": train_config.get("temperature_end", 0.1)}


class FreeGates(nn.Module):
    """A logit per unit, in the gate-triple layout the model and the cost functions take."""

    def __init__(self, space: PruneSpace, layer_init: float, width_init: float):
        super().__init__()
        self.layer = nn.Parameter(torch.full((len(space.layers),), float(layer_init)))
        self.heads = nn.ParameterList([nn.Parameter(torch.full((l.num_heads,), float(width_init)))
                                       for l in space.layers])
        self.channels = nn.ParameterList([nn.Parameter(torch.full((l.num_channel_gates,), float(width_init)))
                                          for l in space.layers])

    def forward(self):
        return self.layer, list(self.heads), list(self.channels)

    @torch.no_grad()
    def load(self, logits) -> "FreeGates":
        """Start from given gate logits (a controller's, for polishing one of its plans)."""
        layer, heads, chans = logits
        self.layer.copy_(layer)
        for p, v in zip([*self.heads, *self.channels], [*heads, *chans]):
            p.copy_(v)
        return self


def train_gates(model, space: PruneSpace, calibration: Calibration, target: float, seed: int = 0,
                cfg: GateTraining | None = None, init=None, progress: bool = False) -> tuple[FreeGates, dict]:
    """Train free gates for one FLOPs ratio, from `init` logits if given (else layers kept, widths at the
    target's share); returns them and {train_seconds, expected_flops, ...}."""
    cfg = cfg or GateTraining()
    device = next(model.parameters()).device
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only the gates learn; no gradient buffers for the VLM
    share = min(max(width_budget(space, target) / width_budget(space, 1.0), 0.05), 0.95)
    gates = FreeGates(space, cfg.layer_init, math.log(share / (1 - share)))
    gates = (gates if init is None else gates.load(init)).to(device)
    lambdas = torch.zeros(2, device=device, requires_grad=True)
    opt = torch.optim.Adam(gates.parameters(), lr=cfg.lr)
    ascent = torch.optim.Adam([lambdas], lr=cfg.lambda_lr, maximize=True)
    task = calibration.task
    names = ("utility", "grounding", "flops") if task.has_negatives else ("utility", "flops")
    if not task.has_negatives and cfg.utility_weight == 0:
        raise HippError(f"fixed_budget: task {task.name!r} has no grounding loss, so utility_weight 0 leaves nothing to train")
    objectives = Objectives(ObjectiveConfig(names=names, existence_margin=cfg.existence_margin,
                                            grounding_mode=cfg.grounding_mode,
                                            utility_existence=cfg.utility_existence), space)
    if calibration.generative:
        from ..training.generative import GenerativeDistiller
        distiller = GenerativeDistiller(model, objectives, calibration.tokenizer, device)
    else:
        distiller = Distiller(model, objectives, calibration.tokenizer, calibration.preprocess_cfg, device)
    # its own data seed: neither the calibration batch nor the controller's training batches
    mix = {}
    if cfg.existence_share is not None:
        if not calibration.generative:
            raise HippError("fixed_budget: existence_share weighs a generative task's existence questions")
        from ..data.instruct import mixed_kinds
        mix = {"kinds": mixed_kinds(cfg.existence_share, cfg.batch_size)}
    batches = task.batches(calibration.seed + 1000 + seed, cfg.batch_size, image_size(model),
                           shape_fraction=cfg.shape_fraction, negatives=cfg.negatives, **mix)
    temperature = TemperatureSchedule(cfg.temperature_start, cfg.temperature_end, cfg.steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    flops = float("nan")
    try:
        for step in tqdm(range(cfg.steps), desc="gates", disable=not progress, leave=False):
            batch = batches(step)
            inputs = distiller.inputs(batch)
            teacher = distiller.teacher(inputs, batch)
            logits = gates()
            losses = distiller.losses(logits, sample_gates(logits, temperature(step), g), inputs, teacher, batch)
            gap = losses["flops"] - target
            quality = cfg.utility_weight * losses["utility"] + cfg.grounding_weight * losses.get("grounding", 0.0)
            total = quality + lambdas[0] * gap + lambdas[1] * gap.pow(2)
            opt.zero_grad()
            ascent.zero_grad()
            total.backward()
            set_lr(opt, cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.steps))
            opt.step()
            ascent.step()
            flops = float(losses["flops"].detach())
    finally:
        clear_gates(model)
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
    info = {"train_seconds": time.perf_counter() - start, "steps": cfg.steps, "expected_flops": flops,
            "lambdas": [float(x) for x in lambdas.detach()]}
    return gates, info


def plan_from_gates(space: PruneSpace, gates: FreeGates, target: float) -> Plan:
    """Layers with logit > 0, then the width budget in logit order; layers come back best-first
    while the kept ones cannot spend the budget."""
    layer = gates.layer.detach().double().cpu()
    scores = Scores([h.detach().double().cpu() for h in gates.heads],
                    [c.detach().double().cpu() for c in gates.channels])
    keep = (layer > 0).double()
    waiting = [i for i in torch.argsort(layer, descending=True, stable=True).tolist() if not keep[i]]
    while True:
        try:
            return allocate(space, target, scores, key="score", layer_keep=keep)
        except BudgetError:
            if not waiting:
                raise
            keep[waiting.pop(0)] = 1.0


def fixed_budget_plan(ctx: Context, budget: float, **training) -> Plan:
    """`training` overrides GateTraining fields, e.g. steps=50."""
    known = {f.name for f in fields(GateTraining)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise HippError(f"baseline 'fixed_budget' has no option {unknown[0]!r}; it takes {', '.join(sorted(known))}")
    gates, info = train_gates(ctx.model, ctx.space, ctx.calibration, budget, ctx.seed, GateTraining(**training))
    plan = plan_from_gates(ctx.space, gates, budget)
    plan.meta.update(info)
    return plan
