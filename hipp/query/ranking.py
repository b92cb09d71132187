"""Ranking a bound query's candidate plans: each runs hard-gated on calibration images, against the
same model ungated, and the lowest loss wins (hipp.query.bound, step 3). Calibration images are val
shape scenes (never trained or evaluated on) and Fashion-MNIST train images, the domains the utility
is measured on; the model computes where it lives and the losses are taken on the CPU. A generative
(LLaVA) model's candidates are ranked by how many of their greedy answers to validation instructions
differ from the ungated model's (answer_disagreement).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.gates import map_gates
from ..core.plan import Plan
from ..errors import HippError

if TYPE_CHECKING:
    from .bound import Base

CALIB_IMAGES = 128
# A generative model's candidates: greedy answers to this many validation instructions (30 of each kind)
# compared with the ungated model's. Chosen on validation over the objectives' loss terms (sum, scaled
# sum, either alone, on 256 instructions) and 100 instructions: docs/studies/bound-search-ranking.md.
CALIB_INSTRUCTIONS = 300
# What the ranking compares with the ungated model: "zero_shot", the class distributions over the shape
# attributes and Fashion-MNIST classes (what the utility metrics classify); "distillation", the caption
# similarities the controller trains on; "both", their sum (docs/studies/bound-search-ranking.md compares
# the three).
RANK_LOSSES = ("both", "zero_shot", "distillation")
RANK_BY = "both"


def input_size(preprocess_cfg: dict) -> int:
    size = preprocess_cfg["size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def calibration(base: Base, n: int = 32, seed: int = 0, fmnist: int = 0, fmnist_start: int = 0,
                split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images and caption tokens: `n` shape scenes from the val split (never trained or
    evaluated on; `split` "train" for a fit that the search's ranking must not see), plus up to `fmnist`
    Fashion-MNIST train images from `fmnist_start` on, with a class caption, when the dataset is
    installed (it is optional: compensation then runs on shapes alone)."""
    from ..data import shapes, to_input
    from ..data.fashion_mnist import CLASSES

    size = input_size(base.preprocess_cfg)
    scenes = shapes.make_scenes(split, n, seed=seed, image_size=size)
    images, texts = [scenes.images], list(scenes.captions)
    train = _fmnist_train(base, fmnist, fmnist_start) if fmnist else None
    if train is not None:
        images.append(train[0])
        texts += [f"a photo of a {CLASSES[int(y)]}." for y in train[1]]
    return to_input(torch.cat(images), base.preprocess_cfg), base.tokenizer(texts)


def _fmnist_train(base: Base, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`n` Fashion-MNIST train images from `start` on (uint8 RGB at model size) and their labels; None
    when the optional dataset is not installed."""
    from ..data.fashion_mnist import load_fashion_mnist, to_rgb
    try:
        raw, labels = load_fashion_mnist("train")
    except HippError:
        return None
    return to_rgb(raw[start:start + n], input_size(base.preprocess_cfg)), labels[start:start + n]


@torch.no_grad()
def utility_losses(base: Base, plans: list[Plan], calib) -> list[float]:
    """Utility loss of each plan's hard-gated model against the same model ungated (lower is better)."""
    from ..backends import clear_gates, hard_plan
    from ..training.objectives import Embeddings, utility_loss

    model = base.model
    device = next(model.parameters()).device
    images, tokens = (x.to(device) for x in calib)
    clear_gates(model)
    teacher = Embeddings(model.encode_image(images), model.encode_text(tokens))
    scale = model.logit_scale.exp()
    out = []
    for plan in plans:
        with hard_plan(model, plan):
            student = Embeddings(model.encode_image(images), model.encode_text(tokens))
        out.append(float(utility_loss(student, teacher, scale)))
    return out


def zero_shot_calibration(base: Base, n: int = 128, seed: int = 0, fmnist_start: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Preprocessed single-object val scenes and `n` Fashion-MNIST train images from `fmnist_start` on
    (None when the dataset is not installed): the kinds of images the zero-shot utility metrics classify."""
    from ..data import to_input
    from ..evaluation.evaluate import single_object_scenes

    scenes = to_input(single_object_scenes("val", n, base.preprocess_cfg, seed).images, base.preprocess_cfg)
    train = _fmnist_train(base, n, fmnist_start)
    return scenes, None if train is None else to_input(train[0], base.preprocess_cfg)


@torch.no_grad()
def zero_shot_losses(base: Base, plans: list[Plan], calib) -> list[float]:
    """Each plan's zero-shot loss: KL(ungated || hard-gated) of the class distributions over the shape
    attributes and the Fashion-MNIST classes on calibration images (from zero_shot_calibration),
    weighted as the utility weighs its metrics (the shape attributes share half)."""
    from ..backends import clear_gates, hard_plan
    from ..data.fashion_mnist import class_prompts
    from ..evaluation.evaluate import class_embeddings, shape_class_embeddings
    from ..training.objectives import kl_rows

    model, (scenes, fmnist) = base.model, calib
    device = next(model.parameters()).device
    scenes, fmnist = scenes.to(device), None if fmnist is None else fmnist.to(device)
    scale = model.logit_scale.exp().cpu()  # the class embeddings come back on the CPU (evaluate.embed_texts)
    share = 0.5 if fmnist is not None else 1.0  # of the weight that goes to the shape attributes
    tokenizer = _once_per_prompt_list(base.tokenizer)

    def logits(m) -> list[tuple[float, torch.Tensor]]:  # (weight, class logits) per zero-shot task
        img = torch.nn.functional.normalize(m.encode_image(scenes), dim=-1).cpu()
        attrs = shape_class_embeddings(m, tokenizer)
        out = [(share / len(attrs), scale * img @ c.T) for c in attrs.values()]
        if fmnist is not None:
            fm = torch.nn.functional.normalize(m.encode_image(fmnist), dim=-1).cpu()
            out.append((0.5, scale * fm @ class_embeddings(m, tokenizer, class_prompts()).T))
        return out

    clear_gates(model)
    teacher = logits(model)
    losses = []
    for plan in plans:
        with hard_plan(model, plan):
            student = logits(model)
        losses.append(sum(w * float(kl_rows(t, s)) for (w, t), (_, s) in zip(teacher, student)))
    return losses


@torch.no_grad()
def generative_terms(base: Base, plans: list[Plan], n: int, seed: int = 0) -> list[dict[str, float]]:
    """Each plan's answer-token KL ("utility") and yes / no margin loss on existence questions
    ("grounding"), the objectives a generative model trains on, against the ungated model on `n`
    validation instructions (every kind in turn: whatever the ranking rule, the rest of the utility
    must not move)."""
    from ..backends import image_size, visual_tokens
    from ..tasks import get_task
    from ..training.generative import GenerativeDistiller

    device = next(base.model.parameters()).device
    batch = get_task("instruct").calibration_batch(image_size(base.model), n, seed=seed)
    distiller = GenerativeDistiller(base.model, None, base.tokenizer, device)
    inputs = distiller.inputs(batch)
    teacher = distiller.teacher(inputs, batch)
    return [{k: float(v) for k, v in distiller.quality(map_gates(lambda t: t.float(), plan.gates), inputs, teacher,
                                                      visual_tokens.for_plan(plan)).items()}
            for plan in plans]


@torch.no_grad()
def _differing(base: Base, plans: list[Plan], n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(which instructions are yes / no (POPE) questions, per plan which of its greedy answers, hard-gated,
    differ from the ungated model's) on n validation instructions (n / kinds of each kind, at least one)."""
    from ..backends import clear_gates, hard_plan
    from ..data.instruct import KINDS, POPE_KINDS
    from ..evaluation.generative import answer_all
    from ..tasks.instruct import CALIBRATION_SPLIT

    per_kind = max(1, -(-n // len(KINDS)))
    ask = lambda model: answer_all(model, base.tokenizer, CALIBRATION_SPLIT, per_kind, seed)  # noqa: E731
    clear_gates(base.model)
    samples, teacher = ask(base.model)
    out = []
    for plan in plans:
        with hard_plan(base.model, plan):
            out.append(torch.tensor([a != b for a, b in zip(ask(base.model)[1], teacher)], dtype=torch.float64))
    return torch.tensor([s.kind in POPE_KINDS for s in samples]), out


def weighed(part: tuple[float, float], share: float) -> float:
    """share x (yes / no answers differing) + (1 - share) x (the others): a quality split read on answers,
    rounded so that candidates equal in exact arithmetic tie."""
    return round(share * part[0] + (1 - share) * part[1], 12)


def answer_differences(base: Base, plans: list[Plan], n: int, seed: int = 0) -> list[tuple[float, float]]:
    """Each plan's (share among the yes / no answers, share among the others) of its answers that differ
    from the ungated model's (_differing)."""
    return _parts(*_differing(base, plans, n, seed))


def _parts(pope: torch.Tensor, differing: list[torch.Tensor]) -> list[tuple[float, float]]:
    return [(float(d[pope].mean()), float(d[~pope].mean())) for d in differing]


def answer_disagreement(base: Base, plans: list[Plan], n: int, seed: int = 0,
                        existence_weight: float | None = None) -> list[float]:
    """Each plan's share of greedy answers, hard-gated, that differ from the ungated model's on n
    validation instructions (_differing): the utility and POPE metrics read answers, and the objectives'
    teacher-forced losses ranked candidates no better than chance there. With `existence_weight` e:
    e x the share among the yes / no (POPE) answers + (1 - e) x the share among the others, a quality
    split read on answers."""
    pope, differing = _differing(base, plans, n, seed)
    if existence_weight is None:
        return [float(d.mean()) for d in differing]
    return [weighed(part, existence_weight) for part in _parts(pope, differing)]


def _once_per_prompt_list(tokenizer):
    """Every candidate embeds the same class prompts; tokenising them again for each (a fifth of a
    ranking's time on the embedded teacher) changes nothing."""
    seen: dict[tuple, torch.Tensor] = {}

    def tokenize(texts):
        key = tuple(texts)
        if key not in seen:
            seen[key] = tokenizer(texts)
        return seen[key]
    return tokenize


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANK_LOSSES:
        raise HippError(f"unknown ranking {rank_by!r}; choose from {', '.join(RANK_LOSSES)}")


def rank_losses(base: Base, plans: list[Plan], rank_by: str = RANK_BY, calib_n: int = CALIB_IMAGES
                ) -> tuple[list[float], str]:
    """Each plan's ranking loss (one of RANK_LOSSES) on `calib_n` val shape scenes + as many
    Fashion-MNIST train images (the domains the utility is measured on), and what it was."""
    check_rank_by(rank_by)
    from ..storage.checkpoint import family
    if family(base.model) == "llava":
        return answer_disagreement(base, plans, calib_n), \
            f"greedy answers unlike the ungated model's on {calib_n} validation instructions (hard-gated)"
    parts, names = [], []
    if rank_by in ("zero_shot", "both"):
        calib = zero_shot_calibration(base, calib_n)
        parts.append(zero_shot_losses(base, plans, calib))
        names.append(f"zero-shot loss on {sum(len(x) for x in calib if x is not None)}")
    if rank_by in ("distillation", "both"):
        calib = calibration(base, calib_n, fmnist=calib_n)
        parts.append(utility_losses(base, plans, calib))
        names.append(f"caption distillation loss on {len(calib[0])}")
    return [sum(xs) for xs in zip(*parts)], " + ".join(names) + " calibration images (hard-gated vs ungated)"
