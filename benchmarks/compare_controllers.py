"""Two LLaVA controllers (the same recipe but for one setting) set side by side at equal FLOPs: each
one's bound-query plan per budget is materialised and answers the same `--n` instructions of every kind
of `--split`; utility and POPE F1 per sampling of B minus A come with the paired bootstrap standard
error over those items. Used to decide a recipe setting on validation (e.g. visual sensitivity).

    python benchmarks/compare_controllers.py --a runs/hipp-llava-tiny --b runs/llava-sense \
        --budgets 0.3,0.5,0.7 --split val --n 100 --out runs/sense/val-seed0.json
    python benchmarks/compare_controllers.py --summary runs/sense/val-seed*.json   # per seed, and the mean
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.controller.files import load_controller  # noqa: E402
from hipp.evaluation.generative import answer_all  # noqa: E402
from hipp.evaluation.generative_bench import JUDGED, Answers, judged  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base, plan_for_budget  # noqa: E402
from hipp.storage.fileio import read_json, write_json  # noqa: E402


def summary(paths: list[str]) -> None:
    runs = [read_json(p) for p in paths]
    for budget in runs[0]["budgets"]:
        print(f"FLOPs {budget}:")
        for key in JUDGED:
            cells = [r["rows"][f"{budget:g}"][key] for r in runs]
            diffs = [c["diff"] for c in cells]
            print(f"  {key}: B - A per seed " + ", ".join(f"{c['diff']:+.4f} ± {c['se']:.4f}" for c in cells)
                  + f"; mean {statistics.mean(diffs):+.4f}" + (f" ± {statistics.stdev(diffs):.4f} (sd)" if len(diffs) > 1 else ""))


def main() -> int:
    if "--summary" in sys.argv:
        summary(sys.argv[sys.argv.index("--summary") + 1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="the reference controller")
    ap.add_argument("--b", required=True, help="the controller with the setting changed")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=100, help="instructions of each kind")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    a, b = load_controller(args.a), load_controller(args.b)
    if a.space != b.space:
        raise SystemExit("the two controllers plan in different prune spaces")
    base = load_base(a, args.a)
    budgets = [float(x) for x in args.budgets.split(",")]
    rows = {}
    for budget in budgets:
        got = {}
        for name, c in (("a", a), ("b", b)):
            plan = plan_for_budget(c, max_flops=budget, base=base)
            small = materialize(base.model, plan).eval()
            got[name] = (plan, Answers(*answer_all(small, base.tokenizer, args.split, args.n)))
        resamples = got["a"][1].resamples()
        se = got["b"][1].paired_se(got["a"][1], resamples)
        mine, theirs = judged(got["b"][1].metrics), judged(got["a"][1].metrics)
        rows[f"{budget:g}"] = {k: {"a": theirs[k], "b": mine[k], "diff": mine[k] - theirs[k], "se": se[k]} for k in JUDGED}
        rows[f"{budget:g}"]["flops"] = {n: got[n][0].costs()["flops_ratio"] for n in got}
        print(f"FLOPs {budget}: " + ", ".join(f"{k} {theirs[k]:.3f} -> {mine[k]:.3f} ({mine[k] - theirs[k]:+.3f} ± {se[k]:.3f})"
                                            for k in JUDGED), flush=True)
    write_json(args.out, {"a": args.a, "b": args.b, "split": args.split, "n": args.n, "budgets": budgets, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
