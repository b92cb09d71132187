"""Calibration data and the damage of a gated forward, for the data-driven baselines.

A calibration set is one small batch from a task (hipp.tasks): for the embedded task a mixed batch
(shape scenes with hard negatives + Fashion-MNIST) drawn with a seed of its own, so it overlaps
neither the controller's training batches nor the test scenes; for a CSV its held-out rows.
Damage is what the controller is trained against: the utility (similarity distillation) plus
grounding (hard-negative margin, when the batch has hard negatives) losses of the gated model vs
the same model with gates open, computed by the trainer's Distiller.

A generative (LLaVA) model's calibration set is a run of validation instructions of every kind, and
its damage is the generative distiller's: answer-token KL plus the yes/no margin lost on existence
questions (GenerativeDamage).

Ablation scores need hundreds of gated forwards; `Damage.ablate` runs many gate sets in one pass
(the batch repeated, one gate vector per sample), only through the tower being ablated (the other
tower's dense embeddings are reused) and, when the gate sets touch nothing before layer `start`,
from that layer's cached dense input on (the blocks before it stand aside as identities).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..backends import gated, image_size, tower_blocks
from ..data.mixed import Batch
from ..core.gates import Gates, map_gates
from ..backends.modules import DroppedBlock
from ..training.objectives import Embeddings, ObjectiveConfig, Objectives, answer_kl, decision_loss
from ..core.space import PruneSpace
from ..tasks import DEFAULT_TASK, Task, default_task, get_task
from ..training.trainer import Distiller

CALIBRATION_SEED = 7919  # the controller trains on seed + 1 of its config (1 by default)


@dataclass
class Calibration:
    """What a data-driven method may look at: one batch, and how to turn it into model inputs."""
    batch: Batch
    tokenizer: object
    preprocess_cfg: dict
    seed: int = CALIBRATION_SEED
    task: Task | None = None  # where the batch came from; gate training draws more batches from it

    def __post_init__(self):
        self.task = self.task or get_task(DEFAULT_TASK)

    @property
    def size(self) -> int:
        samples = getattr(self.batch, "samples", None)  # instructions; else image-caption pairs
        return len(samples if samples is not None else self.batch.captions)

    @property
    def generative(self) -> bool:
        return self.task.family == "generative"


def make_calibration(model, tokenizer, preprocess_cfg: dict, size: int = 64, seed: int = CALIBRATION_SEED,
                     shape_fraction: float = 0.5, negatives: int = 1, task: Task | None = None) -> Calibration:
    """At most `size` image-caption pairs of `task` (default the embedded one of the model's family:
    for a contrastive model `shape_fraction` of them shape scenes with `negatives` hard negatives
    each; for a LLaVA, instructions of every kind in turn; `tokenizer` is then its processor)."""
    from ..storage.checkpoint import family
    task = task or default_task(family(model))
    task.check_model(family(model))
    batch = task.calibration_batch(image_size(model), size, seed, shape_fraction=shape_fraction, negatives=negatives)
    return Calibration(batch, tokenizer, dict(preprocess_cfg), seed, task)


def make_damage(model, calibration: Calibration, space: PruneSpace):
    """The damage measure of the calibration's family: Damage or GenerativeDamage."""
    return (GenerativeDamage if calibration.generative else Damage)(model, calibration, space)


class Damage:
    """utility + grounding loss of gated forwards vs the dense model on a calibration batch."""

    def __init__(self, model, calibration: Calibration, space: PruneSpace):
        device = next(model.parameters()).device
        self.model, self.batch = model, calibration.batch
        names = ("utility", "grounding") if self.batch.negatives else ("utility",)
        self.objectives = Objectives(ObjectiveConfig(names=names), space)
        self.distiller = Distiller(model, self.objectives, calibration.tokenizer, calibration.preprocess_cfg, device)
        self.inputs = self.distiller.inputs(self.batch)
        self.teacher = self.distiller.teacher(self.inputs, self.batch)

    def _loss(self, img, txt, neg) -> float:
        n = self.batch.n_shapes
        t_img, t_txt, t_neg = self.teacher
        losses = self.objectives.losses(None, Embeddings(img, txt, neg), Embeddings(t_img, t_txt, t_neg),
                                        self.distiller.scale,
                                        (Embeddings(img[:n], txt[:n], neg), Embeddings(t_img[:n], t_txt[:n], t_neg)))
        return float(sum(losses.values()))

    @torch.no_grad()
    def __call__(self, gates: Gates | None = None) -> float:
        """Damage of one unbatched gate set on both towers (None: the dense model, ~0)."""
        if gates is None:
            return self._loss(*self.teacher)
        with gated(self.model, map_gates(lambda t: t.to(self.distiller.device, torch.float32), gates)):
            return self._loss(*self.distiller.encode(self.inputs, self.batch))

    def _tower_input(self, tower: str) -> torch.Tensor:
        images, tokens, neg_tokens = self.inputs
        if tower == "image":
            return images
        return tokens if neg_tokens is None else torch.cat([tokens, neg_tokens])

    @torch.no_grad()
    def _block_inputs(self, tower: str) -> list[torch.Tensor]:
        """The dense input of every block of `tower` on the calibration batch (cached)."""
        key = f"_inputs_{tower}"
        if not hasattr(self, key):
            blocks, seen = tower_blocks(self.model)[tower], []
            hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in blocks]
            try:
                self._encode(tower, self._tower_input(tower))
            finally:
                for h in hooks:
                    h.remove()
            setattr(self, key, seen)
        return getattr(self, key)

    def _encode(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        if tower == "image":
            return self.model.encode_image(x, normalize=True)
        return self.model.encode_text(x, normalize=True)

    @contextmanager
    def _from_layer(self, tower: str, start: int, state: torch.Tensor):
        """Blocks before `start` become identities and block `start` receives `state` instead."""
        blocks = tower_blocks(self.model)[tower]
        saved = [blocks[j] for j in range(start)]
        ref = blocks[start].mlp.fc_in.weight
        hook = blocks[start].register_forward_pre_hook(lambda m, args: (state, *args[1:]))
        try:
            for j in range(start):
                blocks[j] = DroppedBlock(ref.dtype, ref.device)
            yield
        finally:
            hook.remove()
            for j, b in enumerate(saved):
                blocks[j] = b

    @torch.no_grad()
    def ablate(self, tower: str, gate_sets: list[Gates], start: int = 0, max_batch: int = 512) -> torch.Tensor:
        """Damage of each unbatched gate set applied to `tower` alone (the other tower stays dense).

        `start`: index within the tower of the first layer any gate set changes; earlier layers are
        not recomputed (their dense outputs are cached).
        """
        x = self._tower_input(tower)
        per = x.shape[0]
        chunk = max(1, max_batch // per)
        b = self.inputs[1].shape[0]
        _, t_txt, t_neg = self.teacher
        state = self._block_inputs(tower)[start] if start > 0 else None  # before any gate is set
        out = []
        for first in range(0, len(gate_sets), chunk):
            sets = gate_sets[first:first + chunk]
            k = len(sets)
            # one gate vector per sample: set s gates samples s * per ... (s + 1) * per - 1
            rep = lambda ts: torch.stack([t.float() for t in ts]).repeat_interleave(per, 0).to(x.device)
            layer = rep([s[0] for s in sets])
            heads = [rep([s[1][i] for s in sets]) for i in range(len(sets[0][1]))]
            chans = [rep([s[2][i] for s in sets]) for i in range(len(sets[0][2]))]
            xs = x.repeat(k, *([1] * (x.dim() - 1)))
            with gated(self.model, (layer, heads, chans)):
                if state is not None:
                    with self._from_layer(tower, start, state.repeat(k, *([1] * (state.dim() - 1)))):
                        emb = self._encode(tower, xs)
                else:
                    emb = self._encode(tower, xs)
            for e in emb.view(k, per, -1):
                if tower == "image":
                    out.append(self._loss(e, t_txt, t_neg))
                else:
                    neg = e[b:].view(self.batch.n_shapes, self.batch.n_negatives, -1) if t_neg is not None else None
                    out.append(self._loss(self.teacher[0], e[:b], neg))
        return torch.tensor(out, dtype=torch.float64)


class GenerativeDamage:
    """answer-token KL + lost yes/no margin of gated forwards vs the dense model, on instructions.

    Same interface as Damage; `ablate` runs the whole model (both stages) on the batch repeated
    once per gate set, with none of Damage's cached-prefix shortcut: image features enter the
    decoder's sequence, so the language stage cannot be started from a cached layer input as
    cheaply, and at this size the whole forward is fast enough."""

    def __init__(self, model, calibration: Calibration, space: PruneSpace):
        from ..training.generative import GenerativeDistiller

        self.model, self.device = model, next(model.parameters()).device
        self.distiller = GenerativeDistiller(model, None, calibration.tokenizer, self.device)
        self.inputs = self.distiller.inputs(calibration.batch)
        self.teacher = self.distiller.teacher(self.inputs, calibration.batch)

    def _loss(self, answers: torch.Tensor, margins: torch.Tensor) -> float:
        t_answers, t_margins = self.teacher
        return float(answer_kl(t_answers, answers) + decision_loss(t_margins, margins))

    @torch.no_grad()
    def __call__(self, gates: Gates | None = None) -> float:
        if gates is None:
            return self._loss(*self.teacher)
        with gated(self.model, map_gates(lambda t: t.to(self.device, torch.float32), gates)):
            return self._loss(*self.distiller.forward(self.inputs))

    @torch.no_grad()
    def ablate(self, tower: str, gate_sets: list[Gates], start: int = 0, max_batch: int = 160) -> torch.Tensor:
        """Damage of each unbatched gate set (`tower` and `start` are Damage's; the whole model runs)."""
        enc, answer, rows, first = self.inputs
        per = answer.shape[0]
        n_answers, n_margins = (t.shape[0] for t in self.teacher)
        chunk = max(1, max_batch // per)
        out = []
        for lo in range(0, len(gate_sets), chunk):
            sets = gate_sets[lo:lo + chunk]
            k = len(sets)
            rep = lambda ts: torch.stack([t.float() for t in ts]).repeat_interleave(per, 0).to(self.device)
            gates = (rep([s[0] for s in sets]), [rep([s[1][i] for s in sets]) for i in range(len(sets[0][1]))],
                     [rep([s[2][i] for s in sets]) for i in range(len(sets[0][2]))])
            inputs = ({key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in enc.items()}, answer.repeat(k, 1),
                      torch.cat([rows + j * per for j in range(k)]), first.repeat(k))
            with gated(self.model, gates):
                answers, margins = self.distiller.forward(inputs)
            for j in range(k):  # copy j's answer positions and questions are consecutive
                out.append(self._loss(answers[j * n_answers:(j + 1) * n_answers],
                                      margins[j * n_margins:(j + 1) * n_margins]))
        return torch.tensor(out, dtype=torch.float64)
