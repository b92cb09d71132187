"""Prefill speed-up of materialised LLaVA plans at LLaVA-1.5-7B's widths.

A random-init LlavaForConditionalGeneration with the real model's shapes but few layers: the vision
tower is ViT-L/14 at 336 px (1024 wide, 16 heads, MLP 4096; 576 patches + the class token), the
projector is LLaVA-1.5's two-layer GELU MLP, the decoder is Vicuna-7B's (4096 wide, 32 heads of 128,
SwiGLU 11008, vocabulary 32000). Latency does not depend on the weights' values, only on shapes.

For each FLOPs ratio r a uniform plan (the same share of heads and channels in every layer, so
each stage lands near r; which units go is drawn at random, as it does not change the speed) is
materialised; its prefill logits are checked against the
hard-gated model; then one prefill (batch 1: the 576 image tokens + 32 prompt tokens, the last
position's logits only, as generate() asks for) is timed against the dense model materialised from
the all-kept plan, in interleaved rounds. Printed: the plan's FLOPs ratio r, the median speed-up,
1/r and speed-up / (1/r).

With `--token-share S` the plans are joint: each keeps the share S of the image tokens and the uniform
weight plan spends what is left of r; the materialised model prunes its tokens itself. `--token-rule`
ranks them (hipp/backends/visual_tokens.py): "text" (a LLaVA's default: the prompt's last token's
attention in an early decoder layer, tokens leaving after it; with 2 decoder layers, after the first)
or "cls" (the vision tower's class token, tokens leaving before the decoder).

    python benchmarks/llava_real_width.py --max-flops 0.5,0.3 --layers 2 --repeats 5
    python benchmarks/llava_real_width.py --max-flops 0.3 --token-share 0.5 --layers 2 --repeats 5 --token-rule cls
    python benchmarks/llava_real_width.py --small     # the same path at toy widths, in seconds
    python benchmarks/llava_real_width.py --analytic  # the full depth priced from shapes, no weights
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hipp.backends import gated, make_prunable, visual_tokens  # noqa: E402
from hipp.backends.visual_tokens import pruning  # noqa: E402
from hipp.baselines.allocate import uniform  # noqa: E402
from hipp.baselines.units import Scores  # noqa: E402
from hipp.core.plan import Plan  # noqa: E402
from hipp.export.slicing import materialize  # noqa: E402

PROMPT_TOKENS = 32
IMAGE_TOKEN = 32000  # LLaVA-1.5 appends <image> after Vicuna's 32000 tokens


def llava_config(layers: int, small: bool):
    import transformers

    if small:
        vision = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, image_size=56, patch_size=14)
        text = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    vision.update(model_type="clip_vision_model", num_hidden_layers=layers, projection_dim=768, hidden_act="quick_gelu")
    text.update(model_type="llama", num_hidden_layers=layers, vocab_size=IMAGE_TOKEN + 64, rms_norm_eps=1e-5,
                max_position_embeddings=4096, pad_token_id=0)
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   projector_hidden_act="gelu")
    cfg.hipp_prompt_tokens = image_tokens + PROMPT_TOKENS  # the stage's declared prompt, for the cost model
    return cfg, image_tokens


def prompt(cfg, image_tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, IMAGE_TOKEN, (1, image_tokens + PROMPT_TOKENS), generator=g)
    ids[:, 1:1 + image_tokens] = IMAGE_TOKEN
    size = cfg.vision_config.image_size
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size, generator=g), logits_to_keep=1)


def prefill(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def interleaved(a, b, inputs, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall times (s) of a and b, alternating which goes first each round."""
    ta, tb = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            prefill(a, inputs), prefill(b, inputs)
        for i in range(repeats):
            for m, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
                t = time.perf_counter()
                prefill(m, inputs)
                out.append(time.perf_counter() - t)
    return ta, tb


def analytic(small: bool) -> int:
    """Costs of the real depth from shapes alone (a model on the meta device holds no weights)."""
    import transformers

    from hipp.backends import describe

    cfg, image_tokens = llava_config(2, small)
    cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers = 24, 32
    with torch.device("meta"):
        space = describe(transformers.LlavaForConditionalGeneration(cfg), tokens=True)
    dense = space.dense_costs()
    print(f"vision tower: {dense['flops/vision'] / (dense['flops/vision'] + dense['flops/language']):.3f} of a prefill")
    for kept in (1, image_tokens // 6, image_tokens // 4, image_tokens // 2):
        ratio = Plan.from_gates(space, space.all_kept(), token_keep=[kept]).costs()["flops_ratio"]
        print(f"every weight, {kept} of {image_tokens} image tokens: FLOPs ratio {ratio:.3f}")
    return 0


def main(argv=None) -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-flops", default="0.5,0.3", help="comma-separated FLOPs ratios")
    p.add_argument("--layers", type=int, default=2, help="vision and decoder layers (the real model: 24 / 32)")
    p.add_argument("--channel-group", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--small", action="store_true", help="toy widths: checks the path, times nothing real")
    p.add_argument("--token-share", type=float, help="joint plans keeping this share of the image tokens")
    p.add_argument("--token-rule", choices=("cls", "text"), help="how the image tokens are ranked (default: text)")
    p.add_argument("--out", help="also write the rows here as JSON")
    p.add_argument("--analytic", action="store_true",
                   help="only price the full-depth model (24 vision + 32 decoder layers, no weights): the vision "
                        "tower's share of a prefill and what tokens alone reach")
    args = p.parse_args(argv)
    if args.analytic:
        return analytic(args.small)
    torch.manual_seed(0)
    cfg, image_tokens = llava_config(args.layers, args.small)
    model = transformers.LlavaForConditionalGeneration(cfg).eval().requires_grad_(False)
    space = make_prunable(model, args.channel_group, tokens=(args.token_rule or True) if args.token_share else False)
    kept = None if args.token_share is None else [max(1, round(args.token_share * image_tokens))]
    inputs = prompt(cfg, image_tokens)
    g = torch.Generator().manual_seed(0)  # which units go does not matter for speed, only how many
    scores = Scores([torch.rand(l.num_heads, generator=g, dtype=torch.float64) for l in space.layers],
                    [torch.rand(l.num_channel_gates, generator=g, dtype=torch.float64) for l in space.layers])
    dense = materialize(model, Plan.dense(space)).eval()
    with torch.inference_mode():
        dense_logits = prefill(dense, inputs)
    rows = []
    for r in (float(x) for x in args.max_flops.split(",")):
        plan = uniform(space, r, scores, token_keep=kept)
        small = materialize(model, plan).eval()
        with torch.inference_mode(), gated(model, plan.gates), pruning(model, visual_tokens.for_plan(plan)):
            hard = prefill(model, inputs)
        with torch.inference_mode():
            diff = float((prefill(small, inputs) - hard).abs().max())
        t_dense, t_small = interleaved(dense, small, inputs, args.repeats, args.warmup)
        costs = plan.costs()
        speedup = statistics.median(t_dense) / statistics.median(t_small)
        rows.append({"max_flops": r, "flops_ratio": costs["flops_ratio"], "tokens_kept": kept,
                     "token_rule": space.tokens[0].rule if space.tokens else None,
                     **{k: v for k, v in costs.items() if k.startswith("flops_ratio/")},
                     "max_abs_logit_diff": diff, "logit_scale": float(dense_logits.abs().max()),
                     "dense_s": statistics.median(t_dense), "pruned_s": statistics.median(t_small),
                     "speedup": speedup, "target": 0.85 / costs["flops_ratio"],
                     "speedup_over_ideal": speedup * costs["flops_ratio"]})
        del small
    info = {"layers": args.layers, "small": args.small, "threads": torch.get_num_threads(),
            "prefill_tokens": image_tokens + PROMPT_TOKENS, "repeats": args.repeats,
            "params": sum(p.numel() for p in model.parameters()), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    if kept is not None:
        print(f"joint plans: {kept[0]} of {image_tokens} image tokens kept, ranked by {space.tokens[0].rule!r}")
    print(f"LLaVA-1.5-7B widths{' (toy)' if args.small else ''}, {args.layers} + {args.layers} layers, "
          f"{info['params'] / 1e6:.0f} M params, batch 1, {info['prefill_tokens']} prefill tokens, "
          f"{info['threads']} threads, medians of {args.repeats} interleaved rounds")
    print(f"{'r':>5s} {'flops r':>8s} {'vision':>7s} {'lang':>7s} {'|dlogit|':>9s} {'dense s':>8s} {'pruned s':>9s} "
          f"{'speedup':>8s} {'1/r':>6s} {'sp/(1/r)':>8s}")
    for row in rows:
        print(f"{row['max_flops']:5.2f} {row['flops_ratio']:8.3f} {row['flops_ratio/vision']:7.3f} "
              f"{row['flops_ratio/language']:7.3f} {row['max_abs_logit_diff']:9.2e} {row['dense_s']:8.3f} "
              f"{row['pruned_s']:9.3f} {row['speedup']:8.2f} {1 / row['flops_ratio']:6.2f} "
              f"{row['speedup_over_ideal']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
