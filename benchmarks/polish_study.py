"""What does polishing buy, and with which settings? For each FLOPs bound: the bound query's plan, then
for each setting a polished plan (`hipp.query.polish.polished_plan`, before the keep-if-better check), each
with its ranking loss (what `polish` compares) and its utility on the full test sets (the bench's
evaluation).

    python benchmarks/polish_study.py --controller runs/hipp-tiny --budgets 0.3,0.5,0.7 \
        --settings '[{}, {"lr": 0.02}, {"lambda_lr": 0.5}]' --out runs/polish_study

Each setting overrides fields of `hipp.query.polish.POLISH`. About 2 min per bound and setting on 2 cores.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

from hipp.controller.files import load_controller
from hipp.storage.fileio import write_json, write_text
from hipp.evaluation.pareto import evaluate_plan
from hipp.query.polish import POLISH, polished_plan
from hipp.query.bound import load_base, plan_for_budget
from hipp.query.ranking import rank_losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", default="runs/hipp-tiny")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--settings", default="[{}]", help="JSON list of POLISH overrides")
    ap.add_argument("--out", default="runs/polish_study")
    args = ap.parse_args()
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    utility = lambda p: evaluate_plan(base.model, p, base.tokenizer, base.preprocess_cfg, n=1000,
                                      fmnist_limit=None)["utility"]
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = plan_for_budget(controller, max_flops=budget, base=base)
        loss = rank_losses(base, [plan])[0][0]
        rows.append({"budget": budget, "setting": "bound query", "loss": loss, "utility": utility(plan)})
        print(rows[-1], flush=True)
        for over in json.loads(args.settings):
            training = dataclasses.replace(POLISH, **over)
            t0 = time.perf_counter()
            polished, info = polished_plan(base, controller, plan, training)
            seconds = time.perf_counter() - t0
            rows.append({"budget": budget, "setting": json.dumps(over), "loss": rank_losses(base, [polished])[0][0],
                         "utility": utility(polished), "flops_ratio": polished.costs()["flops_ratio"],
                         "expected_flops": info["expected_flops"], "seconds": seconds})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "polish_study.json", {"controller": args.controller, "polish": dataclasses.asdict(POLISH),
                                           "rows": rows})
    lines = ["| budget | setting (over POLISH) | ranking loss | utility | polish s |", "|---|---|---|---|---|"]
    lines += [f"| {r['budget']:g} | {r['setting']} | {r['loss']:.4f} | {r['utility']:.4f} | "
              f"{r.get('seconds', 0):.0f} |" for r in rows]
    write_text(out / "polish_study.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
