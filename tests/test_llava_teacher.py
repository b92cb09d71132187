"""The committed LLaVA teacher: small fp16 files that load with transformers' own classes, a measured
subsample that agrees with its model card, and pruned copies of it that equal their hard-gated
originals (prefill logits and greedy generations, token for token, on 64 test prompts)."""
import math
import re

import pytest
import torch
import transformers

from hipp.backends import gated, make_prunable
from hipp.core.plan import Plan
from hipp.data import words
from hipp.data.instruct import KINDS, make_samples
from hipp.evaluation.generative import evaluate_generative
from hipp.export.slicing import materialize
from hipp.storage.checkpoint import get_processor, load_model

from conftest import LLAVA_TEACHER_DIR

CARD_SAMPLES, SUB_SAMPLES = 500, 60  # per kind: the card's test sets, and their first items measured here
TOKENS = 12  # greedy tokens compared per prompt: a caption's first objects, every one-word answer and its </s>


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


@pytest.fixture(scope="module")
def teacher():
    return load_model(LLAVA_TEACHER_DIR), get_processor(LLAVA_TEACHER_DIR)


def test_files_are_small_fp16_and_load_with_transformers_alone(teacher):
    model, processor = teacher
    weights = LLAVA_TEACHER_DIR / "model.safetensors"
    assert weights.stat().st_size <= 40 * 2**20
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(str(LLAVA_TEACHER_DIR), dtype=torch.float32)
    assert next(iter(theirs.parameters())).dtype == torch.float32
    auto = transformers.AutoProcessor.from_pretrained(str(LLAVA_TEACHER_DIR))
    assert isinstance(auto, transformers.LlavaProcessor) and auto.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    batch = words.encode(processor, make_samples("test", 4, seed=0), train=False)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.allclose(theirs(**batch).logits, model(**batch).logits, atol=1e-5)


def card_figures() -> dict[str, float]:
    card = (LLAVA_TEACHER_DIR / "MODEL_CARD.md").read_text()
    table = card[card.index("## Test metrics"):]
    return {k: float(v) for k, v in re.findall(r"^\| ([\w/]+) \| ([0-9.]+) \|$", table, re.M)}


def test_a_measured_subsample_agrees_with_the_model_card(teacher):
    """The card's accuracies and POPE F1s measured again on the first SUB_SAMPLES items of each of its
    test sets: within three binomial standard errors (F1 and caption recall are treated as
    proportions of the subsample, a loose but fair bound for means of per-item scores)."""
    model, processor = teacher
    card = card_figures()
    now = evaluate_generative(model, processor, split="test", n=SUB_SAMPLES, latency=False)["metrics"]
    checked = [k for k in card if k.endswith(("_f1", "/acc")) or k.startswith("attr/") or k == "caption/recall"]
    assert len(checked) == 11  # five attributes and their mean, three POPE F1s, caption recall, Fashion-MNIST
    for k in checked:
        p = card[k]
        allowed = 3 * math.sqrt(max(p * (1 - p), 1 / CARD_SAMPLES) / SUB_SAMPLES)
        assert abs(now[k] - p) <= allowed, (k, now[k], p, allowed)


def _plans(space) -> dict:
    """The six plans of the equivalence check, as gate triples over both stages."""
    n = len(space.layers)
    heads = [torch.ones(l.num_heads) for l in space.layers]
    chans = [torch.ones(l.num_channel_gates) for l in space.layers]
    first = {t: next(i for i, l in enumerate(space.layers) if l.tower == t) for t in space.stages}
    g = torch.Generator().manual_seed(0)
    partial_h = [h.clone() for h in heads]
    for i, h in enumerate(partial_h):
        h[i % len(h)] = 0  # one attention unit (a head, or a key/value group with its queries) per layer
    partial_c = [(torch.rand(len(c), generator=g) > 0.4).float() for c in chans]
    dropped = torch.ones(n)
    dropped[first["language"]] = dropped[first["vision"] + 1] = 0
    odd = [float(l.index % 2) for l in space.layers]
    return {
        "dense": (torch.ones(n), heads, chans),
        "partial": (torch.ones(n), partial_h, partial_c),
        "dropped_layers": (dropped, heads, chans),
        "emptied_attention": (torch.ones(n), [h * o for h, o in zip(heads, odd)], chans),
        "emptied_mlp": (torch.ones(n), heads, [c * o for c, o in zip(chans, odd)]),
        "all_at_once": (dropped, partial_h, [c * (1 - o) if l.tower == "vision" else c
                                             for c, o, l in zip(partial_c, odd, space.layers)]),
    }


@pytest.fixture(scope="module")
def prunable():
    model = load_model(LLAVA_TEACHER_DIR)
    space = make_prunable(model, channel_group=8)
    processor = get_processor(LLAVA_TEACHER_DIR)
    samples = make_samples("test", 64, seed=0, kinds=KINDS)
    batch = words.encode(processor, samples, train=False)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        dense = model(**batch).logits
    return model, space, processor, batch, dense


@pytest.mark.parametrize("name", ["dense", "partial", "dropped_layers", "emptied_attention", "emptied_mlp",
                                  "all_at_once"])
def test_a_materialised_teacher_equals_its_hard_gated_self(prunable, name):
    model, space, processor, batch, dense = prunable
    plan = Plan.from_gates(space, _plans(space)[name], preference={"utility": 1.0})
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                                           pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad(), gated(model, plan.gates):
        hard = model(**batch).logits  # every prefill position
        hard_tokens = model.generate(**batch, generation_config=config)
    small = materialize(model, plan)
    with torch.no_grad():
        assert (small(**batch).logits - hard).abs().max() <= 1e-4
        assert torch.equal(small.generate(**batch, generation_config=config), hard_tokens)
    if name != "dense":  # the plan changes the function, so the equality above is not trivially true
        assert (hard - dense).abs().max() > 1e-2
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
