"""Evaluation of a generative LLaVA model on the instruction tasks (hipp/data/instruct.py).

Greedy decoding (model.generate, do_sample=False) of left-padded prompts built by hipp/data/words.py;
the scoring is hipp/evaluation/answers.py's. The report follows `hipp eval`'s contract: metrics
("group/name" floats), utility, params, flops and latency_ms per stage, here "prefill" (image and
prompt) and "decode_token" (one generated token).
"""
from __future__ import annotations

import time

import torch

from ..data import words
from ..data.instruct import KINDS, check_kinds, eval_sets
from ..errors import HippError
from .answers import score, utility_of

ANSWER_TOKENS = 4     # one word and </s>, with room to see a model that does not stop
CAPTION_TOKENS = 40   # three object phrases are 26 words
LATENCY_BATCH = 8
SPLITS = ("test", "val")
DATASET_KINDS = {"shapes": tuple(k for k in KINDS if k != "fmnist"), "fmnist": ("fmnist",)}


def kinds_for(datasets) -> tuple[str, ...]:
    """`hipp eval --data` names as sample kinds: shapes -> captions, attributes and POPE; fmnist."""
    if datasets is None:
        return KINDS
    out: list[str] = []
    for d in datasets:
        if d not in DATASET_KINDS:
            raise HippError(f"a llava model is evaluated on {', '.join(DATASET_KINDS)}, not {d!r}")
        out += DATASET_KINDS[d]
    return tuple(out)


def check_pair(model, processor) -> None:
    """The processor fits the model: image size, image tokens per image, the <image> id, the vocabulary."""
    import transformers

    from ..backends.llava import LlavaBackend

    if not isinstance(model, transformers.LlavaForConditionalGeneration):
        raise HippError(f"generative evaluation runs a LlavaForConditionalGeneration, not {type(model).__name__}")
    if not isinstance(processor, transformers.LlavaProcessor):
        raise HippError(f"generative evaluation needs a LlavaProcessor, not {type(processor).__name__}")
    size, side = int(model.config.vision_config.image_size), words.image_side(processor)
    if size != side:
        raise HippError(f"the processor makes {side}x{side} images; the model takes {size}x{size}")
    have, want = words.image_tokens(processor), LlavaBackend.image_tokens(model)
    if have != want:
        raise HippError(f"the processor expands {words.IMAGE} into {have} tokens; the model has {want} image features")
    if processor.image_token_id != model.config.image_token_id:
        raise HippError(f"the processor's {words.IMAGE} is token {processor.image_token_id}; "
                        f"the model's is {model.config.image_token_id}")
    if len(processor.tokenizer) > model.config.text_config.vocab_size:
        raise HippError(f"the tokenizer has {len(processor.tokenizer)} tokens; the model's vocabulary "
                        f"{model.config.text_config.vocab_size}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generation_config(processor, max_new_tokens: int, min_new_tokens: int = 0):
    """Our own settings, never a generation_config.json's sampling options."""
    import transformers

    tok = processor.tokenizer
    return transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                         min_new_tokens=min_new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


@torch.inference_mode()
def generate(model, processor, images, prompts: list[str], max_new_tokens: int,
             batch_size: int = 32) -> list[str]:
    """Greedy answers to prompts (each holding <image> once) about uint8 [3, S, S] images, as text up
    to the first </s>."""
    tok, device, out = processor.tokenizer, _device(model), []
    config = _generation_config(processor, max_new_tokens)
    for i in range(0, len(prompts), batch_size):
        batch = words.encode_prompts(processor, images[i:i + batch_size], prompts[i:i + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        new = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:].tolist()
        for row in new:
            end = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            out.append(" ".join(tok.decode(row[:end], skip_special_tokens=True).split()))
    return out


def _check_args(split: str, n, batch_size) -> None:
    if split not in SPLITS:
        raise HippError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    for name, value in (("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HippError(f"{name} must be a positive whole number, got {value!r}")


def costs(model, prompt_tokens: list[int]) -> dict[str, float]:
    """Analytic FLOPs per sample (hipp/core/costs.py): prefill of the image and a prompt of each given
    length (averaged), and one generated token right after such a prompt (averaged). Logits are
    computed for the last position only, as generate does."""
    from ..backends import describe, visual_tokens

    space = describe(model)  # a model that prunes its visual tokens: the vision stage as it runs
    budget = visual_tokens.installed(model)
    # ... and each language layer sees (and caches) the prompt less the image tokens it no longer sees
    shed = {l.index: budget.shed_at("language", l.index) if budget else 0 for l in space.tower_layers("language")}
    fixed = space.fixed_flops
    vision = fixed.get("vision", 0.0) + sum(l.block_cost.flops(l.tokens) for l in space.tower_layers("vision"))
    language = space.tower_layers("language")
    head = 2.0 * model.lm_head.in_features * model.lm_head.out_features  # decoding ranks no tokens
    prefill = [vision + fixed.get("language", 0.0) + sum(l.block_cost.flops(t - shed[l.index]) for l in language)
               for t in prompt_tokens]
    decode = [head + sum(l.block_cost.decode_flops(t - shed[l.index], 1) for l in language) for t in prompt_tokens]
    return {"prefill": sum(prefill) / len(prefill), "decode_token": sum(decode) / len(decode)}


def _median_s(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def latency_ms(model, processor, samples, batch: int = LATENCY_BATCH, steps: int = 8) -> dict:
    """Median wall time per sample at `batch` prompts: a prefill (with its KV cache), and a decoded token
    (generate with 1 + steps tokens, less generate with 1, over steps)."""
    chosen = samples[:batch]
    inputs = words.encode(processor, chosen, train=False)
    inputs.pop("answers")
    inputs = {k: v.to(_device(model)) for k, v in inputs.items()}
    prefill = _median_s(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
    one, more = (_median_s(lambda k=k: model.generate(**inputs, generation_config=_generation_config(processor, k, k)))
                 for k in (1, 1 + steps))
    n = len(chosen)
    return {"prefill": prefill * 1000 / n, "decode_token": max(more - one, 0.0) / steps * 1000 / n, "batch": n}


def evaluate_generative(model, processor, split: str = "test", n: int = 200, seed: int = 0, batch_size: int = 32,
                        device: str | None = None, kinds: tuple[str, ...] = KINDS, latency: bool = True) -> dict:
    """n samples of each kind of `split` (instruct.eval_sets), answered greedily and scored (answers.score).

    device: where to run; the model is moved there (default: where it is). latency=False leaves the timing out.
    Returns {"metrics", "utility", "params", "flops", "latency_ms", "split", "samples"}; flops and latency
    per sample, under "prefill" and "decode_token"."""
    from ..backends import num_params

    if device is not None:
        model.to(device)
    samples, predictions = answer_all(model, processor, split, n, seed, batch_size, kinds)
    metrics = score(samples, predictions)
    prompt_tokens = words.prompt_lengths(processor, [s.question for s in samples])
    rep = {"metrics": metrics, "utility": utility_of(metrics), "params": num_params(model),
           "flops": costs(model, prompt_tokens), "split": split,
           "samples": {k: sum(s.kind == k for s in samples) for k in dict.fromkeys(s.kind for s in samples)}}
    if latency:
        rep["latency_ms"] = latency_ms(model, processor, samples)
    return rep


def answer_all(model, processor, split: str = "test", n: int = 200, seed: int = 0, batch_size: int = 32,
               kinds: tuple[str, ...] = KINDS) -> tuple[list, list[str]]:
    """The samples (n of each kind of `split`) and the model's greedy answers to them, in order."""
    _check_args(split, n, batch_size)
    kinds = check_kinds(kinds)
    check_pair(model, processor)
    sets = eval_sets(split, n, seed, words.image_side(processor), kinds)
    samples, predictions = [], []
    for kind, group in sets.items():
        limit = CAPTION_TOKENS if kind == "caption" else ANSWER_TOKENS
        predictions += generate(model, processor, [s.image for s in group],
                                [words.prompt(s.question) for s in group], limit, batch_size)
        samples += group
    return samples, predictions
