"""Plans from a trained controller: for a preference, or for a cost bound (max FLOPs / params ratio).

A preference query is the controller's own hard plan: no VLM is loaded. A bound query searches:

1. candidates: preferences on sweeps from each quality objective (utility, grounding) to each cost
   objective, plus a coarse simplex grid, and, when the controller takes a FLOPs target, quality
   preferences with targets at and just below a FLOPs bound; all pushed through the controller in
   one batch;
2. fit: for each candidate, the largest set of its highest-logit units that meets the bound (a
   global logit offset; cost only grows as units are added, so a binary search finds it);
3. rank: the few distinct fits that needed the smallest offset (closest to what the controller
   itself proposes for this budget) are topped up with the highest-logit heads / channels that
   still fit (one layer or one head alone can be several percent of the cost, so an offset alone
   can stop far below the bound), run hard-gated on a calibration batch (val shape scenes, and
   Fashion-MNIST train images when installed), and the lowest ranking loss against the same model
   ungated wins: by default the sum of the zero-shot loss (how far the class distributions over
   the shape attributes and the Fashion-MNIST classes move) and the caption distillation loss of
   training; either alone on request (`rank_by`).

The result says which preference it started from, the offset, how many units the top-up added
and every ranked candidate, so the choice can be checked by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.budget import Units, check_bounds, check_possible, fit, meets, ratios, top_up
from ..core.gates import map_gates
from ..controller.network import Controller
from ..errors import HippError
from ..core.plan import Plan
from ..core.preference import COSTS, format_spec, simplex_grid, sweep
from .ranking import CALIB_IMAGES, CALIB_INSTRUCTIONS, RANK_BY, check_rank_by, rank_losses
from .tokens import token_level

# Ranking: how many distinct fits are run (each on CALIB_IMAGES val scenes + Fashion-MNIST images
# for the embedded teacher, see search_defaults). At 48 + 48 the loss's noise swapped candidates 3 points apart at a FLOPs ratio of 0.3
# (docs/studies/bound-search-ranking.md).
RANK_CANDIDATES = 16
TEACHER_FLOPS = 2.5e8  # the embedded teacher's FLOPs per image + caption, to which the two above were fitted
LLAVA_TEACHER_FLOPS = 5.1e8  # the embedded LLaVA teacher's per sample (prefill + declared decoding), for CALIB_INSTRUCTIONS


# --- the base model a controller steers -------------------------------------------------------

@dataclass
class Base:
    model: torch.nn.Module   # frozen, eval, swapped to prunable blocks
    spec: str                # folder path or open_clip name, as resolved
    pretrained: str | None
    model_cfg: dict
    preprocess_cfg: dict
    tokenizer: object        # a LLaVA model's: its LlavaProcessor
    fingerprint: str


def resolve_base(controller: Controller, controller_dir=None, base_model: str | None = None) -> str:
    """The base model named in controller.json (or given), with a relative folder also looked up
    from the controller's folder and its parents (training usually ran from the repository root)."""
    spec = base_model if base_model is not None else controller.extra.get("base_model")
    if not spec:
        raise HippError("the controller names no base model (controller.json extra.base_model); give --base-model")
    from ..storage.checkpoint import look_up

    return look_up(str(spec), controller_dir)


def load_base(controller: Controller, controller_dir=None, base_model: str | None = None,
              device: str = "cpu") -> Base:
    """Load the frozen VLM, check it is the controller's (weights fingerprint, prune space), make it
    prunable, and put it on `device` (the fingerprint is taken on the CPU first)."""
    from ..backends import make_prunable
    from ..storage.checkpoint import family, fingerprint, get_processor, get_tokenizer, load_model, preprocess_cfg

    spec = resolve_base(controller, controller_dir, base_model)
    pretrained = controller.extra.get("pretrained")
    seed = (controller.extra.get("train_config") or {}).get("seed")  # training built the base with it
    model = load_model(spec, pretrained=pretrained, expect=controller.extra.get("family"),
                       seed=seed if isinstance(seed, int) else None)
    fp = fingerprint(model)
    if controller.fingerprint and fp != controller.fingerprint:
        raise HippError(f"base model {spec} has weights fingerprint {fp}; the controller was trained for "
                        f"{controller.fingerprint}")
    groups = {l.channel_group for l in controller.space.layers}
    if len(groups) != 1:
        raise HippError(f"the controller's space mixes channel groups {sorted(groups)}; HiPP uses one")
    space = make_prunable(model, groups.pop(), tokens=controller.tokens_arg)
    if space != controller.space:
        raise HippError(f"the prune space of {spec} differs from the controller's (another architecture?)")
    model_cfg = base_config(model, spec)
    model.to(check_device(device))
    if family(model) == "llava":  # images and text both go through its processor
        return Base(model, spec, pretrained, model_cfg, {}, get_processor(spec), fp)
    return Base(model, spec, pretrained, model_cfg, preprocess_cfg(model), get_tokenizer(spec), fp)


def check_device(device: str) -> torch.device:
    """A torch device this machine has, or one line saying why not."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise HippError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise HippError(f"device {device} is not available on this machine (CUDA devices: "
                        f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    if d.type not in ("cpu", "cuda"):
        raise HippError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return d


def search_defaults(space, generative: bool = False) -> dict[str, int]:
    """Candidates ranked and calibration images per ranking loss, scaled to the model: the ranking runs
    every candidate on the images, so its work grows with both and with the model's FLOPs per sample.
    The embedded teacher (~0.25 GFLOPs per image + caption) gets the figures chosen on it
    (docs/studies/bound-search-ranking.md); a bigger model gets fewer images, never under 32, and
    past 2 GFLOPs half the candidates, so a ViT-B-32 query stays within minutes on a CPU. A generative
    model's calibration is instructions answered in full: the embedded LLaVA teacher (~0.51 GFLOPs a
    sample, prefill and declared decoding) gets the 300 chosen on it, a bigger model fewer, never under
    30 (3 of each kind)."""
    dense = space.dense_costs()
    per_sample = sum(dense[f"flops/{s}"] for s in space.stages)
    if generative:
        images = int(min(CALIB_INSTRUCTIONS, max(30, round(CALIB_INSTRUCTIONS * LLAVA_TEACHER_FLOPS / per_sample))))
    else:
        images = int(min(CALIB_IMAGES, max(32, round(CALIB_IMAGES * TEACHER_FLOPS / per_sample / 32) * 32)))
    return {"n_rank": RANK_CANDIDATES if per_sample <= 2e9 else RANK_CANDIDATES // 2, "calib_n": images}


def check_search(n_rank: int | None, calib_n: int | None) -> None:
    for name, v in (("--candidates", n_rank), ("--calib-images", calib_n)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise HippError(f"{name} must be a positive whole number, got {v!r}")


def base_config(model: torch.nn.Module, spec: str) -> dict:
    """The config an export records to rebuild its model: open_clip's model_cfg or transformers' config."""
    from ..storage.checkpoint import CONFIG_NAME, family
    from ..storage.fileio import read_json

    if family(model) == "llava":  # the transformers model itself, not wrapped
        return model.config.to_dict()
    if family(model) != "open_clip":
        return model.hf.config.to_dict()
    if Path(spec).is_dir():
        model_cfg = read_json(Path(spec) / CONFIG_NAME).get("model_cfg")
    else:
        import open_clip
        model_cfg = open_clip.get_model_config(spec)
    if not isinstance(model_cfg, dict):
        raise HippError(f"cannot find the open_clip model_cfg of {spec}")
    return model_cfg


def candidate_preferences(names, points: int = 11) -> torch.Tensor:
    """Sweeps from each quality objective to each cost objective, plus a coarse simplex grid."""
    names = list(names)
    quality = [n for n in names if n not in COSTS]
    costs = [n for n in names if n in COSTS]
    rows = [sweep(names, q, c, points, dtype=torch.float64) for q in quality for c in costs]
    if len(names) > 1:
        rows.append(simplex_grid(len(names), divisions=3, dtype=torch.float64))
    else:
        rows.append(torch.ones(1, 1, dtype=torch.float64))
    prefs = torch.cat(rows)
    keep, seen = [], set()
    for i, row in enumerate(prefs):  # first occurrence wins, so sweep order breaks ties
        key = tuple(round(v, 9) for v in row.tolist())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return prefs[keep]


TARGET_STEPS = (-0.1, -0.05, -0.025, 0.0)  # the penalty leaves plans a little above their target


def target_candidates(names, max_flops: float, points: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Quality preferences (sweeps between the quality objectives) x FLOPs targets near the bound."""
    names = list(names)
    quality = [n for n in names if n not in COSTS]
    if len(quality) > 1:
        prefs = torch.cat([sweep(names, a, b, points, dtype=torch.float64)
                           for i, a in enumerate(quality) for b in quality[i + 1:]])
    else:
        prefs = torch.tensor([[float(n == quality[0]) for n in names]], dtype=torch.float64)
    prefs = torch.unique(prefs, dim=0)
    targets = [max_flops + d for d in TARGET_STEPS if max_flops + d > 0]
    return (prefs.repeat(len(targets), 1),
            torch.tensor(targets, dtype=torch.float64).repeat_interleave(len(prefs)))


def search_preferences(controller: Controller, bounds: dict, points: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Every preference a bound query tries, with its FLOPs target (NaN: none)."""
    names = controller.objective_names
    prefs = candidate_preferences(names, points)
    targets = torch.full((len(prefs),), math.nan, dtype=torch.float64)
    if controller.takes_target and "flops" in bounds:
        extra, t = target_candidates(names, bounds["flops"])
        prefs, targets = torch.cat([prefs, extra]), torch.cat([targets, t])
    return prefs, targets


@dataclass
class Candidate:
    plan: Plan     # meets the bound(s)
    offset: float  # the global logit offset its fit needed
    added: int     # units the top-up added


@torch.no_grad()
def bound_candidates(controller: Controller, max_flops: float | None = None, max_params: float | None = None,
                     n_rank: int = RANK_CANDIDATES, points: int = 11, max_latency: float | None = None,
                     latency=None, rounding: tuple[int, int] | None = None, tokens=None) -> list[Candidate]:
    """Steps 1-2 of the module doc and the top-up: up to `n_rank` distinct plans that meet the bound(s),
    the smallest logit offset first (then sweep order). `latency` (a LatencyModel) prices a latency
    bound; `rounding` (channels, units) keeps counts per layer in those multiples (hipp.query.rounding).
    `tokens` = (a TokenLevel, kept counts): the weights are fitted at each count in turn, whose plans
    keep that many tokens, up to `n_rank` candidates each (so that every count, all tokens included,
    has the candidates a weights-only query would rank). A controller that chooses the count itself
    fits each preference at its own count, and the `n_rank` fits with the smallest offsets are kept."""
    bounds = check_bounds(max_flops, max_params, max_latency)
    if tokens is None and not controller.space.tokens:
        return _candidates(controller, Units(controller.space, latency), bounds, n_rank, points, rounding)
    if tokens is None:  # the controller chooses the count: each preference's weights are fitted at its own
        prefs, targets = search_preferences(controller, bounds, points)
        own = controller.token_counts(prefs, targets if controller.takes_target else None)[:, 0]
        space, per_count = controller.space, [(int(k), own == k) for k in torch.unique(own).tolist()]
    else:
        level, counts = tokens
        space, per_count = controller.space.with_tokens(level), [(k, None) for k in counts]
    found, refused = [], None
    for k, rows in per_count:  # a count whose smallest plan is over the bound adds no candidate
        try:
            found += _candidates(controller, Units(space, latency, [k]), bounds, n_rank, points, rounding, rows)
        except HippError as e:
            refused = e
    if not found:
        raise refused
    if tokens is None:  # the controller's own proposals: those nearest the bound, whatever their count
        found = sorted(found, key=lambda c: abs(c.offset))[:n_rank]
    return found


def _candidates(controller: Controller, units: Units, bounds: dict, n_rank: int, points: int,
                rounding, rows: torch.Tensor | None = None) -> list[Candidate]:
    """`rows`: which of the search's preferences to fit (None: all)."""
    units.check_keys(bounds)
    names = controller.objective_names
    prefs, targets = search_preferences(controller, bounds, points)
    dtype = controller.trunk[0].weight.dtype
    logits = controller(prefs.to(dtype), targets.to(dtype) if controller.takes_target else None)
    fits = []
    for i in range(len(prefs)) if rows is None else rows.nonzero()[:, 0].tolist():
        flat = units.flat(map_gates(lambda t: t[i].detach().cpu(), logits))
        fits.append((fit(units, flat, bounds, i), flat))
    check_possible(units, fits[0][0], bounds)  # even the plan with no layer at all may be over the bound
    # the controller's own proposals for this budget first: smallest offset, then sweep order
    shortlist, seen = [], set()
    for found, flat in sorted(fits, key=lambda ff: (abs(ff[0].offset), ff[0].index)):
        if found.key not in seen:
            seen.add(found.key)
            shortlist.append((found, flat))
        if len(shortlist) == n_rank:
            break
    candidates, seen = [], set()
    for found, flat in shortlist:
        mask, added = top_up(units, flat, found.k, bounds)
        if rounding is not None:
            from .rounding import round_to
            mask, added = round_to(units, flat, mask, bounds, *rounding)
        pref = dict(zip(names, prefs[found.index].tolist()))
        target = float(targets[found.index])
        plan = units.plan(mask, pref, {"flops_target": target} if math.isfinite(target) else None)
        key = plan.mask_key()
        if key in seen:
            continue
        seen.add(key)
        assert meets(units.measure(plan, bounds), bounds), "top-up crossed the bound"
        candidates.append(Candidate(plan, found.offset, added))
    return candidates


@torch.no_grad()
def plan_for_budget(controller: Controller, max_flops: float | None = None, max_params: float | None = None,
                    base: Base | None = None, n_rank: int | None = None, calib_n: int | None = None,
                    points: int = 11, rank_by: str = RANK_BY, max_latency: float | None = None,
                    latency=None, rounding: tuple[int, int] | None = None, token_counts=None,
                    token_rule: str | None = None) -> Plan:
    """The plan that meets the bound(s) with the lowest ranking loss on a calibration batch (see module doc).

    `n_rank` candidates are ranked on `calib_n` images per loss (None: search_defaults for the model).
    Without `base` the candidates cannot be run, and the fit needing the smallest offset wins.
    A latency bound needs `latency` (a LatencyModel); with one, the plan records its predicted latency.
    `token_counts`: visual tokens to keep, one count or several to choose among (the ranking chooses);
    the base model's token level (ranked by `token_rule`, None: its default) prices them
    (hipp/backends/visual_tokens.py).
    """
    bounds = check_bounds(max_flops, max_params, max_latency)
    check_rank_by(rank_by)  # before the search, not after it
    check_search(n_rank, calib_n)
    from ..storage.checkpoint import family
    defaults = search_defaults(controller.space, generative=base is not None and family(base.model) == "llava")
    n_rank = defaults["n_rank"] if n_rank is None else n_rank
    calib_n = defaults["calib_n"] if calib_n is None else calib_n
    tokens = None
    if token_counts is not None:
        if base is None:
            raise HippError("a visual-token budget needs the base model, whose token level prices it")
        tokens = (token_level(base.model, token_rule), list(token_counts))
    candidates = bound_candidates(controller, max_flops, max_params, n_rank, points, max_latency, latency, rounding,
                                  tokens)
    if base is not None:
        losses, ranked_by = rank_losses(base, [c.plan for c in candidates], rank_by, calib_n)
    else:
        losses = [math.nan] * len(candidates)
        ranked_by = "smallest logit offset (no base model given)"
    order = sorted(range(len(candidates)),
                   key=lambda j: (losses[j] if base is not None else 0.0, abs(candidates[j].offset), j))
    table = []
    for j in order:
        c = candidates[j]
        r = ratios(c.plan, latency)
        table.append({"preference": format_spec(c.plan.preference), "flops_target": c.plan.meta.get("flops_target"),
                      **({"tokens_kept": [int(k) for k in c.plan.token_keep]} if c.plan.space.tokens else {}),
                      "logit_offset": c.offset,
                      "units_added": c.added, "flops_ratio": r["flops"], "params_ratio": r["params"],
                      **({"latency_ratio": r["latency"]} if latency is not None else {}),
                      "loss": None if math.isnan(losses[j]) else losses[j]})
    best = candidates[order[0]]
    tried = len(search_preferences(controller, bounds, points)[0])
    best.plan.meta.update({f"max_{k}": v for k, v in bounds.items()})
    best.plan.meta["search"] = {"rank_by": rank_by if base is not None else None, "ranked_by": ranked_by,
                                "candidates_ranked": n_rank, "calibration_images": calib_n,
                                "preferences_tried": tried,
                                "logit_offset": best.offset, "units_added": best.added,
                                "loss": table[0]["loss"], "candidates": table}
    if rounding is not None:
        best.plan.meta["round"] = {"channels": rounding[0], "units": rounding[1]}
    if latency is not None:
        best.plan.meta["latency"] = latency.plan_report(best.plan)
    return best.plan
