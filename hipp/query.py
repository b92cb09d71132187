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

from .controller import Controller, load_controller
from .errors import HippError
from .gates import couple, map_gates
from .objectives import COSTS
from .plan import Plan
from .preference import format_spec, simplex_grid, sweep
from .space import TOWERS, PruneSpace

MARGIN = 1e-9  # the top-up stays this far inside the bound, so float round-off never crosses it
# Ranking: how many distinct fits are run, and on how many val scenes + Fashion-MNIST images each.
# At 48 + 48 the loss's noise swapped candidates 3 points apart at a FLOPs ratio of 0.3 (BENCHMARKS.md).
RANK_CANDIDATES = 16
CALIB_IMAGES = 128
# What the ranking compares with the ungated model: "zero_shot", the class distributions over the shape
# attributes and Fashion-MNIST classes (what the utility metrics classify); "distillation", the caption
# similarities the controller trains on; "both", their sum (BENCHMARKS.md compares the three).
RANK_LOSSES = ("both", "zero_shot", "distillation")
RANK_BY = "both"


# --- the base model a controller steers -------------------------------------------------------

@dataclass
class Base:
    model: torch.nn.Module   # frozen, eval, swapped to prunable blocks
    spec: str                # folder path or open_clip name, as resolved
    pretrained: str | None
    model_cfg: dict
    preprocess_cfg: dict
    tokenizer: object
    fingerprint: str


def resolve_base(controller: Controller, controller_dir=None, base_model: str | None = None) -> str:
    """The base model named in controller.json (or given), with a relative folder also looked up
    from the controller's folder and its parents (training usually ran from the repository root)."""
    spec = base_model if base_model is not None else controller.extra.get("base_model")
    if not spec:
        raise HippError("the controller names no base model (controller.json extra.base_model); give --base-model")
    path = Path(str(spec))
    if path.exists() or path.is_absolute() or controller_dir is None:
        return str(spec)
    here = Path(controller_dir).resolve()
    for root in (here, *here.parents):
        if (root / path).exists():
            return str(root / path)
    return str(spec)


def load_base(controller: Controller, controller_dir=None, base_model: str | None = None) -> Base:
    """Load the frozen VLM, check it is the controller's (weights fingerprint, prune space), make it prunable."""
    from .backends import make_prunable
    from .checkpoint import fingerprint, get_tokenizer, load_model, preprocess_cfg

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
    space = make_prunable(model, groups.pop())
    if space != controller.space:
        raise HippError(f"the prune space of {spec} differs from the controller's (another architecture?)")
    model_cfg = base_config(model, spec)
    return Base(model, spec, pretrained, model_cfg, preprocess_cfg(model), get_tokenizer(spec), fp)


def base_config(model: torch.nn.Module, spec: str) -> dict:
    """The config an export records to rebuild its model: open_clip's model_cfg or transformers' config."""
    from .checkpoint import CONFIG_NAME, family
    from .fileio import read_json

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


def input_size(preprocess_cfg: dict) -> int:
    size = preprocess_cfg["size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def calibration(base: Base, n: int = 32, seed: int = 0, fmnist: int = 0, fmnist_start: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images and caption tokens: `n` shape scenes from the val split (never trained or
    evaluated on), plus up to `fmnist` Fashion-MNIST train images from `fmnist_start` on, with a class
    caption, when the dataset is installed (it is optional: compensation then runs on shapes alone)."""
    from .data import shapes, to_input
    from .data.fashion_mnist import CLASSES

    size = input_size(base.preprocess_cfg)
    scenes = shapes.make_scenes("val", n, seed=seed, image_size=size)
    images, texts = [scenes.images], list(scenes.captions)
    train = _fmnist_train(base, fmnist, fmnist_start) if fmnist else None
    if train is not None:
        images.append(train[0])
        texts += [f"a photo of a {CLASSES[int(y)]}." for y in train[1]]
    return to_input(torch.cat(images), base.preprocess_cfg), base.tokenizer(texts)


def _fmnist_train(base: Base, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`n` Fashion-MNIST train images from `start` on (uint8 RGB at model size) and their labels; None
    when the optional dataset is not installed."""
    from .data.fashion_mnist import load_fashion_mnist, to_rgb
    try:
        raw, labels = load_fashion_mnist("train")
    except HippError:
        return None
    return to_rgb(raw[start:start + n], input_size(base.preprocess_cfg)), labels[start:start + n]


@torch.no_grad()
def utility_losses(base: Base, plans: list[Plan], calib) -> list[float]:
    """Utility loss of each plan's hard-gated model against the same model ungated (lower is better)."""
    from .backends import clear_gates, set_gates
    from .objectives import Embeddings, utility_loss

    model = base.model
    images, tokens = calib
    clear_gates(model)
    teacher = Embeddings(model.encode_image(images), model.encode_text(tokens))
    scale = model.logit_scale.exp()
    out = []
    try:
        for plan in plans:
            set_gates(model, *map_gates(lambda t: t.float(), plan.gates))
            student = Embeddings(model.encode_image(images), model.encode_text(tokens))
            out.append(float(utility_loss(student, teacher, scale)))
    finally:
        clear_gates(model)
    return out


def zero_shot_calibration(base: Base, n: int = 128, seed: int = 0, fmnist_start: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Preprocessed single-object val scenes and `n` Fashion-MNIST train images from `fmnist_start` on
    (None when the dataset is not installed): the kinds of images the zero-shot utility metrics classify."""
    from .data import to_input
    from .evaluate import single_object_scenes

    scenes = to_input(single_object_scenes("val", n, base.preprocess_cfg, seed).images, base.preprocess_cfg)
    train = _fmnist_train(base, n, fmnist_start)
    return scenes, None if train is None else to_input(train[0], base.preprocess_cfg)


@torch.no_grad()
def zero_shot_losses(base: Base, plans: list[Plan], calib) -> list[float]:
    """Each plan's zero-shot loss: KL(ungated || hard-gated) of the class distributions over the shape
    attributes and the Fashion-MNIST classes on calibration images (from zero_shot_calibration),
    weighted as the utility weighs its metrics (the shape attributes share half)."""
    from .backends import clear_gates, set_gates
    from .data.fashion_mnist import class_prompts
    from .evaluate import class_embeddings, shape_class_embeddings
    from .objectives import kl_rows

    model, (scenes, fmnist) = base.model, calib
    scale = model.logit_scale.exp()
    share = 0.5 if fmnist is not None else 1.0  # of the weight that goes to the shape attributes

    def logits(m) -> list[tuple[float, torch.Tensor]]:  # (weight, class logits) per zero-shot task
        img = torch.nn.functional.normalize(m.encode_image(scenes), dim=-1)
        attrs = shape_class_embeddings(m, base.tokenizer)
        out = [(share / len(attrs), scale * img @ c.T) for c in attrs.values()]
        if fmnist is not None:
            fm = torch.nn.functional.normalize(m.encode_image(fmnist), dim=-1)
            out.append((0.5, scale * fm @ class_embeddings(m, base.tokenizer, class_prompts()).T))
        return out

    clear_gates(model)
    teacher = logits(model)
    losses = []
    try:
        for plan in plans:
            set_gates(model, *map_gates(lambda t: t.float(), plan.gates))
            losses.append(sum(w * float(kl_rows(t, s)) for (w, t), (_, s) in zip(teacher, logits(model))))
    finally:
        clear_gates(model)
    return losses


# --- fitting one candidate to a bound ---------------------------------------------------------

class _Units:
    """Every gate of a space as one flat vector: layers, then each layer's heads, then channel groups,
    with what each unit adds to the FLOPs / params ratios when its layer is kept (PruneSpace.costs terms)."""

    def __init__(self, space: PruneSpace):
        self.space = space
        dense = space.dense_costs()
        df = sum(dense[f"flops/{t}"] for t in TOWERS)
        dp = sum(dense[f"params/{t}"] for t in TOWERS)
        L = len(space.layers)
        self.sizes = [L] + [l.num_heads for l in space.layers] + [l.num_channel_gates for l in space.layers]
        self.kind, self.layer, self.dflops, self.dparams = [], [], [], []

        def add(kind: str, i: int, flops: float, params: float) -> None:
            self.kind.append(kind)
            self.layer.append(i)
            self.dflops.append(flops / df)
            self.dparams.append(params / dp)

        for i, l in enumerate(space.layers):
            add("layer", i, 0.0, l.layer_params)
        for i, l in enumerate(space.layers):
            for _ in range(l.num_heads):
                add("head", i, l.head_flops, l.head_params)
        for i, l in enumerate(space.layers):
            for size in l.channel_sizes().tolist():
                add("channel", i, size * l.channel_flops, size * l.channel_params)

    def flat(self, logits) -> torch.Tensor:
        layer, heads, chans = logits
        return torch.cat([layer, *heads, *chans]).double()

    def plan(self, mask: torch.Tensor, preference: dict, meta: dict | None = None) -> Plan:
        """A flat 0/1 mask -> a Plan (the hierarchy applied: heads of a dropped layer do not count)."""
        parts = list(mask.double().split(self.sizes))
        L = len(self.space.layers)
        gates = couple((parts[0], parts[1:1 + L], parts[1 + L:]))
        return Plan.from_gates(self.space, gates, preference, meta)


def _ratios(plan: Plan) -> dict[str, float]:
    c = plan.costs()
    return {"flops": c["flops_ratio"], "params": c["params_ratio"]}


def _meets(r: dict, bounds: dict) -> bool:
    return all(r[k] <= v for k, v in bounds.items())


@dataclass
class _Fit:
    index: int        # candidate preference row
    k: int            # its top-k highest-logit units are kept
    offset: float     # the global logit offset that keeps exactly those (closest to 0)
    key: bytes        # identity of the resulting plan


def _fit(units: _Units, flat: torch.Tensor, bounds: dict, index: int) -> _Fit:
    order = torch.sort(flat, descending=True, stable=True).indices
    n = len(flat)

    def mask(k: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.float64)
        m[order[:k]] = 1.0
        return m

    lo, hi = 0, n  # cost grows with k (nested sets), so binary-search the largest feasible k
    if not _meets(_ratios(units.plan(mask(0), {})), bounds):
        return _Fit(index, -1, math.inf, b"")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _meets(_ratios(units.plan(mask(mid), {})), bounds):
            lo = mid
        else:
            hi = mid - 1
    vals = flat[order]
    # logit + offset > 0 keeps exactly the first k units for offset in (-vals[k-1], -vals[k]]
    low = -float(vals[lo - 1]) if lo > 0 else -math.inf
    high = -float(vals[lo]) if lo < n else math.inf
    offset = 0.0 if low < 0 <= high else (high if high < 0 else low)
    return _Fit(index, lo, offset, units.plan(mask(lo), {}).mask_key())


def _top_up(units: _Units, flat: torch.Tensor, k: int, bounds: dict) -> tuple[torch.Tensor, int]:
    """From the top-k plan, add the highest-logit units that still fit, one at a time.

    Works on the *effective* (hierarchy-applied) mask: a layer added here starts with no heads or
    channels (its own cost is only norms and biases), and a second pass reaches the units of layers
    added during the first one.
    """
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    plan = units.plan(torch.zeros(len(flat)).index_fill_(0, torch.tensor(order[:k], dtype=torch.long), 1.0)
                      if k > 0 else torch.zeros(len(flat)), {})
    eff = torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep]).tolist()
    cur = _ratios(plan)
    room = {key: bounds.get(key, math.inf) - MARGIN for key in COSTS}
    added = 0
    for _ in range(2):
        for u in order:
            if eff[u]:
                continue
            layer = units.layer[u]
            if units.kind[u] != "layer" and not eff[layer]:
                continue
            f, p = cur["flops"] + units.dflops[u], cur["params"] + units.dparams[u]
            if f <= room["flops"] and p <= room["params"]:
                eff[u], cur["flops"], cur["params"] = 1.0, f, p
                added += 1
    return torch.tensor(eff, dtype=torch.float64), added


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


def check_bounds(max_flops: float | None, max_params: float | None) -> dict[str, float]:
    bounds = {k: v for k, v in (("flops", max_flops), ("params", max_params)) if v is not None}
    if not bounds:
        raise HippError("give max_flops and/or max_params")
    for k, v in bounds.items():
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
            raise HippError(f"max_{k} must be a ratio in (0, 1], got {v}")
    return {k: float(v) for k, v in bounds.items()}


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
                     n_rank: int = RANK_CANDIDATES, points: int = 11) -> list[Candidate]:
    """Steps 1-2 of the module doc and the top-up: up to `n_rank` distinct plans that meet the bound(s),
    the smallest logit offset first (then sweep order)."""
    bounds = check_bounds(max_flops, max_params)
    units = _Units(controller.space)
    names = controller.objective_names
    prefs, targets = search_preferences(controller, bounds, points)
    dtype = controller.trunk[0].weight.dtype
    logits = controller(prefs.to(dtype), targets.to(dtype) if controller.takes_target else None)
    fits = []
    for i in range(len(prefs)):
        flat = units.flat(map_gates(lambda t: t[i].detach().cpu(), logits))
        fits.append((_fit(units, flat, bounds, i), flat))
    if fits[0][0].k < 0:  # even the plan with no layer at all is over the bound: impossible
        least = _ratios(units.plan(torch.zeros(len(fits[0][1])), {}))
        raise HippError(f"no plan meets {', '.join(f'max_{k}={v:g}' for k, v in bounds.items())}: the smallest "
                        f"possible plan (every layer dropped) has "
                        f"{', '.join(f'{k}_ratio {least[k]:.4f}' for k in bounds)}")
    # the controller's own proposals for this budget first: smallest offset, then sweep order
    shortlist, seen = [], set()
    for fit, flat in sorted(fits, key=lambda ff: (abs(ff[0].offset), ff[0].index)):
        if fit.key not in seen:
            seen.add(fit.key)
            shortlist.append((fit, flat))
        if len(shortlist) == n_rank:
            break
    candidates, seen = [], set()
    for fit, flat in shortlist:
        mask, added = _top_up(units, flat, fit.k, bounds)
        pref = dict(zip(names, prefs[fit.index].tolist()))
        target = float(targets[fit.index])
        plan = units.plan(mask, pref, {"flops_target": target} if math.isfinite(target) else None)
        key = plan.mask_key()
        if key in seen:
            continue
        seen.add(key)
        assert _meets(_ratios(plan), bounds), "top-up crossed the bound"
        candidates.append(Candidate(plan, fit.offset, added))
    return candidates


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANK_LOSSES:
        raise HippError(f"unknown ranking {rank_by!r}; choose from {', '.join(RANK_LOSSES)}")


def rank_losses(base: Base, plans: list[Plan], rank_by: str = RANK_BY, calib_n: int = CALIB_IMAGES
                ) -> tuple[list[float], str]:
    """Each plan's ranking loss (one of RANK_LOSSES) on `calib_n` val shape scenes + as many
    Fashion-MNIST train images (the domains the utility is measured on), and what it was."""
    check_rank_by(rank_by)
    parts, names = [], []
    if rank_by in ("zero_shot", "both"):
        calib = zero_shot_calibration(base, calib_n)
        parts.append(zero_shot_losses(base, plans, calib))
        names.append(f"zero-shot loss on {sum(len(x) for x in calib if x is not None)}")
    if rank_by in ("distillation", "both"):
        calib = calibration(base, calib_n, fmnist=calib_n)
        parts.append(utility_losses(base, plans, calib))
        names.append(f"caption distillation loss on {len(calib[0])}")
    return [sum(xs) for xs in zip(*parts)], " + ".join(names) + " calibration images (hard-gated vs ungated)"


@torch.no_grad()
def plan_for_budget(controller: Controller, max_flops: float | None = None, max_params: float | None = None,
                    base: Base | None = None, n_rank: int = RANK_CANDIDATES, calib_n: int = CALIB_IMAGES,
                    points: int = 11, rank_by: str = RANK_BY) -> Plan:
    """The plan that meets the bound(s) with the lowest ranking loss on a calibration batch (see module doc).

    Without `base` the candidates cannot be run, and the fit needing the smallest offset wins.
    """
    bounds = check_bounds(max_flops, max_params)
    check_rank_by(rank_by)  # before the search, not after it
    candidates = bound_candidates(controller, max_flops, max_params, n_rank, points)
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
        r = _ratios(c.plan)
        table.append({"preference": format_spec(c.plan.preference), "flops_target": c.plan.meta.get("flops_target"),
                      "logit_offset": c.offset,
                      "units_added": c.added, "flops_ratio": r["flops"], "params_ratio": r["params"],
                      "loss": None if math.isnan(losses[j]) else losses[j]})
    best = candidates[order[0]]
    tried = len(search_preferences(controller, bounds, points)[0])
    best.plan.meta.update({f"max_{k}": v for k, v in bounds.items()})
    best.plan.meta["search"] = {"rank_by": rank_by if base is not None else None, "ranked_by": ranked_by,
                                "preferences_tried": tried,
                                "logit_offset": best.offset, "units_added": best.added,
                                "loss": table[0]["loss"], "candidates": table}
    return best.plan


# --- CLI ---------------------------------------------------------------------------------------

def plan_from_args(args, need_base: bool = False):
    """(controller, plan, base or None) for --pref / --max-flops / --max-params; bad input is a HippError."""
    bounds = {"max_flops": getattr(args, "max_flops", None), "max_params": getattr(args, "max_params", None)}
    given = [k for k, v in bounds.items() if v is not None]
    if args.pref is not None and given:
        raise HippError("give either --pref or a bound (--max-flops / --max-params), not both")
    if args.pref is None and not given:
        raise HippError("give --pref SPEC, --max-flops R or --max-params R")
    if given:
        check_bounds(bounds["max_flops"], bounds["max_params"])
    polish_steps = getattr(args, "polish", 0)
    if polish_steps:
        from .polish import check_steps  # it builds on this module
        check_steps(polish_steps)
    if polish_steps and bounds["max_flops"] is None:
        raise HippError("--polish needs --max-flops (it holds a FLOPs bound)")
    controller = load_controller(args.controller)
    base = None
    if args.pref is not None:
        pref = controller.preference(args.pref)  # validates before anything heavy is loaded
        if need_base:
            base = load_base(controller, args.controller, args.base_model)
        return controller, controller.plan(pref), base
    base = load_base(controller, args.controller, args.base_model)
    plan = plan_for_budget(controller, bounds["max_flops"], bounds["max_params"], base)
    if polish_steps:
        from .polish import polish
        plan = polish(base, controller, plan, polish_steps)
    return controller, plan, base


def summary(plan: Plan) -> dict:
    """Plan.summary() plus the preference as a SPEC string (what `--pref` would take)."""
    out = plan.summary()
    out["preference_spec"] = format_spec(plan.preference)
    return out


def format_table(plan: Plan) -> str:
    s = summary(plan)
    lines = [f"preference    {s['preference_spec']}"]
    if "flops_target" in plan.meta:
        lines.append(f"flops target  {plan.meta['flops_target']:.3f} (the controller's target input)")
    search = plan.meta.get("search")
    if search:
        bound = ", ".join(f"{k}={plan.meta[k]:g}" for k in ("max_flops", "max_params") if k in plan.meta)
        loss = search["loss"]
        lines.append(f"chosen for    {bound}: logit offset {search['logit_offset']:+.3f}, "
                     f"{search['units_added']} units topped up"
                     + (f", loss {loss:.4f}" if loss is not None else "")
                     + f" (best of {len(search['candidates'])}, ranked by {search['ranked_by']})")
    polished = plan.meta.get("polish")
    if polished:
        lines.append(f"polished      {polished['steps']} steps: loss {polished['loss_before']:.4f} -> "
                     f"{polished['loss_after']:.4f}, {'kept' if polished['kept'] else 'not kept (worse)'}, "
                     f"{polished['seconds']:.0f} s")
    for kind in ("flops", "params"):
        per = ", ".join(f"{t} {s[t][f'{kind}_ratio']:.3f}" for t in TOWERS)
        lines.append(f"{kind + '_ratio':13s} {s[f'{kind}_ratio']:.4f}  ({per})")
    lines.append(f"{'tower':6s} {'layer':>5s}  {'kept':4s}  {'heads':>7s}  {'channels':>11s}")
    for t in TOWERS:
        specs = plan.space.tower_layers(t)
        for spec, kept, h, c in zip(specs, s[t]["layers_kept"], s[t]["heads_kept"], s[t]["channels_kept"]):
            lines.append(f"{t:6s} {spec.index:5d}  {'yes' if kept else 'no':4s}  {f'{h}/{spec.num_heads}':>7s}  "
                         f"{f'{c}/{spec.mlp_hidden}':>11s}")
    return "\n".join(lines)


def run(args) -> int:
    """`hipp query`."""
    import json

    _, plan, _ = plan_from_args(args)
    print(json.dumps(summary(plan)) if args.json else format_table(plan))
    return 0
