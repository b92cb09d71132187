"""Hardware-friendly rounding: per kept layer, MLP channels in multiples of N and attention units
in multiples of M, the units kept chosen by the plan's own keys (the controller's logits).

Accelerators run matrix tiles (multiples of 8, 64 or 128 rows); a layer left with 37 channels pays
for 64 on most of them and runs slower than its FLOPs say. With bounds, every layer is first
rounded down (costs only fall, so the bounds still hold), then whole blocks of N channels or M units
(the highest-keyed ones still out, ranked by their mean key) are added back while every bound
still holds. Without bounds (a preference query) each count goes to the nearest multiple.
"""
from __future__ import annotations

import math

import torch

from ..core.budget import Units, meets
from ..errors import HippError


def check_rounding(space, channels: int | None, units: int | None) -> tuple[int, int] | None:
    """(channels multiple, units multiple), or None when neither is given; one line for bad input."""
    if channels is None and units is None:
        return None
    channels, units = (1 if channels is None else channels), (1 if units is None else units)
    for name, v in (("--round", channels), ("--round-heads", units)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HippError(f"{name} must be a positive whole number, got {v!r}")
    for spec in space.layers:
        g = spec.channel_group
        if channels % g or spec.mlp_hidden % g:
            raise HippError(f"--round {channels} needs whole channel groups: the controller groups MLP channels by "
                            f"{g} ({spec.tower} layer {spec.index} has {spec.mlp_hidden})")
    return channels, units


def _slots(units: Units, mask: torch.Tensor, n_ch: int, n_units: int) -> list[tuple[list[int], int]]:
    """Per kept layer and unit kind: (flat indices of that layer's units of the kind, block size in gates)."""
    out = []
    for i, spec in enumerate(units.space.layers):
        if not mask[i]:
            continue
        for kind, block in (("head", n_units), ("channel", n_ch // spec.channel_group)):
            idx = [u for u, (k, j) in enumerate(zip(units.kind, units.layer)) if k == kind and j == i]
            out.append((idx, block))
    return out


def round_to(units: Units, flat: torch.Tensor, mask: torch.Tensor, bounds: dict, n_ch: int,
             n_units: int) -> tuple[torch.Tensor, int]:
    """The rounded mask (module doc) and how many gates it has beyond the rounded-down one."""
    mask = mask.clone().double()
    key = flat.tolist()
    slots = _slots(units, mask, n_ch, n_units)
    for idx, block in slots:  # round down (bounds) or to the nearest multiple (no bounds)
        kept = sorted((u for u in idx if mask[u]), key=lambda u: -key[u])
        out = sorted((u for u in idx if not mask[u]), key=lambda u: -key[u])
        n = len(kept)
        target = (n // block) * block if bounds else min(len(idx) // block * block, int(math.floor(n / block + 0.5)) * block)
        for u in kept[target:]:
            mask[u] = 0.0
        for u in out[: max(target - n, 0)]:
            mask[u] = 1.0
    if not bounds:
        return mask, 0
    added = 0
    while True:
        blocks = []
        for idx, block in slots:
            out = sorted((u for u in idx if not mask[u] and key[u] != -math.inf), key=lambda u: -key[u])
            if len(out) >= block:
                chosen = out[:block]
                blocks.append((sum(key[u] for u in chosen) / block, chosen))
        for _, chosen in sorted(blocks, key=lambda b: -b[0]):
            trial = mask.clone()
            trial[chosen] = 1.0
            if meets(units.measure(units.plan(trial, {}), bounds), bounds):
                mask, added = trial, added + len(chosen)
                break
        else:
            return mask, added


def rounded_counts(plan, n_ch: int, n_units: int) -> bool:
    """Whether every kept layer of `plan` holds multiples of the given sizes (a check for tests and reports)."""
    for i, spec in enumerate(plan.space.layers):
        if plan.layer_keep[i] and (int(plan.head_keep[i].sum()) % n_units or len(plan.kept_channels(i)) % n_ch):
            return False
    return True


@torch.no_grad()
def round_preference_plan(controller, pref, rounding: tuple[int, int]):
    """A preference's plan with its counts rounded to the nearest multiples, keyed by its own logits."""
    from ..core.gates import map_gates

    plan = controller.plan(pref)
    x = torch.tensor([plan.preference[n] for n in controller.objective_names], dtype=controller.trunk[0].weight.dtype,
                     device=controller.trunk[0].weight.device)
    units = Units(controller.space, token_keep=plan.token_keep if controller.space.tokens else None)  # its own count
    flat = units.flat(map_gates(lambda t: t.detach().cpu(), controller(x)))
    mask = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep])
    mask, _ = round_to(units, flat, mask, {}, *rounding)
    return units.plan(mask, plan.preference, {"round": {"channels": rounding[0], "units": rounding[1]}})
