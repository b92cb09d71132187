"""Visual tokens on the LLaVA teacher: joint weight + token plans against weights only and tokens only.

For each FLOPs budget and each share of the image tokens, the controller's bound search fits the
weights to what the tokens leave (hipp.query.bound, token_counts); the share 1 is the weights-only
plan. Tokens only keeps every weight and as many tokens as the budget allows (FoPru / HiPrune-style,
ranked by the vision tower's class-token attention); where even one token is over the budget the row
says so. On the dense weights, the class-token ranking is also set against evenly spaced tokens and
against the FastV-style text rule (the prompt's last token's attention in language layer K, tokens
leaving after it; `--text-after` lists the Ks) at the same counts: which rule ranks better. `--rule`
chooses the rule of the joint and tokens-only rows. A controller trained to choose the count itself
(`visual_tokens: text` in its config) adds a row "hipp chooses": its bound query, each preference's
weights fitted at that preference's own count; `--weights-controller` then takes the weights-only
rows from a controller trained without tokens (the same recipe otherwise). Each plan is materialised and answers the same `--n`
instructions of every kind of `--split`; utility and POPE adversarial F1 come with the paired
bootstrap standard error of their difference from the budget's weights-only plan (or, for the
ranking rows, from the class-token rule at the same count).

    python benchmarks/visual_tokens.py --controller runs/hipp-llava-tiny --split test --n 300 \
        --budgets 0.3,0.5 --shares 1,0.75,0.5,0.25 --out runs/tokens/test

`--check N` instead compares each joint plan's materialised model with the hard-gated base on N test
prompts: the largest logit difference of the prompts' last positions, and whether the greedy
generations (16 tokens) are identical.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hipp.backends import decoder_tokens, llava_tokens  # noqa: E402
from hipp.controller.files import load_controller  # noqa: E402
from hipp.core.plan import Plan  # noqa: E402
from hipp.errors import HippError  # noqa: E402
from hipp.evaluation.generative import answer_all  # noqa: E402
from hipp.evaluation.generative_bench import Answers, judged  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402
from hipp.query.bound import load_base, plan_for_budget  # noqa: E402
from hipp.query.tokens import SEARCH, counts, token_level, tokens_only  # noqa: E402
from hipp.storage.fileio import write_json, write_text  # noqa: E402

KEYS = ("utility", "pope/adversarial_f1")


def answers(base, plan: Plan, split: str, n: int) -> Answers:
    small = materialize(base.model, plan).eval()
    return Answers(*answer_all(small, base.tokenizer, split, n))


def row(name: str, budget, plan: Plan, got: Answers, ref: Answers | None, resamples) -> dict:
    out = {"row": name, "budget": budget, "flops_ratio": plan.costs()["flops_ratio"],
           "tokens_kept": [int(k) for k in plan.token_keep], **judged(got.metrics)}
    if ref is not None:
        se = got.paired_se(ref, resamples)
        mine, theirs = judged(got.metrics), judged(ref.metrics)
        out["vs_ref"] = {k: {"diff": mine[k] - theirs[k], "se": se[k]} for k in KEYS}
    return out


def check(base, plan: Plan, n: int) -> dict:
    from hipp.backends import hard_plan
    from hipp.data import words
    from hipp.data.instruct import make_samples

    small = materialize(base.model, plan).eval()
    batch = words.encode(base.tokenizer, make_samples("test", n, seed=0), train=False)
    batch.pop("answers")
    with torch.no_grad():
        ours, tokens = small(**batch).logits[:, -1], small.generate(**batch, max_new_tokens=16, do_sample=False)
        with hard_plan(base.model, plan):
            hard, hard_tokens = (base.model(**batch).logits[:, -1],
                                 base.model.generate(**batch, max_new_tokens=16, do_sample=False))
    return {"prompts": n, "max_abs_logit_diff": float((ours - hard).abs().max()),
            "identical_generations": int((tokens == hard_tokens).all(1).sum()) if tokens.shape == hard_tokens.shape else 0}


def write_summary(out: Path, result: dict) -> list[str]:
    """summary.md of a result: one table row per plan."""
    rows, args_split, args_n = result["rows"], result["split"], result["n"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Visual tokens ({args_split}, {args_n} per kind)", "",
             "| row | budget | FLOPs | tokens | utility | POPE adv F1 | utility vs ref | POPE adv vs ref |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['budget']} | - | - | - | - | {r['error']} | |")
            continue
        vs = r.get("vs_ref", {})
        cells = [f"{vs[k]['diff']:+.3f} ± {vs[k]['se']:.3f}" if k in vs else "" for k in KEYS]
        lines.append(f"| {r['row']} | {r['budget'] if r['budget'] is not None else '-'} | {f(r['flops_ratio'])} | "
                     f"{r['tokens_kept'][0] if r['tokens_kept'] else 'all'} | {f(r['utility'])} | {f(r['pope/adversarial_f1'])} | {' | '.join(cells)} |")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controller", required=True)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--n", type=int, default=100, help="instructions of each kind")
    ap.add_argument("--budgets", default="0.3,0.5")
    ap.add_argument("--shares", default="1,0.75,0.5,0.25")
    ap.add_argument("--rule", choices=("cls", "text"), help="rule of the joint and tokens rows (default: the model's)")
    ap.add_argument("--no-ranking", action="store_true", help="skip the dense-weight rows of the ranking rules")
    ap.add_argument("--text-after", default="0,1", help="language layers after which the text rule prunes")
    ap.add_argument("--after", type=int, help="that layer for the joint and tokens rows (default: the backend's)")
    ap.add_argument("--weights-controller", help="a controller trained without tokens, for the weights-only rows")
    ap.add_argument("--search", action="store_true", help="add the bound search over quarters of the tokens "
                    "(--visual-tokens search)")
    ap.add_argument("--check", type=int, metavar="N", help="only compare exports with the hard-gated model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    controller = load_controller(args.controller)
    base = load_base(controller, args.controller)
    if args.after is not None:  # a study of the cut: every level the rows build prunes after this layer
        decoder_tokens.default_after = lambda layers: args.after
    level = token_level(base.model, args.rule)
    space = controller.space.with_tokens(level)
    kept = sorted(counts(level, [float(s) for s in args.shares.split(",")]), reverse=True)
    if args.check:
        checks = []
        for budget in (float(b) for b in args.budgets.split(",") if b):
            plans = [plan_for_budget(controller, max_flops=budget, base=base, token_counts=[k], token_rule=args.rule)
                     for k in kept]
            if controller.space.tokens:  # and the count the controller chose
                plans.append(plan_for_budget(controller, max_flops=budget, base=base))
            for plan in plans:
                checks.append({"budget": budget, "tokens_kept": int(plan.token_keep[0]) if plan.space.tokens else None,
                               **check(base, plan, args.check)})
                print(checks[-1], flush=True)
        write_json(Path(args.out) / "check.json", checks)
        return 0
    dense = answers(base, Plan.dense(space), args.split, args.n)
    resamples = dense.resamples()
    rows = [row("dense", None, Plan.dense(space), dense, None, resamples)]
    weights_only = None
    if args.weights_controller:
        other = load_controller(args.weights_controller)
        weights_only = (other, load_base(other, args.weights_controller))
    for budget in (float(b) for b in args.budgets.split(",") if b):
        ref = None
        if weights_only:
            plan = plan_for_budget(weights_only[0], max_flops=budget, base=weights_only[1])
            ref = answers(weights_only[1], plan, args.split, args.n)
            rows.append(row("weights", budget, plan, ref, None, resamples))
            print(rows[-1], flush=True)
        if controller.space.tokens:
            plan = plan_for_budget(controller, max_flops=budget, base=base)
            got = answers(base, plan, args.split, args.n)
            ref = ref or got
            rows.append(row("hipp chooses", budget, plan, got, None if got is ref else ref, resamples))
            print(rows[-1], flush=True)
        if args.search:
            plan = plan_for_budget(controller, max_flops=budget, base=base, token_counts=counts(level, SEARCH),
                                   token_rule=args.rule)
            got = answers(base, plan, args.split, args.n)
            ref = ref or got
            rows.append(row("search quarters", budget, plan, got, None if got is ref else ref, resamples))
            print(rows[-1], flush=True)
        for k in kept:
            plan = plan_for_budget(controller, max_flops=budget, base=base, token_counts=[k], token_rule=args.rule)
            got = answers(base, plan, args.split, args.n)
            ref = ref or got  # the first count is every token: the weights-only plan
            rows.append(row("weights, same controller" if k == level.tokens and weights_only else
                            "weights" if k == level.tokens else "joint", budget, plan, got,
                            None if got is ref else ref, resamples))
            print(rows[-1], flush=True)
        try:
            plan = tokens_only(space, budget)
            rows.append(row("tokens", budget, plan, answers(base, plan, args.split, args.n), ref, resamples))
        except HippError as e:
            rows.append({"row": "tokens", "budget": budget, "error": str(e)})
        print(rows[-1], flush=True)
    cls_space = controller.space.with_tokens(token_level(base.model, "cls"))
    for k in [] if args.no_ranking else kept[1:]:  # which ranking: the class token's attention against evenly spaced tokens and text
        plan = Plan.from_gates(cls_space, cls_space.all_kept(), token_keep=[k])
        cls = answers(base, plan, args.split, args.n)
        rows.append(row("dense weights, cls", None, plan, cls, dense, resamples))
        rank = llava_tokens.rank_attention
        llava_tokens.rank_attention = lambda model, layer: None  # no attention: evenly spaced
        try:
            rows.append(row("dense weights, spaced", None, plan, answers(base, plan, args.split, args.n), cls,
                            resamples))
        finally:
            llava_tokens.rank_attention = rank
        for after in (int(a) for a in args.text_after.split(",")):
            text_space = controller.space.with_tokens(decoder_tokens.level(base.model, after))
            text = Plan.from_gates(text_space, text_space.all_kept(), token_keep=[k])
            rows.append(row(f"dense weights, text after {after}", None, text, answers(base, text, args.split, args.n),
                            cls, resamples))
        print(rows[-3:], flush=True)
    out = Path(args.out)
    result = {"controller": args.controller, "split": args.split, "n": args.n, "rows": rows,
              "seconds": time.time() - t0}
    write_json(out / "result.json", result)
    lines = write_summary(out, result)
    print("\n".join(lines))
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
