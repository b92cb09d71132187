"""Gate mathematics, kept in one place so it can be tested without a model.

A gate set is the triple (layer [..., L], heads: list of [..., h_l], channels: list of [..., c_l])
in PruneSpace layer order; the leading dims are an optional preference batch. The same triple
carries logits, keep-probabilities, relaxed samples or hard 0/1 plans.

Training uses Gumbel-sigmoid (binary Concrete) samples: sigmoid((logit + logistic noise) / T).
The straight-through variant returns exact 0/1 in the forward pass (so the student sees a real
sub-network) while gradients flow through the relaxed sample. Queries use deterministic hard
gates: a unit is kept when its logit is > 0, i.e. when its keep-probability exceeds 1/2.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import HippError

Gates = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]


def map_gates(fn: Callable[[torch.Tensor], torch.Tensor], gates: Gates) -> Gates:
    layer, heads, channels = gates
    return fn(layer), [fn(h) for h in heads], [fn(c) for c in channels]


def keep_prob(logits: torch.Tensor) -> torch.Tensor:
    """Probability that a unit is kept; expected costs are computed from these."""
    return torch.sigmoid(logits)


def logistic_noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                   eps: float = 1e-6) -> torch.Tensor:
    """log(u) - log(1 - u): the difference of two Gumbels, so sigmoid(logit + noise) > 1/2 w.p. sigmoid(logit)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp(eps, 1 - eps)
    return torch.log(u) - torch.log1p(-u)


class _StraightThrough(torch.autograd.Function):
    # A Function rather than `hard + soft - soft.detach()`: that sum rounds to 0.99999994 in float32,
    # and the student must see exact 0/1 gates to match the materialised model.
    @staticmethod
    def forward(ctx, soft, threshold):
        return (soft > threshold).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(soft: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Forward: (soft > threshold) as exact 0/1; backward: the gradient of `soft` unchanged."""
    return _StraightThrough.apply(soft, threshold)


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
                   hard: bool = False) -> torch.Tensor:
    """A relaxed Bernoulli(sigmoid(logits)) sample; `hard=True` makes it straight-through 0/1.

    Lower temperatures give samples closer to 0/1 (and noisier gradients).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    noise = logistic_noise(logits.shape, generator, logits.device, logits.dtype)
    soft = torch.sigmoid((logits + noise) / temperature)
    return straight_through(soft) if hard else soft


def sample_gates(logits: Gates, temperature: float, generator: torch.Generator | None = None,
                 hard: bool = True) -> Gates:
    return map_gates(lambda x: gumbel_sigmoid(x, temperature, generator, hard), logits)


def hard_gates(logits: torch.Tensor) -> torch.Tensor:
    """Deterministic query gate: 1 where logit > 0 (keep-probability > 1/2), else 0."""
    return (logits > 0).to(logits.dtype)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask keeping the k highest scores along the last dim; ties go to the lower index."""
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    # stable descending sort makes tie-breaking reproducible across runs and devices
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores).scatter(-1, order, 1.0)


def couple(gates: Gates) -> Gates:
    """Hierarchy: a head or channel counts only as much as its layer is kept.

    For probabilities this gives P(head and layer kept) (independent gates); for hard gates it
    zeroes the heads and channels of a dropped layer. PruneSpace.costs already multiplies by the
    layer term, so pass it *uncoupled* probabilities (coupling twice would square the layer term);
    hard 0/1 gates give the same costs either way.
    """
    layer, heads, channels = gates
    z = [layer[..., i:i + 1] for i in range(layer.shape[-1])]
    return layer, [h * zi for h, zi in zip(heads, z)], [c * zi for c, zi in zip(channels, z)]


def hard_plan(logits: Gates) -> Gates:
    """Query-time gates: threshold every logit at 0, then apply the hierarchy."""
    return couple(map_gates(hard_gates, logits))


@dataclass(frozen=True)
class TemperatureSchedule:
    """Anneal the Gumbel-sigmoid temperature from t0 to t1 over `steps`, then hold t1.

    "exp" interpolates geometrically (equal ratios per step, the usual choice for Concrete
    relaxations); "linear" interpolates linearly. Bad settings come from a config: HippError.
    """
    t0: float = 1.0
    t1: float = 0.1
    steps: int = 1000
    kind: str = "exp"

    def __post_init__(self):
        if self.t0 <= 0 or self.t1 <= 0:
            raise HippError(f"temperatures must be > 0, got t0={self.t0}, t1={self.t1}")
        if self.kind not in ("exp", "linear"):
            raise HippError(f"unknown temperature schedule {self.kind!r}; expected 'exp' or 'linear'")

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0), self.steps) / self.steps if self.steps > 0 else 1.0
        if self.kind == "exp":
            return math.exp(math.log(self.t0) + frac * (math.log(self.t1) - math.log(self.t0)))
        return self.t0 + frac * (self.t1 - self.t0)
