"""Every method at every FLOPs budget, measured by the same evaluation code: the `hipp bench` object.

Rows hold method, budget, achieved flops_ratio, metrics, utility, grounding and latency; a method
with several seeds (random) reports the mean over its seeds and lists each seed. Each method's
hypervolume is that of its (1 - utility, flops_ratio) points against pareto.REFERENCE, and
train_seconds is the search cost it paid (fixed_budget: one training per budget; the controller:
its single training, when given). The controller can answer each budget in more than one way (the
bound query alone: "hipp"; polished: "hipp+polish"), each its own row. With the controller,
`margins[row][budget]` gives that row's utility minus the best training-free method's and minus
each training method's (the fixed-budget gates), each with the standard error of the paired
difference over the test items (`se`): about 0.003 of utility separates two unrelated draws of
these test sets, far less two near-equal models.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import HippError
from .evaluate import check_datasets, evaluate
from ..storage.fileio import write_json, write_text
from ..storage.outputs import staged
from .plots import plot_methods
from .pareto import (
    DATASETS,
    REFERENCE,
    evaluate_plan,
    grounding_of,
    hypervolume_2d,
    measure_latency,
    prepare,
    utility_difference,
    utility_of,
)
from ..core.space import PruneSpace
from ..baselines import METHODS, get_method
from ..baselines.allocate import BudgetError, check_target
from ..baselines.calibration import make_calibration

CONTROLLER = "hipp"
POLISHED = "hipp+polish"


def _mean_rows(method: str, budget: float, results: list[dict], plans: list) -> dict:
    """One row from the per-seed results of one method and budget."""
    k = len(results)
    mean = lambda xs: sum(xs) / k
    metric_keys = results[0]["metrics"].keys()
    grounding = [r["grounding"] for r in results]
    return {"method": method, "budget": budget,
            "flops_ratio": mean([r["flops_ratio"] for r in results]),
            "params_ratio": mean([r["params_ratio"] for r in results]),
            "metrics": {m: mean([r["metrics"][m] for r in results]) for m in metric_keys},
            "utility": mean([r["utility"] for r in results]),
            "grounding": None if None in grounding else mean(grounding),
            "latency_ms": {t: mean([r["latency_ms"][t] for r in results]) for t in results[0]["latency_ms"]
                           if t != "batch"},
            "plan_seconds": sum(p.meta.get("seconds", 0.0) for p in plans),
            "train_seconds": sum(p.meta.get("train_seconds", 0.0) for p in plans),
            "seeds": [{"seed": p.meta.get("seed", 0), "flops_ratio": r["flops_ratio"], "utility": r["utility"],
                       "grounding": r["grounding"],
                       "tokens": [f"{int(k)}/{level.tokens}" for level, k in zip(p.space.tokens, p.token_keep.tolist())]}
                      for p, r in zip(plans, results)],
            **({"recovery": results[0]["recovery"]} if "recovery" in results[0] else {})}


def bench(model, tokenizer, preprocess_cfg: dict, space: PruneSpace, budgets=(0.3, 0.5, 0.7), methods=None,
          out_dir=None, controller=None, controller_train_seconds: float | None = None, calibration=None,
          datasets=DATASETS, n: int = 1000, fmnist_limit: int | None = None, seed: int = 0,
          options: dict | None = None, progress: bool = True, planners: dict | None = None,
          recovery=None, reconstruct=None) -> dict:
    """Plan, measure and compare: every method in `methods` (default: all of METHODS) at every budget.

    With `controller`, its plans join as one row per entry of `planners` (row name -> planner(budget);
    the CLI passes hipp.query.bound's bound search as "hipp" and it polished as "hipp+polish"), by default
    controller.plan_within as "hipp". `options` maps a
    method name to its settings (e.g. {"fixed_budget": {"steps": 60}}). `recovery` (plan -> (the
    plan's export recovered from the base, its recovery record)) adds a row "<name>+recovery" for each
    planner's plan and the best training-free method's at every budget. Returns the bench object
    (results, hypervolume, train_seconds, plan_seconds, dense, settings); with `out_dir` it is also
    written as bench.json, bench.csv, bench.md and bench.png. `reconstruct` (plan -> (its model refitted,
    the refit's record); hipp.export.reconstruct.refitted_from) measures every row refitted alike,
    FLAP-style's included (the refit, biases and all, in place of its bias compensation).
    """
    start = time.perf_counter()
    names = list(METHODS) if methods is None else list(methods)
    for name in names:
        get_method(name)  # unknown names fail before any work
    budgets = [check_target(b) for b in budgets]
    if not budgets:
        raise HippError("give at least one FLOPs budget")
    check_datasets(datasets)
    options = dict(options or {})
    if calibration is None and any(METHODS[m].needs_calibration or METHODS[m].compensate for m in names):
        calibration = make_calibration(model, tokenizer, preprocess_cfg)
    evaluate_args = {"datasets": datasets, "n": n, "fmnist_limit": fmnist_limit, "calibration": calibration,
                     "latency": True, "items": controller is not None}
    planners = ((planners or {CONTROLLER: lambda b: controller.plan_within(max_flops=b)})
                if controller is not None else {})
    if controller is not None and prepare(model, controller) != space:
        raise HippError("the controller's prune space differs from the one the baselines are given")
    per: dict[tuple[str, float], list] = {}
    failures: list[dict] = []
    refits = []
    for name, budget, plan in planned(model, space, names, budgets, planners, calibration, seed, options, failures,
                                      progress):
        small = refitted(reconstruct, plan, refits)
        result = evaluate_plan(model, plan, tokenizer, preprocess_cfg, small=small, **evaluate_args)
        per.setdefault((name, budget), []).append((plan, result))
    for name, budget, plan in recovered_plans(per, budgets, planners) if recovery is not None else ():
        small, record = recovery(plan)
        result = evaluate_plan(model, plan, tokenizer, preprocess_cfg, small=small, **evaluate_args)
        per[(name + RECOVERED, budget)] = [(plan, {**result, "recovery": record})]
    rows = [_mean_rows(name, budget, [r for _, r in got], [p for p, _ in got]) for (name, budget), got in per.items()]
    dense_metrics = evaluate(model, tokenizer, preprocess_cfg, datasets, n=n, fmnist_limit=fmnist_limit)
    dense = {"metrics": dense_metrics, "utility": utility_of(dense_metrics), "grounding": grounding_of(dense_metrics),
             "latency_ms": measure_latency(model, tokenizer)}
    methods_seen = list(dict.fromkeys(r["method"] for r in rows))
    result = {
        "budgets": budgets, "methods": methods_seen, "results": rows, "dense": dense,
        "reference": {"point": list(REFERENCE), "axes": ["1 - utility", "flops_ratio"]},
        "hypervolume": {m: hypervolume_2d([(1 - r["utility"], r["flops_ratio"]) for r in rows if r["method"] == m])
                        for m in methods_seen},
        "train_seconds": {m: sum(r["train_seconds"] for r in rows if r["method"] == m) for m in methods_seen},
        "plan_seconds": {m: sum(r["plan_seconds"] for r in rows if r["method"] == m) for m in methods_seen},
        "failures": failures,
        "settings": {"datasets": list(datasets), "n": n, "fmnist_limit": fmnist_limit, "seed": seed, "options": options,
                     "calibration_size": calibration.size if calibration is not None else 0,
                     "reconstructed": refit_settings(refits)},
    }
    ours = [m for m in (*planners, *(p + RECOVERED for p in planners)) if m in methods_seen]
    if ours:
        items = {key: _mean_items([r.get("items") for _, r in got]) for key, got in per.items()}
        for m in ours:
            result["train_seconds"][m] = controller_train_seconds
        result["margins"] = {m: margins(rows, items, m) for m in ours}
    result["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir)
    return result


RECOVERED = "+recovery"


def describe_inputs(counts: dict) -> str:
    """A refit record's input counts in words, e.g. "512 images, 512 texts"."""
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def refitted(reconstruct, plan, records: list):
    """The plan's model refitted (its record appended to `records`), or None without `reconstruct`."""
    if reconstruct is None:
        return None
    small, record = reconstruct(plan)
    records.append(record)
    return small


def refit_settings(records: list) -> dict | None:
    """What bench.json records of the refit every row went through (None: none did)."""
    if not records:
        return None
    first = records[0]
    return {"method": first["method"], "inputs": first["inputs"], "damp": first["damp"], "rows": len(records)}


def recovered_plans(per: dict, budgets, planners: dict):
    """(row name, budget, plan) to recover: each planner's plan and the best training-free method's."""
    for budget in budgets:
        free = {m: sum(entry[1]["utility"] for entry in got) / len(got) for (m, b), got in per.items()
                if b == budget and m in METHODS and not METHODS[m].trains}  # entries: (plan, row, ...)
        for name in [m for m in planners if (m, budget) in per] + ([max(free, key=free.get)] if free else []):
            yield name, budget, per[(name, budget)][0][0]


def planned(model, space: PruneSpace, names, budgets, planners: dict, calibration, seed: int, options: dict,
            failures: list, progress: bool = True):
    """Yield (row name, budget, plan) for every method (each of its seeds) and every planner row at every
    budget; a budget out of a method's reach, or a planner's refusal, goes to `failures` instead."""
    jobs = [(m, b, s) for m in names for b in budgets for s in range(METHODS[m].seeds)]
    jobs += [(row, b, 0) for row in planners for b in budgets]
    cache: dict = {}
    bar = tqdm(jobs, desc="bench", disable=not progress)
    for name, budget, s in bar:
        bar.set_postfix(method=name, budget=budget)
        try:
            if name in planners:
                t0 = time.perf_counter()
                plan = planners[name](budget)
                plan.meta.update({"method": name, "seconds": time.perf_counter() - t0})
            else:
                plan = METHODS[name](model, space, budget, calibration, seed + s, cache, options.get(name))
        except HippError as e:  # the other methods and budgets still run
            if name not in planners and not isinstance(e, BudgetError):
                raise
            failures.append({"method": name, "budget": budget, "seed": seed + s, "error": str(e)})
            continue
        yield name, budget, plan


def _mean_items(per_seed: list[dict | None]) -> dict | None:
    """Per-item scores averaged over a method's seeds (None where any seed lacks them)."""
    if not per_seed or any(p is None for p in per_seed):
        return None
    return {k: sum(p[k] for p in per_seed) / len(per_seed) for k in per_seed[0]}


def margins(rows: list[dict], items: dict | None = None, ours: str = CONTROLLER) -> dict[str, dict]:
    """Per budget: the utility of row `ours` minus the best training-free method's (named), minus
    the fixed-budget gates (one gate training per budget) and minus the other planners' rows, where those
    were run. With `items` ((method, budget)
    -> per-item scores), `se` holds each difference's paired standard error."""
    items = items or {}
    out = {}
    for budget in dict.fromkeys(r["budget"] for r in rows):
        at = {r["method"]: r["utility"] for r in rows if r["budget"] == budget}
        if ours not in at:
            continue
        mine, entry, se = items.get((ours, budget)), {}, {}
        utility = at[ours]
        against = {}
        free = {m: u for m, u in at.items() if m in METHODS and not METHODS[m].trains}
        if free:
            best = max(free, key=free.get)
            entry.update(best_training_free=best, over_training_free=utility - free[best])
            against["over_training_free"] = best
        # methods that train, and the other planners' rows (e.g. hipp+tokens against hipp)
        for m in (m for m in at if m != ours and (m not in METHODS or METHODS[m].trains)):
            entry[f"vs_{m}"] = utility - at[m]
            against[f"vs_{m}"] = m
        for key, m in against.items():
            theirs = items.get((m, budget))
            if mine is not None and theirs is not None:
                se[key] = utility_difference(mine, theirs)[1]
        if se:
            entry["se"] = se
        out[f"{budget:g}"] = entry
    return out


def write_outputs(result: dict, out_dir, to_csv=None, to_markdown=None,
                  title: str = "utility vs FLOPs at equal budgets") -> dict:
    """bench.json / .csv / .md / .png, built aside and swapped in together (hipp.storage.outputs.staged);
    `to_csv` / `to_markdown` write the table files of another bench object (default: this module's)."""
    out = Path(out_dir)
    names = {"json": "bench.json", "csv": "bench.csv", "md": "bench.md", "png": "bench.png"}
    files = {k: str(out / v) for k, v in names.items()}
    series = {m: [(r["flops_ratio"], r["utility"]) for r in result["results"] if r["method"] == m]
              for m in result["methods"]}
    with staged(out, "bench") as stage:
        write_text(stage / names["csv"], (to_csv or rows_csv)(result["results"]))
        write_text(stage / names["md"], (to_markdown or markdown)(result))
        plot_methods(series, stage / names["png"], title,
                     highlight=tuple(result.get("margins", ())), dense=(1.0, result["dense"]["utility"]))
        write_json(stage / names["json"], {**result, "files": files})
    return files


def rows_csv(rows: list[dict]) -> str:
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    stages = _stages(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "budget", "flops_ratio", "params_ratio", "utility", "grounding",
                *(f"latency_{s}_ms" for s in stages), "plan_seconds", "train_seconds", *metric_keys])
    for r in rows:
        w.writerow([r["method"], r["budget"], r["flops_ratio"], r["params_ratio"], r["utility"],
                    "" if r["grounding"] is None else r["grounding"], *(r["latency_ms"][s] for s in stages),
                    r["plan_seconds"], r["train_seconds"], *(r["metrics"].get(k, "") for k in metric_keys)])
    return buf.getvalue()


# the detail table's columns: header, then where the value sits in a result row
DETAIL = (("FLOPs", ("flops_ratio",)), ("params", ("params_ratio",)), ("utility", ("utility",)),
          ("shapes zero-shot", ("metrics", "shapes/zs_mean")), ("Fashion-MNIST", ("metrics", "fmnist/acc")),
          ("grounding", ("grounding",)), ("i2t R@1", ("metrics", "shapes/i2t_r1")),
          ("t2i R@1", ("metrics", "shapes/t2i_r1")))


def _stages(rows: list[dict]) -> list[str]:
    """The model's stages, as its latency rows name them."""
    return [s for s in (rows[0]["latency_ms"] if rows else {}) if s != "batch"]


def _dig(row: dict, path: tuple):
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def markdown(result: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"
    d, settings = result["dense"], result["settings"]
    limit = settings.get("fmnist_limit")
    lines = ["# Baselines at equal FLOPs budgets", "",
             (f"dense model: utility {f(d['utility'])}, grounding {f(d['grounding'])}; "
              f"hypervolume of (1 - utility, flops_ratio) vs reference {tuple(result['reference']['point'])}; "
              f"datasets {', '.join(settings['datasets'])} ({settings['n']} shape scenes, "
              f"{'all' if limit is None else f'the first {limit}'} Fashion-MNIST test images)"), "",
             ("| method | " + " | ".join(f"utility @{b:g}" for b in result["budgets"])
              + " | hypervolume | train s | plan s |"),
             "|---|" + "---|" * (len(result["budgets"]) + 3)]
    for m in result["methods"]:
        by_budget = {r["budget"]: r for r in result["results"] if r["method"] == m}
        cells = [f(by_budget[b]["utility"]) if b in by_budget else "-" for b in result["budgets"]]
        train = result["train_seconds"].get(m)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {f(result['hypervolume'][m])} | "
                     f"{'-' if train is None else f'{train:.0f}'} | {result['plan_seconds'][m]:.1f} |")
    notes = []
    every = [(row, budget, m) for row, per in result.get("margins", {}).items() for budget, m in per.items()]
    for row, budget, m in every:
        se = m.get("se", {})
        pm = lambda key, scale, digits: f" ± {scale * se[key]:.{digits}f}" if key in se else ""
        parts = [f"{m['over_training_free']:+.3f}{pm('over_training_free', 1, 3)} over the best training-free "
                 f"method ({m['best_training_free']})"] if "best_training_free" in m else []
        parts += [f"{100 * v:+.1f}{pm(k, 100, 1)} points vs {k[3:]}" for k, v in m.items() if k.startswith("vs_")]
        notes += [f"- {row} @{budget}: " + ", ".join(parts)] if parts else []
    for r in result["results"]:  # rows whose plans prune tokens too (hipp bench --visual-tokens)
        kept = sorted({t for seed in r.get("seeds", []) for t in seed.get("tokens", [])})
        if kept and any(int(t.split("/")[0]) < int(t.split("/")[1]) for t in kept):
            notes.append(f"- {r['method']} @{r['budget']:g} keeps {', '.join(kept)} image tokens")
    if any("se" in m for _, _, m in every):
        notes.append("- ± is the standard error of the paired difference over the same test items.")
    refit = result["settings"].get("reconstructed")
    if refit:
        notes.append(f"- every row refitted before it was measured ({refit['method']}, calibration: "
                     f"{describe_inputs(refit['inputs'])}, damp {refit['damp']:g}; hipp bench --reconstruct).")
    fixed = ((result["settings"].get("options") or {}).get("fixed_budget"))
    if fixed and "fixed_budget" in result["methods"]:
        notes.append(f"- fixed_budget: one gate training per budget, {fixed.get('steps')} steps of "
                     f"{fixed.get('batch_size')} samples each (the controller's own training budget).")
    lines += [""] + notes if notes else []
    detail = DETAIL + tuple((f"{s} ms", ("latency_ms", s)) for s in _stages(result["results"]))
    lines += ["", "## Every method at every budget", "",
              "| method | budget | " + " | ".join(h for h, _ in detail) + " |", "|---|---|" + "---|" * len(detail)]
    for b in result["budgets"]:
        for r in (r for r in result["results"] if r["budget"] == b):
            lines.append(f"| {r['method']} | {b:g} | " + " | ".join(f(_dig(r, path)) for _, path in detail) + " |")
    return "\n".join(lines) + "\n"
