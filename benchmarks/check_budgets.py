"""Query by constraint on a trained controller: does every requested FLOPs bound land within
0.02 below it?

    python benchmarks/check_budgets.py --controller runs/hipp-tiny [--bounds 0.3,...,0.9]
"""
import argparse
import json
import time

from hipp.controller.files import load_controller
from hipp.query.bound import load_base, plan_for_budget


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", default="runs/hipp-tiny")
    ap.add_argument("--bounds", default="0.3,0.35,0.4,0.45,0.5,0.6,0.7,0.75,0.8,0.9")
    args = ap.parse_args()
    ctrl = load_controller(args.controller)
    base = load_base(ctrl, args.controller)
    rows = []
    for bound in map(float, args.bounds.split(",")):
        t = time.perf_counter()
        plan = plan_for_budget(ctrl, max_flops=bound, base=base)
        got = plan.costs()["flops_ratio"]
        rows.append({"max_flops": bound, "flops_ratio": round(got, 4), "gap": round(bound - got, 4),
                     "met": 0 <= bound - got <= 0.02, "seconds": round(time.perf_counter() - t, 2),
                     "preference": {k: round(v, 3) for k, v in plan.preference.items()}})
    print(json.dumps({"met": sum(r["met"] for r in rows), "of": len(rows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
