"""What a query's `--visual-tokens` asks for: the share of a model's image tokens a plan keeps (a
LLaVA's, or a CLIP image tower's patches), one share or several for the bound search to choose among
(hipp.query.bound), or `search` for quarters."""
from __future__ import annotations

import math

from ..backends import backend_for
from ..backends.token_rank import RULES
from ..core.plan import Plan
from ..core.space import PruneSpace, TokenLevel
from ..errors import HippError

JOINT, ONLY = "hipp+tokens", "tokens"  # bench rows: the bound search over token counts; tokens alone
SEARCH = (0.25, 0.5, 0.75, 1.0)  # shares `search` tries; each count is ranked with a full set of candidates


def token_level(model, rule: str | None = None) -> TokenLevel:
    """The model's one token level (ranked by `rule`, None: the backend's default), or one line
    saying it has none or no such rule."""
    b = backend_for(model)
    levels = b.token_levels(model, rule)
    if not levels:
        raise HippError(f"this {b.name} model has no visual-token level (it needs a class token "
                        "to rank by: llava and CLIP models have one, SigLIP has none)")
    if rule is not None and levels[0].rule != rule:
        raise HippError(f"a {b.name} model ranks its visual tokens by {levels[0].rule!r} only, not {rule!r} "
                        "(the text rule ranks inside a LLaVA's language model)")
    return levels[0]


def levels(model) -> list[TokenLevel]:
    """The model's token level under each rule it offers, its default first."""
    first = token_level(model)
    others = [backend_for(model).token_levels(model, rule)[0] for rule in RULES if rule != first.rule]
    return [first] + [level for level in others if level.rule != first.rule]


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
    """Every weight kept and as many tokens as the FLOPs bound allows, ranked by the space's level
    (FastV-style under the text rule, FoPru / HiPrune- or EViT-style under cls), or one line saying the
    bound is out of reach."""
    level = space.tokens[0]
    for kept in range(level.tokens, 0, -1):
        plan = Plan.from_gates(space, space.all_kept(), token_keep=[kept], meta={"max_flops": max_flops})
        if plan.costs()["flops_ratio"] <= max_flops:
            return plan
    least = plan.costs()["flops_ratio"]
    raise HippError(f"tokens alone cannot reach a FLOPs ratio of {max_flops:g}: one token left still costs {least:.3f}")
