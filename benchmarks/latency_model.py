"""Predicted vs measured latency of random plans: the check on a latency profile (hipp profile).

Random plans (each layer kept with probability 0.85, then a uniform count of random heads and MLP
channel groups) are drawn with a seed the profile never used, materialised, and timed per measure
in rounds interleaved with the dense materialisation; the measured latency ratio (plan / dense) is
compared with the profile's predicted ratio under each of its forms. Printed: the mean absolute
relative error per measure and form, and the form the profile chose on its own validation plans.

    python benchmarks/latency_model.py --model checkpoints/teacher-tiny --profile runs/latency/teacher-cpu.json \
        --plans 20 --out runs/latency/teacher-test.json
    python benchmarks/latency_model.py --plot docs/figures/latency.png runs/latency/teacher-test.json ...
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.backends import make_prunable  # noqa: E402
from hipp.core.latency import FORMS, LatencyModel  # noqa: E402
from hipp.evaluation.profile import Timer, measure_plans, measures_for, random_plan  # noqa: E402
from hipp.storage.checkpoint import load_model  # noqa: E402
from hipp.storage.fileio import read_json, write_json  # noqa: E402


def check(args) -> dict:
    profile = read_json(args.profile)
    torch.set_num_threads(profile["threads"])
    model = load_model(args.model)
    space = make_prunable(model, args.channel_group)
    g = torch.Generator().manual_seed(args.seed)
    plans = [random_plan(space, g) for _ in range(args.plans)]
    timer = Timer(measures_for(model, space, profile["batch"], torch.device("cpu")), torch.device("cpu"),
                  args.repeats, 2)
    measured = measure_plans(model, space, plans, timer, progress=True)
    models = {form: LatencyModel(profile, space, form) for form in FORMS}
    rows = []
    for plan, got in zip(plans, measured):
        row = {"flops_ratio": plan.costs()["flops_ratio"], **got}
        for form, lm in models.items():
            pred = lm.predict(*plan.gates)
            row.update({f"{form}/{n}": float(pred[n]) / lm.dense_ms[n] for n in lm.names})
        rows.append(row)
    names = models[FORMS[0]].names
    mae = {form: {n: statistics.mean(abs(r[f"{form}/{n}"] / r[f"ratio/{n}"] - 1) for r in rows) for n in names}
           for form in FORMS}
    return {"model": args.model, "profile": args.profile, "chosen_form": profile["form"], "batch": profile["batch"],
            "threads": profile["threads"], "plans": args.plans, "seed": args.seed, "repeats": args.repeats,
            "measures": list(names), "mae": mae, "rows": rows}


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_json(p) for p in paths]
    panels = [(run, n) for run in runs for n in run["measures"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3), squeeze=False)
    for ax, (run, n) in zip(axes[0], panels):
        form = run["chosen_form"]
        x = [r[f"ratio/{n}"] for r in run["rows"]]
        y = [r[f"{form}/{n}"] for r in run["rows"]]
        ax.plot([0, 1.05], [0, 1.05], color="0.6", lw=1)
        ax.scatter(x, y, s=14)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{Path(run['model']).name} {n}\nMAE {run['mae'][form][n]:.1%} ({form})", fontsize=9)
        ax.set_xlabel("measured latency / dense")
    axes[0][0].set_ylabel("predicted latency / dense")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or open_clip name (random weights)")
    p.add_argument("--profile", help="its latency profile (hipp profile)")
    p.add_argument("--channel-group", type=int, default=8, help="MLP channels per gate of the random plans")
    p.add_argument("--plans", type=int, default=20)
    p.add_argument("--seed", type=int, default=100, help="random plans' seed (the profile validates on seed 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per plan and measure")
    p.add_argument("--out", help="write the result here as JSON")
    p.add_argument("--plot", help="draw predicted vs measured from the JSON files given as arguments, to this PNG")
    p.add_argument("runs", nargs="*", help="with --plot: result files of earlier runs")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.runs, args.plot)
        return 0
    result = check(args)
    if args.out:
        write_json(args.out, result)
    print(f"{result['model']}: {result['plans']} random plans, batch {result['batch']}, {result['threads']} threads; "
          f"profile's form: {result['chosen_form']}")
    for form, per in result["mae"].items():
        print(f"  {form:9s} " + "  ".join(f"{n} MAE {v:.1%}" for n, v in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
