"""The committed teacher: loads, and measures what its model card says (on a subsample), and still
clears the bars it was built for."""
import math
import re

import open_clip
import pytest
import torch

from hipp import get_tokenizer, load_model
from hipp.data import shapes
from hipp.storage.checkpoint import WEIGHTS_NAME, preprocess_cfg
from hipp.evaluation.evaluate import embed_images, embed_texts, evaluate, recall_at

from conftest import TEACHER_DIR

# Regression floors a little under what the committed checkpoint measures (see its model card).
FLOORS = {"shapes/zs_mean": 0.87, "shapes/ground_mean": 0.87, "fmnist/acc": 0.85}
# What the card's figures are measured on (its "Measured" section) and the subsample measured here.
CARD_SHAPES, CARD_FMNIST = 1000, 10_000
SUB_SHAPES, SUB_FMNIST = 400, 2000


@pytest.fixture(scope="module")
def teacher():
    return load_model(TEACHER_DIR)


def test_checkpoint_is_small_fp16_and_open_clip_readable(teacher):
    assert (TEACHER_DIR / WEIGHTS_NAME).stat().st_size <= 40 * 2**20
    theirs = open_clip.create_model(f"local-dir:{TEACHER_DIR}").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(theirs.encode_image(x), teacher.encode_image(x), atol=1e-5)


def card_figures() -> dict[str, float]:
    card = (TEACHER_DIR / "MODEL_CARD.md").read_text()
    measured = card[card.index("## Measured"):]
    return {k: float(v) for k, v in re.findall(r"^\| (\w+/\w+) \| ([0-9.]+) \|$", measured, re.M)}


def tolerance(p: float, n: int, population: int) -> float:
    """Three binomial standard errors of a proportion measured on n items, at the card's p; a p of 0
    or 1 is taken as one item in the card's population away, so that a single flip is allowed."""
    return 3 * math.sqrt(max(p * (1 - p), 1 / population) / n)


def test_a_measured_subsample_agrees_with_the_model_card(teacher):
    """Every figure of the card measured again on the first items of the card's own test sets. Per-item
    metrics are proportions over those items; retrieval ranks a subsample of queries among all the
    card's candidates (a smaller gallery would make it easier); a mean of metrics is allowed the mean
    of its parts' tolerances (its standard error is at most that)."""
    tokenizer, pp = get_tokenizer(TEACHER_DIR), preprocess_cfg(teacher)
    card = card_figures()
    now = evaluate(teacher, tokenizer, pp, n=SUB_SHAPES, fmnist_limit=SUB_FMNIST)
    size = pp["size"][0] if isinstance(pp["size"], (list, tuple)) else pp["size"]
    pairs = shapes.make_scenes("test", CARD_SHAPES, seed=0, image_size=size)  # the pairs evaluate measures
    img, txt = embed_images(teacher, pairs.images, pp), embed_texts(teacher, tokenizer, pairs.captions)
    same = torch.tensor([[a == b for b in pairs.captions] for a in pairs.captions[:SUB_SHAPES]])
    for k in (1, 5):
        now[f"shapes/i2t_r{k}"] = recall_at(img[:SUB_SHAPES] @ txt.T, same, k)
        now[f"shapes/t2i_r{k}"] = recall_at(txt[:SUB_SHAPES] @ img.T, same, k)
    # metrics added after the card was written (held-out prompts) are the only ones it may lack
    assert set(now) - set(card) <= {"shapes/zs_heldout_prompts", "fmnist/acc_heldout_prompts"}
    assert set(card) <= set(now)
    now = {k: now[k] for k in card}

    tol = {"fmnist/acc": tolerance(card["fmnist/acc"], SUB_FMNIST, CARD_FMNIST)}
    for name in card:
        kind = name.removeprefix("shapes/ground_")
        if kind in shapes.NEGATIVE_TYPES:  # over the pairs that have this kind of negative
            has = [kind in negs for negs in pairs.negatives]
            tol[name] = tolerance(card[name], sum(has[:SUB_SHAPES]), sum(has))
        elif name.startswith("shapes/") and not name.endswith("_mean"):
            tol[name] = tolerance(card[name], SUB_SHAPES, CARD_SHAPES)
    for name, parts in (("shapes/zs_mean", shapes.ATTRIBUTES), ("shapes/ground_mean", shapes.NEGATIVE_TYPES)):
        prefix = name.removesuffix("mean")
        tol[name] = sum(tol[prefix + p] for p in parts) / len(parts)
    off = {k: (round(now[k], 4), card[k], round(tol[k], 4)) for k in card if abs(now[k] - card[k]) > tol[k]}
    assert not off, f"measured, card, tolerance: {off}"
    low = {k: now[k] for k, floor in FLOORS.items() if now[k] < floor}
    assert not low, low
