"""Gate mathematics of a token level, the controller's fourth member beside (layer, heads, channels).

A level's `tokens` ranked tokens are cut into STEPS chunks of nearly equal size (best-ranked first).
The first chunk always stays; chunk c >= 1 has a logit l_c, and the logits fall with c:

    l_1 = r_1,   l_c = l_{c-1} - softplus(r_c)

from the controller's raw outputs r. One logistic noise u per level and sample keeps chunk c when
l_c + u > 0, so the kept chunks are always a prefix (a count, not a set), chunk c is kept with
probability sigmoid(l_c), and the expected count, the first chunk plus each chunk's size times that
probability, is what the cost models price. A query keeps the chunks whose logit is > 0.

Training weighs tokens by the relaxed sigmoid((l_c + u) / T) itself, not straight-through 0/1 as the
other gates: the straight-through gradient at a kept chunk (weight 1) says what more attention to it
would change, and on the LLaVA teacher it raised every chunk logit (3 -> 7 in 100 steps, all 64 tokens
kept at every preference); the relaxed weight says what fading the chunk out changes, and the same
100 steps kept 32 -> 20 tokens along a utility -> FLOPs sweep.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gates import logistic_noise, straight_through

STEPS = 16  # a count is chosen in steps of 1/16 of the level's tokens


def chunk_sizes(tokens: int, steps: int = STEPS) -> list[int]:
    """Tokens per chunk, best-ranked chunk first; fewer chunks when there are fewer tokens."""
    n = min(steps, tokens)
    return [tokens * (c + 1) // n - tokens * c // n for c in range(n)]


def gates_of(tokens: int) -> int:
    """Chunks a controller gates (all but the first)."""
    return len(chunk_sizes(tokens)) - 1


def init_raw(gates: int, init_bias: float, step: float = -2.0) -> torch.Tensor:
    """Raw outputs at which every chunk is kept with about sigmoid(init_bias) (the dense start): the
    last chunk's logit is init_bias, each earlier one softplus(step) higher."""
    raw = [float(step)] * gates  # a list, not tensor ops: controllers are built on the meta device to load
    if gates:
        raw[0] = init_bias + (gates - 1) * math.log1p(math.exp(step))
    return torch.tensor(raw)


def chunk_logits(raw: torch.Tensor) -> torch.Tensor:
    """[..., G] raw outputs -> [..., G] falling chunk logits."""
    if raw.shape[-1] == 0:
        return raw
    fall = F.softplus(raw[..., 1:]).cumsum(-1)
    return torch.cat([raw[..., :1], raw[..., :1] - fall], dim=-1)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
           hard: bool = True) -> torch.Tensor:
    """[..., G] kept chunks under one shared noise per leading index: a prefix, 0/1 when `hard`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    noise = logistic_noise(logits.shape[:-1] + (1,), generator, logits.device, logits.dtype)
    soft = torch.sigmoid((logits + noise) / temperature)
    return straight_through(soft) if hard else soft


def hard(logits: torch.Tensor) -> torch.Tensor:
    """Query-time chunks: kept where the logit is > 0 (falling logits: a prefix)."""
    return (logits > 0).to(logits.dtype)


def kept_count(chunks: torch.Tensor, tokens: int) -> torch.Tensor:
    """[..., G] kept chunks (0/1, soft or probabilities) -> [...] tokens kept (expected, for probabilities)."""
    sizes = torch.tensor(chunk_sizes(tokens), dtype=chunks.dtype, device=chunks.device)
    return sizes[0] + (chunks * sizes[1:]).sum(-1)


def token_weights(rank: torch.Tensor, chunks: torch.Tensor, tokens: int) -> torch.Tensor:
    """The weight of each token in a run from its rank (0: best) [R, n] and its run's chunks [R, G]
    (or [G]): 1 in the first chunk, the chunk's gate after it."""
    sizes = chunk_sizes(tokens)
    of_chunk = torch.repeat_interleave(torch.arange(len(sizes), device=rank.device),
                                       torch.tensor(sizes, device=rank.device))  # rank -> chunk
    gate = torch.cat([chunks.new_ones(chunks.shape[:-1] + (1,)), chunks], dim=-1)
    gate = gate.expand(rank.shape[0], -1) if gate.dim() == 1 else gate
    return gate.gather(1, of_chunk[rank])
