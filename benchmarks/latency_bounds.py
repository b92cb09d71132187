"""Latency bounds on the embedded teacher: measured latency of the exported plans, and utility at equal
latency for a controller trained with latency against one trained with FLOPs (same recipe otherwise).

For each bound r:
- "latency": the latency controller's plan for `--max-latency r` (its own stored profile);
- "flops":   the FLOPs controller's plan for `--max-flops r`;
- "latency@flops": the latency controller's plan for a latency bound equal to the "flops" plan's
  predicted latency, so the two land at the same latency and their utilities compare;
- "flops-controller@latency": the FLOPs controller's plan for `--max-latency r` (the profile bounds
  its search; its training never saw latency);
- "latency, calibrated": the latency controller's plan for `--max-latency r --calibrate-latency`
  (hipp/query/measured.py: timed at query time, the bound corrected by the measurement).
With `--equal-measured` the last three give way to "latency@flops measured": the latency controller's
plan calibrated (as `--calibrate-latency` does, to within 2%) to the "flops" plan's *measured* latency
ratio, since plans a latency controller picks can measure slower than the latency model predicts.
Each plan is materialised and timed per tower in rounds interleaved with the project's dense
materialisation and with the stock model as a user loads it (open_clip's own CLIP, whose attention
is nn.MultiheadAttention's fast path), at the profile's batch size; the latency ratio is
(image + text) / (dense image + dense text). Utility (zero-shot shapes + Fashion-MNIST, test split)
comes with per-item scores, so the "latency@flops" minus "flops" difference has a paired standard
error.

    python benchmarks/latency_bounds.py --latency-controller runs/hipp-tiny-latency --flops-controller runs/hipp-tiny \
        --bounds 0.3,0.5,0.7 --out runs/latency/bounds-s0.json
    python benchmarks/latency_bounds.py --summary runs/latency/bounds-s*.json    # mean ± sd over seeds
    python benchmarks/latency_bounds.py ... --equal-measured --out runs/latency/equal-s0.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.controller.files import load_controller  # noqa: E402
from hipp.core.latency import latency_for  # noqa: E402
from hipp.core.plan import Plan  # noqa: E402
from hipp.evaluation.pareto import evaluate_plan, utility_difference  # noqa: E402
from hipp.evaluation.profile import Timer, measures_for  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base, plan_for_budget  # noqa: E402
from hipp.query.measured import calibrated_plan  # noqa: E402
from hipp.storage.checkpoint import load_model  # noqa: E402
from hipp.storage.fileio import write_json  # noqa: E402


def timed(base, space, plan, stock, timer) -> dict:
    small = materialize(base.model, plan).eval()
    dense = materialize(base.model, Plan.dense(space)).eval()
    ms = {}
    for name in timer.measures:
        t_small, t_dense, t_stock = timer.times([small, dense, stock], name)
        ms.update({f"ms/{name}": t_small, f"dense_ms/{name}": t_dense, f"stock_ms/{name}": t_stock,
                   f"speedup/{name}": t_dense / t_small, f"stock_speedup/{name}": t_stock / t_small})
    names = list(timer.measures)
    total = lambda key: sum(ms[f"{key}/{n}"] for n in names)  # noqa: E731
    ms["measured_ratio"] = total("ms") / total("dense_ms")
    ms["stock_ratio"] = total("ms") / total("stock_ms")
    return ms


def over_seeds(diffs: list[float]) -> str:
    """The margins' mean over the training seeds with its standard error over them: the seeds are the
    independent draws of a training-dependent figure, each seed's own ± only its test items' noise."""
    import statistics

    if len(diffs) < 2:
        return ""
    return (f"; mean over {len(diffs)} seeds {statistics.mean(diffs):+.4f} ± "
            f"{statistics.stdev(diffs) / len(diffs) ** 0.5:.4f} (standard error over seeds)")


def summary(paths: list[str]) -> None:
    """Mean ± sd over the runs (one per training seed) of what each bound's plans measured."""
    import statistics

    from hipp.storage.fileio import read_json

    runs = [read_json(p)["rows"] for p in paths]
    ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"  # noqa: E731
    print(f"{len(runs)} runs; mean ± sd over them")
    for b in sorted({r["bound"] for r in runs[0]}):
        pick = lambda plan, key: [r[key] for rows in runs for r in rows if r["bound"] == b and r["plan"] == plan]  # noqa: E731

        def margins(pair: str) -> str:
            diffs = [(r["utility_diff"], r["se"]) for rows in runs for r in rows if r["bound"] == b and r["plan"] == pair]
            return ", ".join(f"{d:+.4f} ± {se:.4f}" for d, se in diffs) + over_seeds([d for d, _ in diffs])

        print(f"bound {b}:")
        lat = pick("latency", "measured_ratio")
        if lat:
            print(f"  latency plan measured ratio {ms(lat)} (off by {ms([abs(x / b - 1) for x in lat])}), "
                  f"utility {ms(pick('latency', 'utility'))}, FLOPs {ms(pick('latency', 'flops_ratio'))}")
            for t in ("image", "text"):
                print(f"  {t}: speed-up vs dense {ms(pick('latency', f'speedup/{t}'))}, vs stock "
                      f"{ms(pick('latency', f'stock_speedup/{t}'))}; the FLOPs plan at {b}: vs dense "
                      f"{ms(pick('flops', f'speedup/{t}'))}, vs stock {ms(pick('flops', f'stock_speedup/{t}'))}")
        print(f"  FLOPs plan at {b}: predicted latency ratio {ms(pick('flops', 'predicted_ratio'))}, measured "
              f"{ms(pick('flops', 'measured_ratio'))}, utility "
              f"{ms(pick('flops', 'utility'))}; latency plan at its predicted latency: measured "
              f"{ms(pick('latency@flops', 'measured_ratio'))}, utility {ms(pick('latency@flops', 'utility'))}")
        print("  utility, latency minus FLOPs controller at equal predicted latency, per seed: "
              + margins("latency@flops - flops"))
        equal = pick("latency@flops measured", "measured_ratio")
        if equal:
            print(f"  latency plan calibrated to the FLOPs plan's measured latency: measured {ms(equal)} (FLOPs plan "
                  f"minus it, per seed: " + ", ".join(f"{f - x:+.3f}" for f, x in zip(pick("flops", "measured_ratio"), equal))
                  + f"), utility {ms(pick('latency@flops measured', 'utility'))}; latency minus FLOPs controller "
                  "at equal measured latency, per seed: " + margins("latency@flops measured - flops"))
        cal = pick("latency, calibrated", "measured_ratio")
        if cal:
            print(f"  calibrated latency plan: measured {ms(cal)} (off by {ms([abs(x / b - 1) for x in cal])}), "
                  f"utility {ms(pick('latency, calibrated', 'utility'))}; per seed " + ", ".join(f"{x:.3f}" for x in cal))
        same = pick("flops-controller@latency", "measured_ratio")
        if same:
            print(f"  FLOPs controller under --max-latency {b}: measured {ms(same)}, utility "
                  f"{ms(pick('flops-controller@latency', 'utility'))}; latency controller minus it, per seed: "
                  + margins("latency - flops-controller@latency"))


def main(argv=None) -> int:
    if argv is None and "--summary" in sys.argv:
        summary(sys.argv[sys.argv.index("--summary") + 1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-controller", required=True)
    p.add_argument("--flops-controller", required=True)
    p.add_argument("--bounds", default="0.3,0.5,0.7")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--n", type=int, default=1000, help="shape scenes (and Fashion-MNIST images) for utility")
    p.add_argument("--split", default="test", choices=("val", "test"),
                   help="the split utility is measured on: choose a recipe on val, report on test")
    p.add_argument("--equal-measured", action="store_true",
                   help="compare the two controllers at the FLOPs plan's measured latency (module doc)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    lat_c, flops_c = load_controller(args.latency_controller), load_controller(args.flops_controller)
    lm = latency_for(lat_c.space, stored=lat_c.extra.get("latency_profile"))
    torch.set_num_threads(lm.profile["threads"])
    base = load_base(lat_c, args.latency_controller)
    space = lat_c.space
    stock = load_model(base.spec).eval()  # the model as open_clip builds it, not made prunable
    timer = Timer(measures_for(stock, space, lm.profile["batch"], torch.device("cpu")), torch.device("cpu"),
                  args.repeats, 2)
    latency_query = lambda b: plan_for_budget(lat_c, max_latency=b, base=base, latency=lm)  # noqa: E731
    rows = []
    for r in (float(x) for x in args.bounds.split(",")):
        results = {}

        def measure(name, plan):
            ev = evaluate_plan(base.model, plan, base.tokenizer, base.preprocess_cfg, n=args.n,
                               fmnist_limit=args.n, items=True, split=args.split)
            results[name] = ev
            row = {"bound": r, "plan": name, "utility": ev["utility"], "grounding": ev["grounding"],
                   "flops_ratio": ev["flops_ratio"], "predicted_ratio": plan.meta["latency"]["predicted_ratio"],
                   **timed(base, space, plan, stock, timer)}
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            return row

        flops = measure("flops", plan_for_budget(flops_c, max_flops=r, base=base, latency=lm))
        measure("latency@flops", latency_query(flops["predicted_ratio"]))
        pairs = [("latency@flops", "flops")]
        if args.equal_measured:
            measure("latency@flops measured",
                    calibrated_plan(latency_query, base, lm, min(1.0, flops["measured_ratio"]), tries=5, tolerance=0.02))
            pairs.append(("latency@flops measured", "flops"))
        else:
            measure("latency", latency_query(r))
            measure("flops-controller@latency", plan_for_budget(flops_c, max_latency=r, base=base, latency=lm))
            measure("latency, calibrated", calibrated_plan(latency_query, base, lm, r))
            pairs.append(("latency", "flops-controller@latency"))
        for a, b in pairs:
            diff, se = utility_difference(results[a]["items"], results[b]["items"])
            rows.append({"bound": r, "plan": f"{a} - {b}", "utility_diff": diff, "se": se})
            print(f"bound {r}: utility {a} - {b} = {diff:+.4f} ± {se:.4f}", flush=True)
    write_json(args.out, {"latency_controller": args.latency_controller, "flops_controller": args.flops_controller,
                          "split": args.split, "equal_measured": args.equal_measured,
                          "batch": lm.profile["batch"], "threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
