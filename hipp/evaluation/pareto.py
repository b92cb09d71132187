"""Pareto fronts: sweep preferences through a controller, measure each hard plan, judge the front.

A front is a set of (utility loss, cost) points, here (1 - utility, flops_ratio), both to be
minimised; its hypervolume is the area it dominates up to a declared reference point (default
(1, 1): zero utility at the dense model's cost), computed exactly. Utility is the mean of the
zero-shot metrics in UTILITY_KEYS that were measured; grounding is the hard-negative accuracy
GROUNDING_KEY. Every plan is measured by hipp.evaluation.evaluate, the code that measures any model, so
controller plans, baselines and exported models are comparable.

`sweep` writes pareto.json, pareto.csv, pareto.png (utility vs FLOPs, coloured by grounding) and
pareto.md (a short summary) into its output folder.
"""
from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backends import describe, hard_plan, image_size, make_prunable
from ..data import to_input
from ..errors import HippError
from .evaluate import check_datasets, evaluate, latency_ms
from .answers import GROUNDING_KEY as GENERATIVE_GROUNDING_KEY, UTILITY_KEYS as GENERATIVE_UTILITY_KEYS
from .front import REFERENCE, hypervolume_2d, non_dominated, spearman
from .plots import plot_front
from ..storage.fileio import write_json, write_text
from ..storage.outputs import staged
from ..export.slicing import compensate_bias, materialize
from ..core.plan import Plan
from ..core.preference import format_spec, simplex_grid
from ..core.space import PruneSpace

UTILITY_KEYS = ("shapes/zs_mean", "fmnist/acc")
GROUNDING_KEY = "shapes/ground_mean"
GENERATIVE_N = 100  # instruction samples of each kind a LLaVA plan is answered on (10 kinds: 1000 answers)
AXES = ("1 - utility", "flops_ratio")
DATASETS = ("shapes", "fmnist")
MODES = ("materialize", "gates")


# --- reading metrics ---------------------------------------------------------------------------

def _generative(metrics: dict) -> bool:
    return GENERATIVE_GROUNDING_KEY in metrics or "caption/f1" in metrics


def utility_of(metrics: dict, keys: Sequence[str] | None = None) -> float:
    """Mean of the utility metrics that were measured (by default those of the model's family)."""
    keys = keys or (GENERATIVE_UTILITY_KEYS if _generative(metrics) else UTILITY_KEYS)
    got = [metrics[k] for k in keys if k in metrics]
    if not got:
        raise HippError(f"none of the utility metrics {', '.join(keys)} was measured")
    return float(sum(got) / len(got))


def utility_keys(metrics: dict, keys: Sequence[str] | None = None) -> list[str]:
    """The utility metrics among `metrics` (what utility_of averages)."""
    keys = keys or (GENERATIVE_UTILITY_KEYS if _generative(metrics) else UTILITY_KEYS)
    return [k for k in keys if k in metrics]


def utility_difference(a: dict, b: dict, keys: Sequence[str] = UTILITY_KEYS) -> tuple[float, float]:
    """Utility of model a minus model b from their per-item scores on the same test items (the `items`
    of hipp.evaluation.evaluate), and the standard error of that difference. Pairing cancels what the two share:
    two nearly equal models differ on few items, so a small difference can still be told from noise."""
    common = [k for k in keys if k in a and k in b]
    if not common:
        raise HippError(f"no per-item scores of {', '.join(keys)} measured for both models")
    diffs = [a[k].double() - b[k].double() for k in common]
    if any(len(d) < 2 for d in diffs):
        raise HippError("a paired difference needs at least 2 test items per metric")
    mean = sum(float(d.mean()) for d in diffs) / len(diffs)
    var = sum(float(d.var()) / len(d) for d in diffs) / len(diffs) ** 2
    return mean, math.sqrt(var)


def grounding_of(metrics: dict, key: str | None = None) -> float | None:
    key = key or (GENERATIVE_GROUNDING_KEY if _generative(metrics) else GROUNDING_KEY)
    return float(metrics[key]) if key in metrics else None


def measure_metrics(model, tokenizer, preprocess_cfg: dict, datasets: Sequence[str] = DATASETS, n: int = 500,
                    fmnist_limit: int | None = 2000, items: dict | None = None, split: str = "test") -> dict:
    """A model's metrics as its family is judged: a contrastive model on `datasets` (hipp.evaluation.
    evaluate), a generative one (`tokenizer`: its processor) answering GENERATIVE_N instructions of
    each kind greedily (hipp.evaluation.generative; per-item scores are not kept there)."""
    from ..storage.checkpoint import family
    if family(model) == "llava":
        from .generative import evaluate_generative
        return evaluate_generative(model, tokenizer, split=split, n=GENERATIVE_N, latency=False)["metrics"]
    return evaluate(model, tokenizer, preprocess_cfg, datasets, n=n, fmnist_limit=fmnist_limit, items=items,
                    split=split)


# --- measuring one plan ------------------------------------------------------------------------

def calibration_inputs(calibration, preprocess_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and caption + negative tokens of a calibration batch, as compensate_bias takes them."""
    batch = calibration.batch
    return (to_input(batch.images, preprocess_cfg),
            calibration.tokenizer(list(batch.captions) + list(batch.negatives)))


def evaluate_plan(model, plan: Plan, tokenizer, preprocess_cfg: dict, datasets: Sequence[str] = DATASETS,
                  n: int = 500, fmnist_limit: int | None = 2000, calibration=None, mode: str = "materialize",
                  latency: bool = False, latency_batch: int = 32, items: bool = False, split: str = "test",
                  small=None) -> dict:
    """Metrics and costs of one hard plan on a prunable `model` (left unchanged).

    mode "materialize" measures the physically smaller model (the same function as the hard-gated
    one to float tolerance, and 2.5x faster at half the FLOPs on the tiny teacher); "gates" sets
    the plan's hard gates on `model` itself. A plan whose meta asks for compensation (FLAP) is always materialised with
    bias compensation, measured on `calibration`. `latency` adds the smaller model's median
    milliseconds per image and per caption (always measured materialised); `items` the per-item
    scores of the utility metrics (hipp.evaluation.evaluate's `items`, not JSON), for utility_difference.
    `small`: a model of the plan's shape to measure in its place (a recovered export), priced as the plan.
    """
    if mode not in MODES:
        raise HippError(f"unknown evaluation mode {mode!r}; choose from {', '.join(MODES)}")
    check_datasets(datasets)
    if small is not None:
        mode = "materialize"
    elif plan.meta.get("compensate"):
        if calibration is None:
            raise HippError(f"plan of {plan.meta.get('method', 'this method')!r} needs calibration data "
                            "for its bias compensation")
        images, texts = calibration_inputs(calibration, preprocess_cfg)
        small = compensate_bias(model, *plan.gates, images=images, texts=texts).eval()
    elif mode == "materialize" or latency:
        small = materialize(model, plan).eval()
    per_item = {} if items else None
    if small is not None and (mode == "materialize" or plan.meta.get("compensate")):
        metrics = measure_metrics(small, tokenizer, preprocess_cfg, datasets, n, fmnist_limit, per_item, split)
    else:
        with hard_plan(model, plan):
            metrics = measure_metrics(model, tokenizer, preprocess_cfg, datasets, n, fmnist_limit, per_item, split)
    costs = plan.costs()
    out = {"metrics": metrics, "utility": utility_of(metrics), "grounding": grounding_of(metrics),
           **{k: costs[k] for k in ("flops_ratio", "params_ratio", *(f"flops_ratio/{s}" for s in plan.space.stages))}}
    if items:
        out["items"] = per_item
    if latency:
        out["latency_ms"] = measure_latency(small, tokenizer, latency_batch)
    return out


def measure_latency(model, tokenizer, batch: int = 32) -> dict:
    size, device = image_size(model), next(model.parameters()).device
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    tokens = tokenizer(["a large red circle at the top left and a small blue square at the center"] * batch).to(device)
    return {"image": latency_ms(model.encode_image, images, repeats=5, warmup=1),
            "text": latency_ms(model.encode_text, tokens, repeats=5, warmup=1), "batch": batch}


# --- fronts ------------------------------------------------------------------------------------

# --- the sweep ---------------------------------------------------------------------------------

def prepare(model, controller) -> PruneSpace:
    """Make `model` prunable with the controller's grouping and check that it is the controller's model."""
    group = controller.space.layers[0].channel_group if controller.space.layers else 1
    if describe(model, group, controller.tokens_arg) != controller.space:  # before make_prunable touches the model
        raise HippError("the controller was trained on a different model: the prune spaces differ")
    space = make_prunable(model, group, controller.tokens_arg)
    if controller.fingerprint:
        from ..storage.checkpoint import fingerprint
        if fingerprint(model) != controller.fingerprint:
            raise HippError(f"the controller was trained on base model {controller.fingerprint!r}, "
                            "not on this one (weights differ)")
    return space


def _loss_of(name: str, row: dict) -> float | None:
    """The achieved value of objective `name` as a loss (lower is better)."""
    if name == "utility":
        return 1.0 - row["utility"]
    if name == "grounding":
        return None if row["grounding"] is None else 1.0 - row["grounding"]
    if name in ("flops", "params"):
        return row[f"{name}_ratio"]
    return None


MAX_POINTS = 10_000  # each distinct plan is measured: a larger grid is a typo, not a sweep


def check_points(points) -> int:
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= MAX_POINTS:
        shown = repr(points) if len(repr(points)) <= 40 else repr(points)[:37] + "..."
        raise HippError(f"a sweep needs at least one point and at most {MAX_POINTS} (a whole number), got {shown}")
    return points


def sweep(controller, model, tokenizer, preprocess_cfg: dict, points: int = 20, out_dir=None,
          datasets: Sequence[str] = DATASETS, n: int = 500, fmnist_limit: int | None = 2000,
          reference=REFERENCE, mode: str = "materialize", include_dense: bool = True,
          progress: bool = True) -> dict:
    """Evaluate the controller's hard plans over a simplex grid of about `points` preferences.

    Preferences that give the same plan are measured once. Returns the result object (also
    written as pareto.json / .csv / .png / .md under `out_dir` when given): rows (one per
    preference, with its plan's costs, metrics, utility, grounding and whether it is on the
    front), hypervolume of (1 - utility, flops_ratio) and of (1 - grounding, flops_ratio) against
    `reference`, and the rank correlation between each preference weight and its achieved loss.
    """
    check_points(points)
    check_datasets(datasets)
    start = time.perf_counter()
    names = list(controller.objective_names)
    prepare(model, controller)
    grid = simplex_grid(len(names), n_points=points, dtype=torch.float64)
    measured: dict[bytes, tuple[int, dict]] = {}
    rows = []
    from ..storage.checkpoint import family
    settings = ({"generative": True, "per_kind": GENERATIVE_N, "mode": mode} if family(model) == "llava" else
                {"datasets": list(datasets), "n": n, "fmnist_limit": fmnist_limit, "mode": mode})
    bar = tqdm(grid, desc="pareto", disable=not progress)
    for p in bar:
        plan = controller.plan(p)
        key = plan.mask_key()
        if key not in measured:
            measured[key] = (len(measured), evaluate_plan(model, plan, tokenizer, preprocess_cfg, datasets, n,
                                                          fmnist_limit, mode=mode))
        index, result = measured[key]
        rows.append({"preference": dict(plan.preference), "spec": format_spec(plan.preference), "plan": index,
                     **result})
        bar.set_postfix(plans=len(measured))
    dense = None
    if include_dense:
        metrics = measure_metrics(model, tokenizer, preprocess_cfg, datasets, n, fmnist_limit)
        dense = {"metrics": metrics, "utility": utility_of(metrics), "grounding": grounding_of(metrics)}
    result = summarise(rows, names, reference)
    result.update({"objective_names": names, "settings": settings, "dense": dense,
                   "seconds": time.perf_counter() - start})
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir)
    return result


def summarise(rows: list[dict], names: Sequence[str], reference=REFERENCE) -> dict:
    """Front membership per row, hypervolumes and rank correlations of a set of measured rows."""
    front = non_dominated([(1 - r["utility"], r["flops_ratio"]) for r in rows])
    for r, f in zip(rows, front):
        r["non_dominated"] = f
    hv = {"utility": hypervolume_2d([(1 - r["utility"], r["flops_ratio"]) for r in rows], reference)}
    if rows and all(r["grounding"] is not None for r in rows):
        hv["grounding"] = hypervolume_2d([(1 - r["grounding"], r["flops_ratio"]) for r in rows], reference)
    corr = {}
    for name in names:
        losses = [_loss_of(name, r) for r in rows]
        if rows and all(v is not None for v in losses):
            corr[name] = spearman([r["preference"].get(name, 0.0) for r in rows], losses)
    return {"points": len(rows), "distinct_plans": len({r["plan"] for r in rows}) if rows else 0,
            "reference": {"point": [float(reference[0]), float(reference[1])], "axes": list(AXES)},
            "hypervolume": hv, "rank_correlation": corr, "rows": rows}


# --- outputs -----------------------------------------------------------------------------------

def write_outputs(result: dict, out_dir) -> dict:
    """pareto.json / .csv / .png / .md, built aside and swapped in together (hipp.storage.outputs.staged)."""
    out = Path(out_dir)
    names = {"json": "pareto.json", "csv": "pareto.csv", "png": "pareto.png", "md": "pareto.md"}
    files = {k: str(out / v) for k, v in names.items()}
    with staged(out, "pareto") as stage:
        write_text(stage / names["csv"], rows_csv(result["rows"], result["objective_names"]))
        keys = utility_keys(result["rows"][0]["metrics"]) if result["rows"] else list(UTILITY_KEYS)
        plot_front(result["rows"], stage / names["png"], result["hypervolume"]["utility"], result.get("dense"),
                   "utility (mean of " + ", ".join(keys) + ")", f"grounding ({GROUNDING_KEY})")
        write_text(stage / names["md"], markdown(result))
        write_json(stage / names["json"], {**result, "files": files})
    return files


def rows_csv(rows: list[dict], names: Sequence[str]) -> str:
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    cols = ["spec", *(f"pref_{n}" for n in names), "plan", "flops_ratio", "params_ratio", "utility", "grounding",
            "non_dominated", *metric_keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r["spec"], *(r["preference"].get(n, 0.0) for n in names), r["plan"], r["flops_ratio"],
                    r["params_ratio"], r["utility"], "" if r["grounding"] is None else r["grounding"],
                    int(r["non_dominated"]), *(r["metrics"].get(k, "") for k in metric_keys)])
    return buf.getvalue()


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _measured(settings: dict) -> str:
    if settings.get("generative"):
        return f"{GENERATIVE_N} {settings.get('split', 'test')} instructions of each kind, answered greedily"
    parts = []
    for d in settings.get("datasets", []):
        parts.append(f"shapes (n={settings.get('n')})" if d == "shapes" else
                     f"fmnist (first {settings.get('fmnist_limit') or 'all'} test images)" if d == "fmnist" else d)
    return ", ".join(parts)


def markdown(result: dict) -> str:
    hv = result["hypervolume"]
    s = result.get("settings", {})
    keys = utility_keys(result["rows"][0]["metrics"]) if result["rows"] else list(UTILITY_KEYS)
    lines = ["# Pareto sweep", "",
             (f"- preferences: {result['points']} on a simplex grid over {', '.join(result['objective_names'])}; "
              f"distinct plans: {result['distinct_plans']}"),
             f"- measured on: {_measured(s)}; utility = mean of {', '.join(keys)}",
             (f"- hypervolume of ({', '.join(AXES)}) vs reference {tuple(result['reference']['point'])}: "
              f"utility {_fmt(hv.get('utility'))}, grounding {_fmt(hv.get('grounding'))}")]
    if result.get("dense"):
        d = result["dense"]
        lines.append(f"- dense model: utility {_fmt(d['utility'])}, grounding {_fmt(d['grounding'])}")
    corr = ", ".join(f"{k} {_fmt(v)}" for k, v in result["rank_correlation"].items())
    if corr:
        lines.append(f"- rank correlation, preference weight vs achieved loss (negative = steerable): {corr}")
    lines += ["", "| preference | FLOPs | params | utility | grounding | front |", "|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["flops_ratio"]):
        lines.append(f"| {r['spec']} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | {_fmt(r['utility'])} | "
                     f"{_fmt(r['grounding'])} | {'yes' if r['non_dominated'] else ''} |")
    return "\n".join(lines) + "\n"
