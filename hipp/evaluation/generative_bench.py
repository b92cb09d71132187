"""`hipp bench` on a generative (LLaVA) model: every method at every FLOPs budget, answered greedily.

The same plans as the contrastive bench (hipp.baselines, the controller's bound query), each
materialised and made to answer the same `n` test instructions of every kind
(generative.answer_all). Rows hold utility, POPE F1 per sampling, the other metrics and the
materialised model's prefill and per-token latency. The controller's margins over every other
method come with the standard error of the paired difference, from a paired bootstrap over the
test items (the same resampled items for both, stratified by kind): POPE F1 and caption F1 are
ratios over a set, not means of per-item scores, so a bootstrap is what gives them an error.
Hypervolume is over (1 - utility, 1 - POPE adversarial F1, FLOPs ratio) against (1, 1, 1).

FLAP's bias compensation is left out here: Llama-shaped decoders have no o_proj / down_proj bias
to fold a removed unit's mean into (the row says so in its meta).
"""
from __future__ import annotations

import time

import torch
from ..baselines import METHODS, get_method
from ..baselines.allocate import check_target
from ..baselines.calibration import make_calibration
from ..errors import HippError
from ..export.slicing import materialize
from .answers import score, utility_of
from .bench import RECOVERED, describe_inputs, planned, recovered_plans, refit_settings, refitted
from .bench import write_outputs as write
from .generative import answer_all, latency_ms

CONTROLLER = "hipp"
POPE_F1 = ("pope/random_f1", "pope/popular_f1", "pope/adversarial_f1")
JUDGED = ("utility", *POPE_F1)
BOOTSTRAP = 300
DEFAULT_METHODS = ("uniform", "magnitude", "shortgpt", "flap", "taylor", "wanda", "ecoflap", "mope",
                   "fixed_budget")


def judged(metrics: dict) -> dict[str, float]:
    return {"utility": utility_of(metrics), **{k: metrics[k] for k in POPE_F1}}


class Answers:
    """One model's answers to the bench's test items, and paired bootstrap errors against another's."""

    def __init__(self, samples, predictions):
        self.samples, self.predictions = samples, predictions
        self.metrics = score(samples, predictions)

    def resamples(self, count: int = BOOTSTRAP, seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        by_kind: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            by_kind.setdefault(s.kind, []).append(i)
        out = []
        for _ in range(count):
            idx = []
            for members in by_kind.values():
                pick = torch.randint(len(members), (len(members),), generator=g).tolist()
                idx += [members[j] for j in pick]
            out.append(idx)
        return out

    def paired_se(self, other: "Answers", resamples: list[list[int]]) -> dict[str, float]:
        """Standard error of (self - other) on each judged metric over the same resampled items."""
        diffs = {k: [] for k in JUDGED}
        for idx in resamples:
            s = [self.samples[i] for i in idx]
            mine = judged(score(s, [self.predictions[i] for i in idx]))
            theirs = judged(score(s, [other.predictions[i] for i in idx]))
            for k in JUDGED:
                diffs[k].append(mine[k] - theirs[k])
        return {k: float(torch.tensor(v, dtype=torch.float64).std()) for k, v in diffs.items()}


def hypervolume_3d(points: list[tuple[float, float, float]], ref=(1.0, 1.0, 1.0)) -> float:
    """Volume dominated by `points` (every axis minimised) inside the box up to `ref`, slice by slice
    along the last axis (a handful of points per method)."""
    pts = [p for p in points if all(a < r for a, r in zip(p, ref))]
    zs = sorted({p[2] for p in pts}) + [ref[2]]
    total = 0.0
    for lo, hi in zip(zs, zs[1:]):
        layer = sorted((x, y) for x, y, z in pts if z <= lo)
        area, best = 0.0, ref[1]
        for k, (x, y) in enumerate(layer):  # the slice's staircase, left to right
            best = min(best, y)
            area += ((layer[k + 1][0] if k + 1 < len(layer) else ref[0]) - x) * (ref[1] - best)
        total += area * (hi - lo)
    return total


def _measure(model, processor, plan, n: int, seed: int, small=None) -> tuple[dict, Answers]:
    """`small`: a model of the plan's shape to answer with in its place (a recovered export)."""
    small = (materialize(model, plan) if small is None else small).eval()  # a plan's visual-token budget comes along
    answers = Answers(*answer_all(small, processor, "test", n, seed))
    costs = plan.costs()
    row = {"flops_ratio": costs["flops_ratio"], "params_ratio": costs["params_ratio"],
           "metrics": answers.metrics, **judged(answers.metrics),
           "latency_ms": {k: v for k, v in latency_ms(small, processor, answers.samples).items() if k != "batch"}}
    return row, answers


def bench_generative(model, processor, space, budgets=(0.3, 0.5, 0.7), methods=None, out_dir=None, controller=None,
                     controller_train_seconds: float | None = None, calibration=None, n: int = 500, seed: int = 0,
                     options: dict | None = None, progress: bool = True, planners: dict | None = None,
                     recovery=None, reconstruct=None) -> dict:
    """Plan, answer and compare (module doc); `planners` maps a row name to planner(budget) -> Plan;
    `recovery` (as hipp.evaluation.bench's) adds "<name>+recovery" rows; `reconstruct` (as
    hipp.evaluation.bench's) answers every row with its plan refitted."""
    start = time.perf_counter()
    names = list(DEFAULT_METHODS if methods is None else methods)
    for name in names:
        get_method(name)
    budgets = [check_target(b) for b in budgets]
    if not budgets:
        raise HippError("give at least one FLOPs budget")
    options = dict(options or {})
    if calibration is None and any(METHODS[m].needs_calibration for m in names):
        calibration = make_calibration(model, processor, getattr(model, "preprocess_cfg", {}))
    planners = dict(planners or ({CONTROLLER: lambda b: controller.plan_within(max_flops=b)} if controller else {}))
    per: dict[tuple[str, float], list] = {}
    failures: list[dict] = []
    refits = []
    for name, budget, plan in planned(model, space, names, budgets, planners, calibration, seed, options, failures,
                                      progress):
        row, answers = _measure(model, processor, plan, n, seed, small=refitted(reconstruct, plan, refits))
        per.setdefault((name, budget), []).append((plan, row, answers))
    for name, budget, plan in recovered_plans(per, budgets, planners) if recovery is not None else ():
        small, record = recovery(plan)
        row, answers = _measure(model, processor, plan, n, seed, small=small)
        per[(name + RECOVERED, budget)] = [(plan, {**row, "recovery": record}, answers)]
    rows = [_row(name, budget, got) for (name, budget), got in per.items()]
    dense_answers = Answers(*answer_all(model, processor, "test", n, seed))
    dense = {"metrics": dense_answers.metrics, **judged(dense_answers.metrics),
             "latency_ms": {k: v for k, v in latency_ms(model, processor, dense_answers.samples).items()
                            if k != "batch"}}
    seen = list(dict.fromkeys(r["method"] for r in rows))
    result = {"family": "generative", "budgets": budgets, "methods": seen, "results": rows, "dense": dense,
              "reference": {"point": [1.0, 1.0, 1.0],
                            "axes": ["1 - utility", "1 - pope/adversarial_f1", "flops_ratio"]},
              "hypervolume": {m: hypervolume_3d([(1 - r["utility"], 1 - r["pope/adversarial_f1"], r["flops_ratio"])
                                                 for r in rows if r["method"] == m]) for m in seen},
              "train_seconds": {m: sum(r["train_seconds"] for r in rows if r["method"] == m) for m in seen},
              "plan_seconds": {m: sum(r["plan_seconds"] for r in rows if r["method"] == m) for m in seen},
              "failures": failures,
              "settings": {"n": n, "split": "test", "seed": seed, "bootstrap": BOOTSTRAP, "options": options,
                           "calibration_size": calibration.size if calibration is not None else 0,
                           "reconstructed": refit_settings(refits)}}
    ours = [m for m in (*planners, *(p + RECOVERED for p in planners)) if m in seen]
    if ours:
        resamples = dense_answers.resamples()
        first = {key: got[0][2] for key, got in per.items()}
        result["margins"] = {m: _margins(rows, first, m, resamples) for m in ours}
        for m in ours:
            result["train_seconds"][m] = controller_train_seconds
    result["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir)
    return result


def _row(method: str, budget: float, got: list) -> dict:
    rows = [r for _, r, _ in got]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    plans = [p for p, _, _ in got]
    return {"method": method, "budget": budget, **{k: mean(k) for k in ("flops_ratio", "params_ratio", *JUDGED)},
            "metrics": {k: sum(r["metrics"][k] for r in rows) / len(rows) for k in rows[0]["metrics"]},
            "latency_ms": {k: sum(r["latency_ms"][k] for r in rows) / len(rows) for k in rows[0]["latency_ms"]},
            "plan_seconds": sum(p.meta.get("seconds", 0.0) for p in plans),
            "train_seconds": sum(p.meta.get("train_seconds", 0.0) for p in plans),
            "layers_kept": [int(p.layer_keep.sum()) for p in plans],
            "tokens_kept": [[int(k) for k in p.token_keep] for p in plans],
            **({"recovery": rows[0]["recovery"]} if "recovery" in rows[0] else {})}


def _margins(rows: list[dict], answers: dict, ours: str, resamples) -> dict:
    """Per budget and other method: ours minus theirs on each judged metric, with paired bootstrap errors
    (a method with several seeds is paired through its first seed's answers)."""
    out = {}
    for budget in dict.fromkeys(r["budget"] for r in rows):
        at = {r["method"]: r for r in rows if r["budget"] == budget}
        if ours not in at:
            continue
        entry = {}
        for m, r in at.items():
            if m == ours:
                continue
            se = answers[(ours, budget)].paired_se(answers[(m, budget)], resamples)
            entry[m] = {k: {"diff": at[ours][k] - r[k], "se": se[k]} for k in JUDGED}
            entry[m]["trains"] = bool(m in METHODS and METHODS[m].trains)
        out[f"{budget:g}"] = entry
    return out


def write_outputs(result: dict, out_dir) -> dict:
    return write(result, out_dir, rows_csv, markdown, "utility vs FLOPs at equal budgets (LLaVA)")


def rows_csv(rows: list[dict]) -> str:
    import csv
    import io
    keys = sorted({k for r in rows for k in r["metrics"]})
    lat = list(rows[0]["latency_ms"]) if rows else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "budget", "flops_ratio", "params_ratio", *JUDGED, *(f"latency_{k}_ms" for k in lat),
                "plan_seconds", "train_seconds", *keys])
    for r in rows:
        w.writerow([r["method"], r["budget"], r["flops_ratio"], r["params_ratio"], *(r[k] for k in JUDGED),
                    *(r["latency_ms"][k] for k in lat), r["plan_seconds"], r["train_seconds"],
                    *(r["metrics"].get(k, "") for k in keys)])
    return buf.getvalue()


def markdown(result: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    d, st = result["dense"], result["settings"]
    lines = ["# Baselines at equal FLOPs budgets (generative)", "",
             f"dense model: utility {f(d['utility'])}, POPE F1 random / popular / adversarial "
             f"{' / '.join(f(d[k]) for k in POPE_F1)}; {st['n']} test instructions of each kind, answered "
             f"greedily; hypervolume over {', '.join(result['reference']['axes'])} against (1, 1, 1)."
             + (f" Every row refitted first (calibration: {describe_inputs(st['reconstructed']['inputs'])}, "
                "hipp bench --reconstruct)." if st.get("reconstructed") else ""), "",
             "| method | budget | FLOPs | utility | POPE F1 rnd / pop / adv | prefill ms | layers kept | image tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for b in result["budgets"]:
        for r in (r for r in result["results"] if r["budget"] == b):
            lines.append(f"| {r['method']} | {b:g} | {f(r['flops_ratio'])} | {f(r['utility'])} | "
                         f"{' / '.join(f(r[k]) for k in POPE_F1)} | {r['latency_ms'].get('prefill', 0):.2f} | "
                         f"{r['layers_kept'][0]} | {'/'.join(map(str, r['tokens_kept'][0])) or 'all'} |")
    lines += ["", "| method | hypervolume | train s | plan s |", "|---|---|---|---|"]
    for m in result["methods"]:
        t = result["train_seconds"].get(m)
        lines.append(f"| {m} | {result['hypervolume'][m]:.4f} | {'-' if not t else f'{t:.0f}'} | "
                     f"{result['plan_seconds'][m]:.1f} |")
    for ours, per in result.get("margins", {}).items():
        lines += ["", f"## {ours} minus each method (± paired bootstrap standard error)", "",
                  "| budget | method | " + " | ".join(JUDGED) + " |", "|---|---|" + "---|" * len(JUDGED)]
        for budget, entry in per.items():
            for m, cells in entry.items():
                lines.append(f"| {budget} | {m} | " + " | ".join(
                    f"{cells[k]['diff']:+.3f} ± {cells[k]['se']:.3f}" for k in JUDGED) + " |")
    return "\n".join(lines) + "\n"
