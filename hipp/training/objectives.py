"""Objectives and their scalarisation. Functions take plain tensors, never models.

Every loss is 0 at the teacher (utility, grounding) or 1 at the dense model (costs), and O(1)
when things go badly, so preference weights compare like with like:

- utility   = (KL_i2t + KL_t2i) / (2 log B)  +  mean(1 - cos) over image and text embeddings.
              KL(teacher || student) of the softmax over each similarity row / column at the
              model's logit scale; dividing by log B (the entropy of a uniform row) keeps it
              independent of batch size. 1 - cos lies in [0, 2].
- grounding = the share of the teacher's true-vs-hard-negative margins the student loses:
              hinge:   sum relu(m_t - m_s) / sum |m_t|      (exceeding the teacher costs nothing)
              squared: mean (m_s - m_t)^2 / mean m_t^2      (any deviation costs)
              odds:    mean KL(Bernoulli(p_t) || Bernoulli(p_s)) / log 2, p = sigmoid(scale * m): the
                       teacher's odds of the true caption against each negative, at the logit scale;
                       every pair weighs alike, so the close calls (one colour changed) count as
                       much as the easy ones (an absent object), unlike the sums above
              with m = cos(image, true caption) - cos(image, negative caption).
Generative (LLaVA-style) models, on teacher-forced instruction samples:

- utility   = KL(teacher || student) of the next-token distributions at the answer tokens,
              averaged over them and divided by log V (the entropy of a uniform distribution
              over the vocabulary), as the contrastive KL is divided by log B. With
              utility_existence false, existence answers are left to grounding.
- grounding = agreement with the teacher's yes / no on existence (POPE) questions, margin kept:
              m = logit(yes) - logit(no) at the answer's first token, d = sign(m_t),
              sum relu(|m_t| - d m_s) / sum |m_t|: 0 when the student says what the teacher
              says at least as firmly, 1 when it is undecided, above 1 when it flips.
              With existence_margin "every-token", m is instead the log-odds of the teacher's
              answer (yes or no) against every other token, z_d - logsumexp of the rest, and the
              loss sum relu(m_t - m_s) / sum |m_t|: the yes-minus-no margin can be kept while
              some third token takes the answer (a plan trained on grounding alone then answers
              nothing), these log-odds cannot.
              grounding_mode reads these margins as for the contrastive model: hinge (above),
              squared, or odds: mean KL(Bernoulli(sigmoid(m_t)) || Bernoulli(sigmoid(m_s))) / log 2,
              every question alike; the hinge's gradient is the same on every question below the
              teacher's margin, so it spends as much on a firm answer losing part of a large margin
              (which changes no answer) as on a close call about to flip; the odds' gradient
              sigmoid(m_s) - sigmoid(m_t) is spent near the decision. balanced: the hinge over the
              teacher's yes answers and over its no answers, averaged (its no margins are the
              larger, so the plain hinge is mostly theirs). On the LLaVA polish neither odds nor
              balanced kept more of the teacher's yes answers than the hinge
              (docs/studies/llava-controller-recipe.md, "What the grounding weight buys at 0.4").
- flops / params = expected cost of the gates (from keep-probabilities) over both towers,
              divided by the dense model's: 1.0 with all gates open, never below the share of
              fixed (non-prunable) costs.
- latency   = the same for the predicted latency of a measured profile (hipp/core/latency.py),
              each layer priced at its expected unit and channel counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..errors import HippError
from ..core.gates import Gates
from ..core.preference import COSTS, DEFAULT_OBJECTIVES
from ..core.space import PruneSpace

KNOWN = ("utility", "grounding", "flops", "params", "latency")
SCALARIZATIONS = ("linear", "chebyshev")
CONTRASTIVE_GROUNDING_MODES = ("hinge", "squared", "odds")
GROUNDING_MODES = CONTRASTIVE_GROUNDING_MODES + ("balanced",)  # balanced: generative models only
EXISTENCE_MARGINS = ("yes-no", "every-token")


@dataclass
class Embeddings:
    """One tower pass over a batch: image [B, D], text [B, D] (the true captions, row i matches
    image i) and optionally negatives [B, D] or [B, N, D] (hard-negative captions of image i)."""
    image: torch.Tensor
    text: torch.Tensor
    negatives: torch.Tensor | None = None


# --- utility -------------------------------------------------------------------------------

def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student))."""
    t = F.log_softmax(teacher_logits, dim=-1)
    s = F.log_softmax(student_logits, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def utility_terms(student: Embeddings, teacher: Embeddings, logit_scale) -> dict[str, torch.Tensor]:
    """The parts of the utility loss, for logging: kl_i2t, kl_t2i (both / log B) and cosine."""
    si, st = F.normalize(student.image, dim=-1), F.normalize(student.text, dim=-1)
    ti, tt = F.normalize(teacher.image.detach(), dim=-1), F.normalize(teacher.text.detach(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=si.dtype, device=si.device).detach()
    s_logits, t_logits = scale * si @ st.T, scale * ti @ tt.T
    norm = math.log(max(si.shape[0], 2))
    cosine = 0.5 * ((1 - (si * ti).sum(-1)).mean() + (1 - (st * tt).sum(-1)).mean())
    return {"kl_i2t": kl_rows(t_logits, s_logits) / norm,
            "kl_t2i": kl_rows(t_logits.T, s_logits.T) / norm,
            "cosine": cosine}


def utility_loss(student: Embeddings, teacher: Embeddings, logit_scale, cosine_weight: float = 1.0) -> torch.Tensor:
    """Distil the teacher's similarity distribution both ways and keep embeddings aligned."""
    t = utility_terms(student, teacher, logit_scale)
    return 0.5 * (t["kl_i2t"] + t["kl_t2i"]) + cosine_weight * t["cosine"]


# --- grounding ------------------------------------------------------------------------------

def margins(e: Embeddings) -> torch.Tensor:
    """cos(image, true caption) - cos(image, each negative): [B] or [B, N]."""
    if e.negatives is None:
        raise HippError("the grounding objective needs hard-negative captions; this data provides none")
    img, txt, neg = (F.normalize(x, dim=-1) for x in (e.image, e.text, e.negatives))
    pos = (img * txt).sum(-1)
    if neg.dim() == 3:
        return pos.unsqueeze(-1) - torch.einsum("bd,bnd->bn", img, neg)
    return pos - (img * neg).sum(-1)


def odds_kl(zt: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Mean KL(Bernoulli(sigmoid(zt)) || Bernoulli(sigmoid(zs))) / log 2 over log-odds zt (teacher), zs."""
    pt = torch.sigmoid(zt)
    # pt (log pt - log ps) + (1 - pt)(log(1 - pt) - log(1 - ps)), from the logits for stability
    kl = pt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
    return kl.mean() / math.log(2)


def grounding_loss(student: Embeddings, teacher: Embeddings, mode: str = "hinge", eps: float = 1e-6,
                   logit_scale=None) -> torch.Tensor:
    """Keep the teacher's true-vs-hard-negative margins (see module doc for the modes; odds needs the
    model's logit scale)."""
    ms = margins(student)
    mt = margins(Embeddings(teacher.image.detach(), teacher.text.detach(),
                            None if teacher.negatives is None else teacher.negatives.detach()))
    if mode == "hinge":
        return torch.relu(mt - ms).sum() / (mt.abs().sum() + eps)
    if mode == "squared":
        return (ms - mt).pow(2).mean() / (mt.pow(2).mean() + eps)
    if mode == "balanced":
        raise HippError("grounding mode 'balanced' weighs a generative model's yes and no answers alike; "
                        "a contrastive model's margins have no such sides (use hinge, squared or odds)")
    if mode == "odds":
        if logit_scale is None:
            raise HippError("the odds grounding loss needs the model's logit scale")
        return odds_kl(logit_scale * mt, logit_scale * ms)
    raise HippError(f"unknown grounding mode {mode!r}; expected one of {', '.join(GROUNDING_MODES)}")


# --- generative ------------------------------------------------------------------------------

def answer_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """[T, V] logits at the T answer positions of a batch -> mean KL(teacher || student) / log V."""
    norm = math.log(max(teacher_logits.shape[-1], 2))
    return kl_rows(teacher_logits.detach().float(), student_logits.float()) / norm


def decision_loss(teacher_margin: torch.Tensor, student_margin: torch.Tensor, mode: str = "hinge",
                  eps: float = 1e-6) -> torch.Tensor:
    """[P] yes-minus-no margins of the P existence questions, or [P, 2] log-odds of yes and of no
    against every other token -> what the student loses of the teacher's decisions, read by `mode`
    (module doc); 0 for a batch without such questions."""
    mt, ms = teacher_margin.detach().float(), student_margin.float()
    if mt.numel() == 0:
        return student_margin.sum() * 0.0
    side, yes = torch.sign(mt), mt > 0  # yes minus no: the teacher's answer is the margin's sign
    if mt.ndim == 2:  # the teacher's answer's log-odds, for both: higher is always its side
        decided = (mt[:, 1] > mt[:, 0]).long()[:, None]
        mt, ms = mt.gather(1, decided)[:, 0], ms.gather(1, decided)[:, 0]
        side, yes = torch.ones_like(mt), decided[:, 0] == 0
    lost = torch.relu(side * (mt - ms))  # exceeding the teacher on its side costs nothing
    if mode == "hinge":
        return lost.sum() / (mt.abs().sum() + eps)
    if mode == "balanced":
        return torch.stack([lost[m].sum() / (mt[m].abs().sum() + eps) for m in (yes, ~yes) if m.any()]).mean()
    if mode == "squared":
        return (ms - mt).pow(2).mean() / (mt.pow(2).mean() + eps)
    if mode == "odds":
        return odds_kl(mt, ms)
    raise HippError(f"unknown grounding mode {mode!r}; expected one of {', '.join(GROUNDING_MODES)}")


# --- costs ----------------------------------------------------------------------------------

def expected_cost_ratios(space: PruneSpace, probs: Gates, token_keep=None) -> dict[str, torch.Tensor]:
    """Expected FLOPs / params over every stage as a fraction of dense, from *uncoupled*
    keep-probabilities (PruneSpace.costs applies the hierarchy) and expected kept token counts
    (None: every token). Also per stage ("flops/<stage>")."""
    got = space.costs(*probs, token_keep)
    dense = space.dense_costs()
    out = {}
    for kind in ("flops", "params"):
        total = sum(got[f"{kind}/{t}"] for t in space.stages)
        out[kind] = total / sum(dense[f"{kind}/{t}"] for t in space.stages)
        for t in space.stages:
            if dense[f"{kind}/{t}"]:
                out[f"{kind}/{t}"] = got[f"{kind}/{t}"] / dense[f"{kind}/{t}"]
    return out


# --- scalarisation --------------------------------------------------------------------------

def linear_scalarize(losses: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """sum_k p_k L_k over the last dim. Reaches only the convex part of a Pareto front."""
    return (pref * losses).sum(-1)


def chebyshev_scalarize(losses: torch.Tensor, pref: torch.Tensor, ideal=0.0, scale=1.0,
                        smooth: float = 0.0, rho: float = 0.0) -> torch.Tensor:
    """max_k p_k (L_k - z_k) / s_k (+ rho * their sum). Reaches non-convex front parts too.

    Only the worst weighted objective gets gradient; `smooth` > 0 replaces the max by
    smooth * logsumexp(x / smooth) (an upper bound within smooth * log K) so gradient reaches all
    terms, and `rho` > 0 adds the augmented term that rules out weakly optimal points.
    """
    x = pref * (losses - ideal) / scale
    top = smooth * torch.logsumexp(x / smooth, dim=-1) if smooth > 0 else x.max(-1).values
    return top + rho * x.sum(-1) if rho else top


@dataclass
class ObjectiveConfig:
    names: tuple = DEFAULT_OBJECTIVES
    scalarization: str = "linear"
    grounding_mode: str = "hinge"
    cosine_weight: float = 1.0
    ideal: dict = field(default_factory=dict)   # Chebyshev reference point z_k (default 0)
    scale: dict = field(default_factory=dict)   # normaliser s_k of each loss (default 1), either scalarization
    smooth: float = 0.0
    rho: float = 0.0
    utility_existence: bool = True  # generative: the answer KL also covers existence (POPE) answers
    existence_margin: str = "yes-no"  # generative grounding: yes against no, or the answer against every token
    # meant to give a preference that pays nothing for cost the dense model: the scalarised loss rewards
    # kept cost (the mean cost ratio) by keep_reward x the preference's quality weight to keep_reward_power
    # (docs/studies/llava-controller-recipe.md)
    keep_reward: float = 0.0
    # the reward goes as the quality weight to this power: a high power keeps it to near-quality-only
    # preferences, so that preferences which do pay for cost are left as they were
    keep_reward_power: float = 1.0

    def __post_init__(self):
        self.names = tuple(self.names)
        unknown = [n for n in self.names if n not in KNOWN]
        if unknown or not self.names or len(set(self.names)) != len(self.names):
            raise HippError(f"objective names must be distinct and among {', '.join(KNOWN)}; got {list(self.names)}")
        if self.scalarization not in SCALARIZATIONS:
            raise HippError(f"unknown scalarization {self.scalarization!r}; expected one of {', '.join(SCALARIZATIONS)}")
        if self.grounding_mode not in GROUNDING_MODES:
            raise HippError(f"unknown grounding mode {self.grounding_mode!r}; expected one of {', '.join(GROUNDING_MODES)}")
        for what in ("ideal", "scale"):
            extra = [k for k in getattr(self, what) if k not in self.names]
            if extra:
                raise HippError(f"objectives.{what} names {extra[0]!r}, which is not an objective in use")
        try:
            bad = any(not float(v) > 0 for v in self.scale.values()) or \
                any(not math.isfinite(float(v)) for v in self.ideal.values())
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise HippError("objectives.scale values must be numbers > 0 and objectives.ideal values finite numbers")
        if self.smooth < 0 or self.rho < 0:
            raise HippError("objectives.smooth and objectives.rho must be >= 0")
        if not isinstance(self.utility_existence, bool):
            raise HippError(f"objectives.utility_existence must be true or false, got {self.utility_existence!r}")
        for name, ok, span in (("keep_reward", lambda v: 0 <= v < 1, "[0, 1)"),
                               ("keep_reward_power", lambda v: 1 <= v <= 64, "[1, 64]")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise HippError(f"objectives.{name} must be a number in {span}, got {v!r}")
        if self.keep_reward and not any(n in COSTS for n in self.names):
            raise HippError("objectives.keep_reward rewards kept cost: it needs a cost objective (flops, params, latency)")
        if self.existence_margin not in EXISTENCE_MARGINS:
            raise HippError(f"unknown objectives.existence_margin {self.existence_margin!r}; expected one of "
                            f"{', '.join(EXISTENCE_MARGINS)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "ObjectiveConfig":
        d = dict(d or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise HippError(f"unknown objectives setting {unknown[0]!r}; expected some of {', '.join(sorted(allowed))}")
        return cls(**d)


class Objectives:
    """Computes the configured losses and scalarises them under a preference (same name order)."""

    def __init__(self, config: ObjectiveConfig, space: PruneSpace, latency=None):
        if ("latency" in config.names) != (latency is not None):
            raise HippError("the latency objective and a latency profile go together (latency_profile in the config)")
        if latency is not None and space.tokens:
            raise HippError("a latency profile does not price visual tokens yet; train visual tokens with FLOPs")
        self.config, self.space, self.latency = config, space, latency

    @property
    def names(self) -> tuple:
        return self.config.names

    def losses(self, probs: Gates, student: Embeddings | None = None, teacher: Embeddings | None = None,
               logit_scale=None, grounding: tuple[Embeddings, Embeddings] | None = None) -> dict[str, torch.Tensor]:
        """`grounding` = (student, teacher) views carrying negatives, when only part of the batch has them."""
        c, out = self.config, {}
        if "utility" in c.names or "grounding" in c.names:
            if student is None or teacher is None:
                raise HippError("utility and grounding objectives need student and teacher embeddings")
        if "utility" in c.names:
            if logit_scale is None:
                raise HippError("the utility objective needs the model's logit scale")
            out["utility"] = utility_loss(student, teacher, logit_scale, c.cosine_weight)
        if "grounding" in c.names:
            out["grounding"] = grounding_loss(*(grounding or (student, teacher)), mode=c.grounding_mode,
                                              logit_scale=logit_scale)
        return {**out, **self.costs(probs)}

    def costs(self, probs: Gates, token_keep=None) -> dict[str, torch.Tensor]:
        """The cost objectives in use, as expected ratios of the dense model's (`token_keep`: expected
        kept counts per token level, None: every token)."""
        wanted = [k for k in ("flops", "params") if k in self.config.names]
        out = {}
        if wanted:
            ratios = expected_cost_ratios(self.space, probs, token_keep)
            out = {k: ratios[k] for k in wanted}
        if self.latency is not None:
            out["latency"] = self.latency.ratios(*probs)["latency"]
        return out

    def stack(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """[..., K] in name order (costs may carry a preference batch; scalars broadcast)."""
        parts = [torch.as_tensor(losses[n]) for n in self.names]
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return torch.stack(torch.broadcast_tensors(*(p.to(dtype) for p in parts)), dim=-1)

    def scalarize(self, losses: dict[str, torch.Tensor], pref: torch.Tensor) -> torch.Tensor:
        x = self.stack(losses)
        pref = pref.to(x)
        scale = torch.tensor([float(self.config.scale.get(n, 1.0)) for n in self.names]).to(x)
        if self.config.scalarization == "linear":
            out = linear_scalarize(x / scale, pref)
        else:
            ideal = torch.tensor([float(self.config.ideal.get(n, 0.0)) for n in self.names]).to(x)
            out = chebyshev_scalarize(x, pref, ideal, scale, self.config.smooth, self.config.rho)
        if not self.config.keep_reward:
            return out
        cost = torch.tensor([n in COSTS for n in self.names], device=x.device)
        quality = pref[..., ~cost].sum(-1) ** self.config.keep_reward_power
        return out - self.config.keep_reward * quality * x[..., cost].mean(-1)
