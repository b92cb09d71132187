"""Where a CLIP image tower should prune its patches: the layer after which only the class token and
the k patches it attends to most go on (EViT-style), and the ranking rule, chosen on validation data.

On the dense weights of the embedded teacher, for every layer K and share of the patches, the plan is
materialised and measured (hipp.evaluation.pareto.evaluate_plan: zero-shot, retrieval, grounding);
at the default layer the class-token ranking is also set against evenly spaced patches.

    python benchmarks/clip_tokens.py --model checkpoints/teacher-tiny --split val --shares 0.75,0.5,0.25 \
        --out runs/tokens/clip-after-val.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.backends import backend_for, make_prunable, tower_tokens  # noqa: E402
from hipp.core.plan import Plan  # noqa: E402
from hipp.evaluation.pareto import evaluate_plan  # noqa: E402
from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/teacher-tiny")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--shares", default="0.75,0.5,0.25")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = load_model(args.model)
    tokenizer, pp = get_tokenizer(args.model), preprocess_cfg(model)
    space = make_prunable(model, tokens=True)
    default = space.tokens[0]
    blocks = backend_for(model).blocks(model)["image"]
    positions = default.tokens + 1
    head_dim = space.tower_layers("image")[0].head_dim

    def measure(plan: Plan) -> dict:
        got = evaluate_plan(model, plan, tokenizer, pp, n=args.n, split=args.split)
        return {"flops_ratio": got["flops_ratio"], "flops_ratio/image": got["flops_ratio/image"],
                "utility": got["utility"], "grounding": got["grounding"]}

    rows = [{"after": None, "kept": default.tokens, "rule": "-", **measure(Plan.dense(space.with_tokens(default)))}]
    for after in range(len(blocks) - 1):
        level = tower_tokens.level("image", blocks, positions, after, head_dim)
        for share in (float(s) for s in args.shares.split(",")):
            kept = max(1, round(share * level.tokens))
            plan = Plan.from_gates(space.with_tokens(level), space.all_kept(), token_keep=[kept])
            rows.append({"after": after, "kept": kept, "rule": "cls", **measure(plan)})
            if after == default.after:
                rank = tower_tokens.ranking_attention
                tower_tokens.ranking_attention = lambda block: None  # evenly spaced patches
                try:
                    rows.append({"after": after, "kept": kept, "rule": "spaced", **measure(plan)})
                finally:
                    tower_tokens.ranking_attention = rank
            print(rows[-1], flush=True)
    print(f"{'after':>5s} {'kept':>4s} {'rule':>6s} {'FLOPs':>6s} {'image':>6s} {'utility':>8s} {'grounding':>9s}")
    for r in rows:
        print(f"{str(r['after']):>5s} {r['kept']:4d} {r['rule']:>6s} {r['flops_ratio']:6.3f} "
              f"{r['flops_ratio/image']:6.3f} {r['utility']:8.4f} {r['grounding']:9.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "split": args.split, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
