"""Controllability on a LLaVA controller: at one FLOPs budget, does a larger hallucination (grounding)
weight give a plan that answers POPE's adversarial questions better?

For each grounding weight w the preference is (utility 1 - w, grounding w, no cost weight) with
`--match fit`; with `--match cost` it is what `hipp query --pref utility=1-w,grounding=w --max-flops B`
answers (hipp/query/trade_off.py): the FLOPs weight c is raised from 0 until the controller's own plan
for ((1 - c)(1 - w), (1 - c) w, c) comes closest to the budget, so the plan is the one the controller
learnt for that trade-off at that cost, not a zero-cost preference cut down to it. The chosen logits
(with the FLOPs target, when the controller reads one) are fitted to the budget by the project's one
fitter (hipp.core.budget), so every plan lands within 0.02 below it. `--match gates` asks what any
gate training could buy: per weight, fixed-budget gates (hipp.baselines.fixed_budget, no controller)
trained at the budget on (1 - w) x utility + w x grounding, the raw losses (grounding's margin as
the controller's training config sets it). `--match cost --polish N` polishes each cost-matched plan
as `hipp query --pref ... --max-flops B --polish N` does: N free-gate steps at the budget from the
plan's own logits, on its split as the controller weighs it (hipp/query/polish.py); `--polish-grounding`
says how that polish reads the grounding margins (hinge, squared, odds, balanced), `--polish-margin`
which margin (yes against no, or the answer against every token), `--polish-utility` which answers
its utility covers, `--polish-seed` its sampling draw. Each plan is materialised and
answers n test (or validation) questions of the kinds measured. `--pool` also answers each weight from
the pool of every weight's plan, as `polish(..., pool=)` picks (hipp.query.polish.pick_by_split: the
plan whose answers on the calibration instructions differ least from the teacher's as its split weighs
them), from the figures already measured.

    python benchmarks/llava_controllability.py --controller runs/hipp-llava-tiny --budget 0.4 \
        --weights 0,0.25,0.5,0.75,1 --split test --n 500 --out runs/llava-controllability

Prints and writes (--out: result.json, summary.md) per weight: FLOPs ratio, POPE F1 per sampling,
utility, how many adversarial probes the plan answers as the dense teacher does (what an agreement
objective can buy), the last weight's adversarial F1 minus the first's with its paired bootstrap
standard error, for a controller's plans the units its logits keep before the budget fit and the
rank correlation of its logits with the first weight's (near 1: the weight moves how much is kept,
not which units), and the Spearman correlation of weight vs adversarial F1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hipp.controller.files import load_controller  # noqa: E402
from hipp.core.budget import fit, top_up  # noqa: E402
from hipp.evaluation.front import spearman  # noqa: E402
from hipp.evaluation.answers import first_word, score  # noqa: E402
from hipp.evaluation.generative import answer_all, evaluate_generative  # noqa: E402
from hipp.evaluation.generative_bench import Answers  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base  # noqa: E402
from hipp.query.polish import POLISH, SPLIT, polish, pool_picks  # noqa: E402
from hipp.query.trade_off import own_logits, plan_for_preference  # noqa: E402
from hipp.storage.fileio import write_json, write_text  # noqa: E402
from hipp.tasks.instruct import InstructBatch  # noqa: E402
from hipp.training.generative import GenerativeDistiller  # noqa: E402
from hipp.training.objectives import EXISTENCE_MARGINS, GROUNDING_MODES  # noqa: E402

POPE = ("pope/random_f1", "pope/popular_f1", "pope/adversarial_f1")
ADVERSARIAL = ("pope/adversarial",)
ADVERSARIAL_METRICS = ("pope/adversarial_f1", "pope/adversarial_acc", "pope/adversarial_f1_pope_script")  # on the probes


def adversarial(model, processor, split: str, n: int) -> Answers:
    """The model's answers to the adversarial POPE probes."""
    return Answers(*answer_all(model, processor, split, n, kinds=ADVERSARIAL))


def yes_no(answers: Answers) -> list[str]:
    """Answers read as the scorer reads them."""
    return [first_word(a) for a in answers.predictions]


def teacher_margins(model, processor, samples: list) -> torch.Tensor:
    """The dense model's yes-minus-no margins at the probes' first answer token: how firm each answer is."""
    distiller = GenerativeDistiller(model, None, processor, next(model.parameters()).device)
    with torch.no_grad():
        return torch.cat([distiller.forward(distiller.inputs(InstructBatch(samples[i:i + 50])))[1].cpu()
                          for i in range(0, len(samples), 50)])


def agreement(teacher: list[str], answers: Answers, close: list[bool] | None = None) -> dict:
    """How many adversarial answers agree with the teacher's, how many of those are right against the label
    (a plan can keep more of the teacher's answers and gain only its errors), how many are neither yes
    nor no (F1 counts them as a no; accuracy as wrong), F1's two errors (a yes to an absent object, a
    present one not said yes to) and, given `close` (the probes the teacher answers least firmly), how many
    of the teacher's answers lost are among them."""
    said = yes_no(answers)
    labels = [s.answer for s in answers.samples]
    kept = [(a, label) for a, t, label in zip(said, teacher, labels) if a == t]
    out = {"adversarial_as_teacher": len(kept), "adversarial_as_teacher_right": sum(a == label for a, label in kept),
           "adversarial_neither_yes_nor_no": sum(a not in ("yes", "no") for a in said),
           "adversarial_false_yes": sum(a == "yes" and label == "no" for a, label in zip(said, labels)),
           "adversarial_missed_yes": sum(a != "yes" and label == "yes" for a, label in zip(said, labels))}
    if close is not None:
        out["adversarial_lost_on_close_calls"] = sum(a != t and c for a, t, c in zip(said, teacher, close))
    return out


def f1_gap(last: Answers, first: Answers) -> tuple[float, float]:
    """Adversarial F1 of `last` minus `first`, and the paired bootstrap standard error of that gap over
    the same probes (F1 is a ratio over the set, not a mean of per-probe scores)."""
    key = "pope/adversarial_f1"
    gaps = []
    for idx in last.resamples():
        s = [last.samples[i] for i in idx]
        gaps.append(score(s, [last.predictions[i] for i in idx])[key] - score(s, [first.predictions[i] for i in idx])[key])
    return last.metrics[key] - first.metrics[key], float(torch.tensor(gaps, dtype=torch.float64).std())


def spearman_spread(weights: list[float], answers: list[Answers], count: int = 1000) -> dict:
    """How far Spearman(weight, adversarial F1) moves when the probes are drawn again (the same
    resampled probes for every plan, as the plans answered the same ones): its mean, standard
    deviation, 5th and 95th percentiles and the share of draws at 0.8 or more. A measurement's
    spread, not the plans': they are fixed."""
    key = "pope/adversarial_f1"
    rhos = []
    for idx in answers[0].resamples(count):
        s = [answers[0].samples[i] for i in idx]
        rho = spearman(weights, [score(s, [a.predictions[i] for i in idx])[key] for a in answers])
        rhos.append(0.0 if rho is None else rho)  # every plan alike on the draw: no rise
    t = torch.tensor(rhos, dtype=torch.float64)
    return {"draws": count, "mean": float(t.mean()), "sd": float(t.std()), "p05": float(t.quantile(0.05)),
            "p95": float(t.quantile(0.95)), "share_at_least_0.8": float((t >= 0.8 - 1e-12).double().mean())}


def fitted(controller, pref: dict, budget: float):
    """A zero-cost preference's logits cut down to the budget by the project's fitter."""
    (units, flat), bounds = own_logits(controller, pref, budget), {"flops": budget}
    mask, _ = top_up(units, flat, fit(units, flat, bounds).k, bounds)
    return units.plan(mask, pref)


def gates_plan(base, controller, w: float, budget: float, seed: int = 0):
    """Fixed-budget gates trained for the split (1 - w) : w at the budget, with the controller's own
    training budget (steps, samples, temperatures: fixed_budget.matched_to), and their plan."""
    from hipp.baselines import get_method, make_calibration
    from hipp.baselines.fixed_budget import matched_to

    calibration = make_calibration(base.model, base.tokenizer, base.preprocess_cfg)
    train_config = controller.extra["train_config"]
    margin = (train_config.get("objectives") or {}).get("existence_margin", "yes-no")
    options = {**matched_to(train_config), "utility_weight": 1.0 - w, "grounding_weight": w, "existence_margin": margin}
    return get_method("fixed_budget")(base.model, controller.space, budget, calibration, seed, options=options)


def pool_rows(base, controller, plans: list, rows: list[dict], split_options: dict) -> dict:
    """Each weight's answer picked from every weight's polished plan (hipp.query.polish.pool_picks, as
    `polish(..., pool=)` picks with the other weights as the pool), its figures those of the plan picked
    (already measured above)."""
    parts, shares, picks = pool_picks(base, controller, plans, split_options)
    out = [{"grounding_weight": r["grounding_weight"], "share": shares[i], "plan_of_weight": rows[picks[i]]["grounding_weight"],
            "utility": rows[picks[i]]["utility"], "pope/adversarial_f1": rows[picks[i]]["pope/adversarial_f1"],
            "calibration_yes_no_differing": parts[picks[i]][0], "calibration_others_differing": parts[picks[i]][1]}
           for i, r in enumerate(rows)]
    rho = spearman([r["grounding_weight"] for r in out], [r["pope/adversarial_f1"] for r in out])
    return {"rows": out, "parts": parts, "spearman_weight_vs_adversarial_f1": rho}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=200, help="samples of each kind")
    ap.add_argument("--probes", type=int, default=None,
                    help="adversarial POPE probes behind the adversarial F1, its Spearman and their spreads (default: n)")
    ap.add_argument("--polish", type=int, default=0, metavar="STEPS",
                    help="with --match cost: each plan polished on its split (hipp query --polish STEPS)")
    ap.add_argument("--polish-grounding", default=SPLIT["grounding_mode"], choices=GROUNDING_MODES,
                    help="with --polish: how the polish reads the grounding margins (objectives.grounding_mode)")
    ap.add_argument("--polish-utility", default="every" if SPLIT["utility_existence"] else "not-existence",
                    choices=("every", "not-existence"), help="with --polish: the answers the polish's utility covers "
                    "(not-existence: objectives.utility_existence false, the yes / no answers left to grounding)")
    ap.add_argument("--polish-margin", default=SPLIT.get("existence_margin"), choices=EXISTENCE_MARGINS,
                    help="with --polish: the grounding margin, yes against no or the answer against every token "
                         "(objectives.existence_margin; default: the controller's own)")
    ap.add_argument("--polish-temperature", type=float, default=SPLIT["temperature_start"],
                    help="with --polish: the polish's start temperature (how far the gates may move from the plan)")
    ap.add_argument("--polish-seed", type=int, default=0, help="with --polish: the polish's sampling seed")
    ap.add_argument("--polish-tries", type=int, default=1,
                    help="with --polish: polishes per plan, the one closest to the teacher's answers on its split kept")
    ap.add_argument("--polish-lr", type=float, default=SPLIT["lr"], help="with --polish: the polish's learning rate")
    ap.add_argument("--polish-utility-floor", type=float, default=SPLIT["utility_floor"],
                    help="with --polish: the least share of the polish's loss on utility, even at grounding weight 1")
    ap.add_argument("--polish-shares", default="scaled" if SPLIT["scaled"] else "weights", choices=("scaled", "weights"),
                    help="with --polish: utility and grounding weighed through the recipe's loss scales, or as given")
    ap.add_argument("--polish-batch", default="split" if SPLIT["batch_follows_split"] else "kinds",
                    choices=("kinds", "split"), help="with --polish: batches of every kind in turn, or existence "
                                                     "questions in the grounding's share of the polish's loss")
    ap.add_argument("--match", default="fit", choices=("fit", "cost", "gates"),
                    help="fit: a zero-cost preference fitted to the budget; cost: the FLOPs weight whose own plan is "
                         "nearest; gates: fixed-budget gates trained for each weight (the controller gives only the base)")
    ap.add_argument("--pool", action="store_true",
                    help="with --match cost: also answer each weight with the plan, among every weight's, whose answers on "
                         "the calibration instructions differ least from the teacher's as its split weighs them "
                         "(hipp.query.polish.polish(..., pool=) with the other weights as the pool; needs --polish)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    probes = args.n if args.probes is None else args.probes
    if probes < 1:
        ap.error("--probes must be >= 1")
    if args.pool and not args.polish:
        ap.error("--pool picks among polished plans of preferences under a bound: it goes with --polish")
    if args.polish and args.match != "cost":
        ap.error("--polish polishes a preference under a bound: it goes with --match cost")
    if not (args.polish_temperature > 0 and args.polish_lr > 0):
        ap.error("--polish-temperature and --polish-lr must be > 0")
    if not 0 <= args.polish_utility_floor < 1:
        ap.error("--polish-utility-floor must be in [0, 1)")
    split_options = {"grounding_mode": args.polish_grounding, "utility_existence": args.polish_utility == "every",
                     "temperature_start": args.polish_temperature, "lr": args.polish_lr,
                     "utility_floor": args.polish_utility_floor, "batch_follows_split": args.polish_batch == "split",
                     "scaled": args.polish_shares == "scaled"}
    if args.polish_margin is not None:
        split_options["existence_margin"] = args.polish_margin
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    dense = adversarial(base.model, base.tokenizer, args.split, probes)  # no gates installed: the dense model
    margin = teacher_margins(base.model, base.tokenizer, dense.samples)
    teacher, firmness = yes_no(dense), margin.abs()
    close = (firmness <= firmness.quantile(0.25)).tolist()  # the quarter of probes the teacher answers least firmly
    firm = {f"teacher_median_margin_{a}": float(firmness[margin > 0 if a == "yes" else margin < 0].median())
            for a in ("yes", "no")}  # how firmly it says each answer (yes minus no logit)
    # what agreeing with the teacher can reach: its own adversarial F1 and errors
    ceiling = {"pope/adversarial_f1": dense.metrics["pope/adversarial_f1"],
               **{k: v for k, v in agreement(teacher, dense).items() if k in ("adversarial_false_yes", "adversarial_missed_yes")}}
    rows, first, answers, plans = [], None, [], []
    for w in (float(v) for v in args.weights.split(",")):
        split = {"utility": 1.0 - w, "grounding": w}
        if args.match == "gates":
            plan, logits = gates_plan(base, controller, w, args.budget), None
        else:
            plan = plan_for_preference(controller, split, max_flops=args.budget) if args.match == "cost" else \
                fitted(controller, split, args.budget)
            logits = own_logits(controller, plan.preference, args.budget)[1]
            if args.polish:  # hipp query --pref ... --max-flops B --polish N: gates trained on the split
                plan, logits = polish(base, controller, plan, args.polish, seed=args.polish_seed, split=split_options,
                                     tries=args.polish_tries), None
        pref = plan.preference
        plans.append(plan)
        if logits is not None:  # does the weight move which units rank first, or only how many are kept?
            first = logits if first is None else first
            logit_rows = {"kept_before_fit": int((logits > 0).sum()), "logit_spearman_vs_first_weight":
                          spearman(first.tolist(), logits.tolist())}
        else:
            logit_rows = {}
        small = materialize(base.model, plan).eval()
        rep = evaluate_generative(small, base.tokenizer, split=args.split, n=args.n, latency=False)
        answers.append(adversarial(small, base.tokenizer, args.split, probes))
        rows.append({"grounding_weight": w, "flops_weight": pref.get("flops", 0.0),
                     "flops_ratio": plan.costs()["flops_ratio"], "utility": rep["utility"],
                     **{k: rep["metrics"][k] for k in POPE}, **{k: answers[-1].metrics[k] for k in ADVERSARIAL_METRICS},
                     **agreement(teacher, answers[-1], close),
                     **logit_rows})
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    rho = spearman([r["grounding_weight"] for r in rows], [r["pope/adversarial_f1"] for r in rows])
    spread = spearman_spread([r["grounding_weight"] for r in rows], answers) if len(rows) >= 3 else None
    gap, gap_se = f1_gap(answers[-1], answers[0])
    pooled = pool_rows(base, controller, plans, rows, split_options) if args.pool else None
    result = {"controller": args.controller, "budget": args.budget, "split": args.split, "n": args.n, "probes": probes,
              "match": args.match, "polish_steps": args.polish,
              "polish_split": split_options if args.polish else None, "polish_seed": args.polish_seed,
              "polish_tries": args.polish_tries, "rows": rows, "spearman_weight_vs_adversarial_f1": rho,
              "spearman_over_probe_draws": spread,
              "adversarial_f1_last_minus_first": gap, "paired_se": gap_se, **firm, "teacher": ceiling, "pool": pooled}
    margin_name = args.polish_margin or "margin as trained"
    how = (f", polished {args.polish} steps, grounding {args.polish_grounding} ({margin_name}), "
           f"utility on {args.polish_utility} answers, "
           f"temperature {args.polish_temperature:g} -> {POLISH.temperature_end:g}, lr {args.polish_lr:g}, "
           f"utility floor {args.polish_utility_floor:g}, batches {args.polish_batch}, shares {args.polish_shares}") \
        if args.polish else ""
    lines = [f"# Grounding weight vs POPE at FLOPs {args.budget} ({args.split}, {args.n} per kind, {probes} adversarial probes, --match {args.match}{how})", "",
             "| grounding weight | FLOPs weight | FLOPs | utility | POPE F1 r / p (n) / a (probes) | adversarial F1 as POPE's script reads answers | adversarial answers as the teacher's (right; neither yes nor no; accuracy) "
             "| false yes / missed yes | lost on the teacher's least firm quarter "
             "| kept before the fit | logit rank correlation with the first weight's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['grounding_weight']:g} | {r['flops_weight']:.3f} | {r['flops_ratio']:.3f} | {r['utility']:.4f} | "
              f"{' / '.join(f'{r[k]:.3f}' for k in POPE)} | {r['pope/adversarial_f1_pope_script']:.3f} | {r['adversarial_as_teacher']} / {probes} ({r['adversarial_as_teacher_right']}; "
              f"{r['adversarial_neither_yes_nor_no']}; {r['pope/adversarial_acc']:.3f}) | "
              f"{r['adversarial_false_yes']} / {r['adversarial_missed_yes']} | {r['adversarial_lost_on_close_calls']} | "
              f"{r.get('kept_before_fit', '-')} | {r.get('logit_spearman_vs_first_weight', '-')} |" for r in rows]
    why = "fewer than three weights" if len(rows) < 3 else "every plan scores alike"
    lines += ["", "Spearman(weight, adversarial F1) = " + (f"{rho:.3f}" if rho is not None else f"undefined ({why})")
              + ("" if spread is None else f"; over {spread['draws']} draws of the probes {spread['mean']:.2f} ± {spread['sd']:.2f} "
                 f"(5-95%: {spread['p05']:.2f} to {spread['p95']:.2f}; at least 0.8 in {spread['share_at_least_0.8']:.0%})"),
              f"adversarial F1, last weight minus first: {gap:+.4f} (paired bootstrap standard error {gap_se:.4f})",
              "the teacher's median |yes - no| margin on the probes it answers yes / no: "
              f"{firm['teacher_median_margin_yes']:.2f} / {firm['teacher_median_margin_no']:.2f}",
              f"the teacher's own adversarial F1 {ceiling['pope/adversarial_f1']:.3f} (false yes / missed yes "
              f"{ceiling['adversarial_false_yes']} / {ceiling['adversarial_missed_yes']})"]
    printed = lines[-4:]
    if pooled is not None:
        lines += ["", "Each weight answered from the pool of every weight's plan (picked by the calibration answers):", "",
                  "| grounding weight | polish share | plan of weight | utility | adversarial F1 |", "|---|---|---|---|---|"]
        lines += [f"| {r['grounding_weight']:g} | {r['share']:.3f} | {r['plan_of_weight']:g} | {r['utility']:.4f} | "
                  f"{r['pope/adversarial_f1']:.3f} |" for r in pooled["rows"]]
        rho_pool = pooled["spearman_weight_vs_adversarial_f1"]
        lines += ["", "pooled: Spearman(weight, adversarial F1) = " + (f"{rho_pool:.3f}" if rho_pool is not None else "undefined")]
        printed.append(lines[-1])
    print("\n".join(printed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "result.json", result)
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
