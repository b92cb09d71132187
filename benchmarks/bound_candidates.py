"""Every candidate a LLaVA bound query ranks, measured: which ranking rule picks the best plan?

The bound query (hipp/query/bound.py) fits the controller's plans for many preferences to the bound and
ranks up to 16 distinct ones by one calibration loss on validation instructions. This runs the same
search, materialises every candidate and answers n questions of each kind (scenes of seed 0), and
scores each candidate by several ranking signals taken on other scenes (seed 1): the objectives'
terms (answer KL, yes / no margin loss) on 64 and `--calib` instructions, their sum and their
training-scaled sum, and the share of greedy answers unlike the ungated model's on `--agree`
instructions (hipp.query.ranking.answer_disagreement, the rule the query now ships with 300).
For each rule it prints the measured utility and POPE adversarial F1 of the candidate the rule picks,
and those of the best candidate (an oracle no rule has).

    python benchmarks/bound_candidates.py --controller runs/hipp-llava-tiny --budgets 0.3,0.5 \
        --split val --n 200 --out runs/bound-candidates
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hipp.controller.files import load_controller  # noqa: E402
from hipp.evaluation.generative import evaluate_generative  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import bound_candidates, load_base, search_defaults  # noqa: E402
from hipp.query.ranking import answer_disagreement, generative_terms  # noqa: E402
from hipp.storage.fileio import write_json  # noqa: E402

POPE = ("pope/random_f1", "pope/popular_f1", "pope/adversarial_f1")
CALIB_SEED = 1  # ranking scenes apart from the measured ones (seed 0); Fashion-MNIST images may repeat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--budgets", default="0.3,0.5")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=200, help="measured samples of each kind")
    ap.add_argument("--calib", type=int, default=256, help="instructions for the loss signals")
    ap.add_argument("--agree", default="100,300", help="instructions for the answer-agreement signals")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    n_rank = search_defaults(controller.space, generative=True)["n_rank"]
    agree_n = [int(x) for x in args.agree.split(",") if x.strip()]
    result = {"controller": args.controller, "split": args.split, "n": args.n, "budgets": {}}
    for b in (float(x) for x in args.budgets.split(",")):
        found = bound_candidates(controller, max_flops=b, n_rank=n_rank)
        plans = [c.plan for c in found]
        terms = {n: generative_terms(base, plans, n, seed=CALIB_SEED) for n in (64, args.calib)}
        disagree = {n: answer_disagreement(base, plans, n, seed=CALIB_SEED) for n in agree_n}
        rows = []
        for j, plan in enumerate(plans):
            rep = evaluate_generative(materialize(base.model, plan).eval(), base.tokenizer, split=args.split, n=args.n,
                                      latency=False)
            rows.append({**{f"kl{n}": t[j]["utility"] for n, t in terms.items()},
                         **{f"yes_no{n}": t[j]["grounding"] for n, t in terms.items()},
                         **{f"disagree{n}": d[j] for n, d in disagree.items()},
                         "utility": rep["utility"], **{m: rep["metrics"][m] for m in POPE}})
        c = args.calib
        rules = {"KL + yes-no on 64 (the rule before)": lambda r: r["kl64"] + r["yes_no64"],
                 f"KL + yes-no on {c}": lambda r: r[f"kl{c}"] + r[f"yes_no{c}"],
                 f"KL / 0.3 + yes-no on {c}": lambda r: r[f"kl{c}"] / 0.3 + r[f"yes_no{c}"],
                 f"KL on {c}": lambda r: r[f"kl{c}"], f"yes-no on {c}": lambda r: r[f"yes_no{c}"],
                 **{f"answers on {n}": (lambda n: lambda r: r[f"disagree{n}"])(n) for n in agree_n}}
        picks = {}
        for name, key in rules.items():
            r = min(rows, key=key)
            picks[name] = {"utility": r["utility"], "adversarial_f1": r["pope/adversarial_f1"]}
        picks["oracle utility"] = {"utility": max(r["utility"] for r in rows),
                                   "adversarial_f1": max(rows, key=lambda r: r["utility"])["pope/adversarial_f1"]}
        print(f"budget {b}, {len(rows)} candidates")
        for name, v in picks.items():
            print(f"  {name:40s} utility {v['utility']:.4f}  adversarial F1 {v['adversarial_f1']:.3f}")
        result["budgets"][str(b)] = {"rows": rows, "picks": picks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
