"""The student-vs-teacher computation of one step for a generative (LLaVA-style) model.

The teacher is the same frozen model with its gates open. Both read the same teacher-forced
instruction samples (prompt, image, answer); what is compared is the next-token distribution at
the answer tokens (utility; with objectives.utility_existence false, not those of existence
questions) and the yes-minus-no margin at the first answer token of existence questions
(grounding; with objectives.existence_margin "every-token", the log-odds of yes and of no against
every other token). Same interface as trainer.Distiller, so the training loop, its checks and the
benchmarks take either.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..backends import clear_gates, decoder_tokens, gated, visual_tokens
from ..core import token_gates
from ..core.gates import keep_prob, map_gates
from ..data.instruct import POPE_KINDS
from ..data.words import IGNORE, encode
from ..errors import HippError
from .objectives import Objectives, answer_kl, decision_loss


def answer_token(processor, word: str) -> int:
    """The id of a one-token answer word, as it follows the prompt."""
    ids = processor.tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise HippError(f"the tokenizer splits the answer {word!r} into {len(ids)} tokens; the grounding "
                        "objective reads one yes and one no token")
    return ids[0]


class GenerativeDistiller:
    def __init__(self, model, objectives: Objectives | None, processor, device):
        self.model, self.objectives, self.processor, self.device = model, objectives, processor, device
        self.yes, self.no = answer_token(processor, "yes"), answer_token(processor, "no")
        self.grounding_mode = "hinge" if objectives is None else objectives.config.grounding_mode

    def inputs(self, batch) -> tuple:
        """Model inputs of the batch's samples, the answer positions ([B, L-1] bool over the logits
        that predict an answer token) and, for each existence question, its row and first answer
        position."""
        enc = encode(self.processor, batch.samples, train=True)
        answer = enc.pop("labels")[:, 1:] != IGNORE
        rows = torch.tensor([i for i, s in enumerate(batch.samples) if s.kind in POPE_KINDS], dtype=torch.long)
        first = answer.float().argmax(1)[rows]  # left padding: each row's answer is its last tokens
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return enc, answer.to(self.device), rows.to(self.device), first.to(self.device)

    def forward(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the answer positions [T, V] and the existence questions' yes-minus-no margins [P]."""
        enc, answer, rows, first = inputs
        budget = visual_tokens.installed(self.model)
        if budget is not None and budget.after < 0:  # the prompt loses pruned image tokens: their columns leave
            # the answer mask (pruned inside the language model, logits keep the prompt's length)
            keep = visual_tokens.kept_columns(self.model, enc["input_ids"], budget)
            answer = torch.nn.functional.pad(answer, (0, 1))[keep].reshape(len(keep), -1)[:, :-1]
            first = answer.float().argmax(1)[rows]
        logits = self.model(**enc, use_cache=False).logits[:, :-1]
        at = logits[rows, first]
        if self.objectives is not None and not self.objectives.config.utility_existence:
            answer = answer.clone()
            answer[rows] = False  # the yes / no answers are grounding's alone
        if self.objectives is not None and self.objectives.config.existence_margin == "every-token":
            pair = at[:, [self.yes, self.no]]
            rest = torch.stack([at.index_fill(1, torch.tensor([t], device=at.device), -math.inf).logsumexp(1)
                                for t in (self.yes, self.no)], 1)
            return logits[answer], pair - rest  # [P, 2]: log-odds of yes, of no, against every other token
        return logits[answer], at[:, self.yes] - at[:, self.no]

    @torch.no_grad()
    def teacher(self, inputs, batch) -> tuple:
        clear_gates(self.model)
        return self.forward(inputs)

    def quality(self, gates, inputs, teacher: tuple, tokens=None, chunks=None) -> dict[str, torch.Tensor]:
        """Utility and grounding losses of the model under `gates` (and a visual-token budget, None:
        every token; or a controller's kept chunks [G] of the space's token level) against the teacher's outputs."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(gated(self.model, gates))
            stack.enter_context(visual_tokens.pruning(self.model, tokens))
            if chunks is not None:
                enc = inputs[0]
                stack.enter_context(decoder_tokens.weighing(self.model, self.objectives.space.tokens[0], chunks,
                                                            enc["input_ids"], enc.get("attention_mask")))
            s_answers, s_margin = self.forward(inputs)
        t_answers, t_margin = teacher
        return {"utility": answer_kl(t_answers, s_answers), "grounding": decision_loss(t_margin, s_margin, self.grounding_mode)}

    def losses(self, logits, gates, inputs, teacher: tuple, batch, tokens=None) -> dict[str, torch.Tensor]:
        """Objectives of the student under `gates` (and `tokens`: the token level's chunk logits and kept
        chunks, from Controller(..., with_tokens=True)); expected costs from the keep-probabilities."""
        chunk_logits, chunks = tokens if tokens else (None, None)
        if chunks is not None and len(chunks) != 1:
            raise HippError("a LLaVA trains one visual-token level, the language model's")
        quality = self.quality(gates, inputs, teacher, chunks=None if chunks is None else chunks[0])
        quality = {k: v for k, v in quality.items() if k in self.objectives.names}
        counts = None if chunks is None else torch.stack(
            [token_gates.kept_count(keep_prob(c), level.tokens) for c, level in zip(chunk_logits, self.objectives.space.tokens)], -1)
        return {**quality, **self.objectives.costs(map_gates(keep_prob, logits), counts)}
