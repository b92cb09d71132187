"""One recovery step per model family: what the export computes in one forward (wrapped in a module so
that Accelerate's data-parallel wrapper sees the pass and synchronises its gradients), what the frozen
base computes on the same batch, and the distillation loss between them.

contrastive (open_clip, CLIP, SigLIP): normalised image, caption and hard-negative embeddings; the
    loss is the controller's utility objective (KL of the similarity rows and columns plus 1 - cos of
    the embeddings) plus the grounding loss on the hard negatives where the batch has them.
generative (LLaVA): next-token distributions at the answer tokens of teacher-forced instruction
    samples, KL to the base's (the controller's utility objective), plus the share of the base's
    yes-minus-no margin lost on existence questions (its grounding objective).

Both reuse the training's own distillers and objectives, so recovery pulls toward exactly what the
controller was trained to keep.
"""
from __future__ import annotations

import torch

from ..storage.checkpoint import family, get_processor, get_tokenizer, preprocess_cfg
from ..training.objectives import Embeddings, answer_kl, decision_loss, grounding_loss, utility_loss
from ..training.trainer import Distiller


class Encoder(torch.nn.Module):
    """A CLIP-style model's normalised image, caption and hard-negative embeddings in one forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens, negatives=None):
        img = self.model.encode_image(images, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        neg = None if negatives is None else self.model.encode_text(negatives, normalize=True)
        return img, txt, neg


class Answers(torch.nn.Module):
    """A LLaVA's logits at the answer positions and yes-minus-no margins of existence questions."""

    def __init__(self, model, processor, device):
        super().__init__()
        from ..training.generative import GenerativeDistiller
        self.model = model
        self.reader = GenerativeDistiller(model, None, processor, device)  # holds no module of its own

    def forward(self, inputs):
        return self.reader.forward(inputs)


class ContrastiveStep:
    loss_name = "utility (similarity KL + cosine)"
    # the similarity scale (SigLIP: and bias) the loss never reads: distilled at the base's scale, its own stays
    frozen = ("logit_scale", "logit_bias")

    def __init__(self, cfg, student, teacher, export, device):
        self.cfg = cfg
        self.processor, self.pp = get_tokenizer(export), preprocess_cfg(student)
        self.module = Encoder(student)
        self.teacher = Distiller(teacher, None, self.processor, self.pp, device)

    def loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        inputs = self.teacher.inputs(batch)
        with torch.no_grad():
            t_img, t_txt, t_neg = self.teacher.encode(inputs, batch)
        s_img, s_txt, s_neg = module(*inputs)
        utility = utility_loss(Embeddings(s_img, s_txt), Embeddings(t_img, t_txt), self.teacher.scale,
                               cfg.cosine_weight)
        terms = {"utility": utility}
        if s_neg is not None and cfg.grounding_weight > 0:
            n = batch.n_shapes
            s_neg = s_neg.view(n, batch.n_negatives, -1)
            terms["grounding"] = grounding_loss(Embeddings(s_img[:n], s_txt[:n], s_neg),
                                                Embeddings(t_img[:n], t_txt[:n], t_neg), cfg.grounding_mode,
                                                logit_scale=self.teacher.scale)
        return _total(cfg, terms)


class GenerativeStep:
    loss_name = "utility (answer-token KL)"
    frozen = ()

    def __init__(self, cfg, student, teacher, export, device):
        from ..training.generative import GenerativeDistiller
        self.cfg = cfg
        self.processor, self.pp = get_processor(export), preprocess_cfg(student)
        self.module = Answers(student, self.processor, device)
        self.teacher = GenerativeDistiller(teacher, None, self.processor, device)

    def loss(self, module, batch) -> tuple[torch.Tensor, dict]:
        inputs = self.teacher.inputs(batch)
        with torch.no_grad():  # the base is a plain model here (no gates to clear)
            t_answers, t_margin = self.teacher.forward(inputs)
        # the export prunes its own visual tokens (if its plan has them): its forward maps the answer
        # positions onto its shorter prompt, as the hard-gated model's does in training
        s_answers, s_margin = module(inputs)
        terms = {"utility": answer_kl(t_answers, s_answers)}
        if self.cfg.grounding_weight > 0:
            terms["grounding"] = decision_loss(t_margin, s_margin)
        return _total(self.cfg, terms)


def _total(cfg, terms: dict) -> tuple[torch.Tensor, dict]:
    total = terms["utility"] + cfg.grounding_weight * terms.get("grounding", 0.0)
    return total, {k: float(v.detach()) for k, v in terms.items()}


def step_for(cfg, student, teacher, export, device):
    """The step of the export's model family."""
    return (GenerativeStep if family(student) == "llava" else ContrastiveStep)(cfg, student, teacher, export, device)
