"""Does the bound search pick well among its candidates? For each controller and FLOPs bound: every
candidate plan (`query.bound_candidates`), its calibration loss at several calibration sizes, its
utility on the full test sets (the bench's evaluation), and the plan each ranking rule would pick.

    python benchmarks/rank_study.py --controllers runs/seeds-b10/controller-seed{0,1,2,3,4} --out runs/rank_study

Rules: the search with `n_rank=n` (`--shortlists`), ranking on `s` val scenes + `s` Fashion-MNIST
train images (`--sizes`) by each of `query.RANK_LOSSES`: the caption distillation loss
(`query.utility_losses`), the zero-shot loss (`query.zero_shot_losses`) or both (their sum).
Resumable: rows already in OUT/candidates.jsonl are kept.
2-4 min per controller and budget on 2 cores (most of it the test-set evaluation).
"""
import argparse
import json
import statistics
from pathlib import Path

from hipp.controller.files import load_controller
from hipp.storage.fileio import write_text
from hipp.evaluation.pareto import evaluate_plan
from hipp.query.bound import bound_candidates, format_spec, load_base
from hipp.query.ranking import calibration, utility_losses, zero_shot_calibration, zero_shot_losses


def measure(folder: str, budget: float, sizes: list[int], shortlists: list[int]) -> list[dict]:
    controller = load_controller(folder)
    base = load_base(controller, folder)
    cands = bound_candidates(controller, max_flops=budget, n_rank=max(shortlists))
    within = {n: {c.plan.mask_key() for c in bound_candidates(controller, max_flops=budget, n_rank=n)}
              for n in shortlists}
    plans = [c.plan for c in cands]
    losses = {s: utility_losses(base, plans, calibration(base, s, fmnist=s)) for s in sizes}
    zs = {s: zero_shot_losses(base, plans, zero_shot_calibration(base, s)) for s in sizes}
    rows = []
    for rank, c in enumerate(cands):
        r = evaluate_plan(base.model, c.plan, base.tokenizer, base.preprocess_cfg, n=1000, fmnist_limit=None)
        rows.append({"controller": folder, "budget": budget, "preference": format_spec(c.plan.preference),
                     "shortlists": [n for n in shortlists if c.plan.mask_key() in within[n]],
                     "flops_ratio": r["flops_ratio"], "utility": r["utility"],
                     **{f"loss{s}": losses[s][rank] for s in sizes}, **{f"zs{s}": zs[s][rank] for s in sizes}})
    return rows


# query.RANK_LOSSES from the stored columns: loss{s} caption distillation, zs{s} zero-shot
LOSSES = {"distillation": lambda r, s: r[f"loss{s}"], "zero_shot": lambda r, s: r[f"zs{s}"],
          "both": lambda r, s: r[f"loss{s}"] + r[f"zs{s}"]}


def pick(rows: list[dict], n: int, size: int | None, loss: str = "distillation") -> float:
    """Utility of the plan the search with n_rank=n, ranking on size + size images by `loss`, picks
    (size None: the best of those candidates on the test sets, for reference)."""
    pool = [r for r in rows if n in r["shortlists"]]
    if size is None:
        return max(r["utility"] for r in pool)
    return min(pool, key=lambda r: LOSSES[loss](r, size))["utility"]


def table(rows: list[dict], controllers: list[str], budgets: list[float], rules: list[tuple]) -> str:
    lines = ["| budget | candidates, calibration images, loss | " + " | ".join(Path(c).name for c in controllers)
             + " | mean | sd |", "|---|---|" + "---|" * (len(controllers) + 2)]
    for b in budgets:
        for n, size, loss in rules:
            xs = [pick([r for r in rows if r["controller"] == c and r["budget"] == b], n, size, loss)
                  for c in controllers]
            name = f"best of {n} (test sets)" if size is None else f"{n}, {size} + {size}, {loss}"
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            lines.append(f"| {b} | {name} | " + " | ".join(f"{x:.3f}" for x in xs)
                         + f" | {statistics.mean(xs):.4f} | {sd:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controllers", nargs="+", required=True)
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--sizes", default="48,128,256,512")
    ap.add_argument("--shortlists", default="8,16")
    ap.add_argument("--out", default="runs/rank_study")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    shortlists = [int(n) for n in args.shortlists.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "candidates.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines()] if store.is_file() else []
    for folder in args.controllers:
        for b in budgets:
            if any(r["controller"] == folder and r["budget"] == b for r in rows):
                continue
            got = measure(folder, b, sizes, shortlists)
            rows += got
            with store.open("a") as f:  # one complete (controller, budget) at a time
                f.write("".join(json.dumps(r) + "\n" for r in got))
            print(f"{folder} @{b}: {len(got)} candidates", flush=True)
    rules = [(n, s, loss) for loss in LOSSES for s in sizes for n in shortlists] + [(max(shortlists), None, None)]
    md = table(rows, args.controllers, budgets, rules)
    write_text(out / "rank_study.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
