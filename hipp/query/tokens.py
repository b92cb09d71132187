"""What a query's `--visual-tokens` asks for: the share of a model's image tokens a plan keeps (a
LLaVA's, or a CLIP image tower's patches), one share or several for the bound search to choose among
(hipp.query.bound), or `search` for quarters."""
from __future__ import annotations

import math

from ..backends import backend_for
from ..core.plan import Plan
from ..core.space import PruneSpace, TokenLevel
from ..errors import HippError

JOINT, ONLY = "hipp+tokens", "tokens"  # bench rows: the bound search over token counts; tokens alone
SEARCH = (0.25, 0.5, 0.75, 1.0)  # shares `search` tries; each count is ranked with a full set of candidates


def token_level(model) -> TokenLevel:
    """The model's one token level, or one line saying it has none."""
    levels = backend_for(model).token_levels(model)
    if not levels:
        raise HippError(f"this {backend_for(model).name} model has no visual-token level (it needs a class token "
                        "to rank by: llava and CLIP models have one, SigLIP has none)")
    return levels[0]


def parse_shares(text: str) -> tuple[float, ...]:
    """`search`, or comma-separated shares in (0, 1]."""
    if text.strip() == "search":
        return SEARCH
    try:
        shares = tuple(float(v) for v in text.split(","))
    except ValueError:
        shares = ()
    if not shares or not all(math.isfinite(s) and 0 < s <= 1 for s in shares):
        raise HippError(f"--visual-tokens takes shares in (0, 1] (e.g. 0.25 or 0.25,0.5) or 'search', got {text!r}")
    return shares


def counts(level: TokenLevel, shares) -> list[int]:
    """Kept counts for the shares (at least one token each), distinct, in ascending order."""
    return sorted({max(1, round(s * level.tokens)) for s in shares})


def tokens_only(space: PruneSpace, max_flops: float) -> Plan:
    """Every weight kept and as many tokens as the FLOPs bound allows (FoPru / HiPrune-style: the
    vision tower's class-token attention ranks them), or one line saying the bound is out of reach."""
    level = space.tokens[0]
    for kept in range(level.tokens, 0, -1):
        plan = Plan.from_gates(space, space.all_kept(), token_keep=[kept], meta={"max_flops": max_flops})
        if plan.costs()["flops_ratio"] <= max_flops:
            return plan
    least = plan.costs()["flops_ratio"]
    raise HippError(f"tokens alone cannot reach a FLOPs ratio of {max_flops:g}: one token left still costs {least:.3f}")
