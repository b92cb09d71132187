"""Visual sensitivity of a LLaVA's decoder layers: how much of each layer's attention, from the
prompt's last token, goes to the image tokens, averaged over attention heads and a batch of instruction
prompts from the task's calibration split. HiPP-Prune feeds such a per-layer signal to its policy so
that a preference for hallucination robustness can spare the layers that read the image.

The scores are standardised over the decoder's layers (mean 0, sd 1; 0 for the vision tower's layers,
which the prompt does not attend through) and given to a controller made with `visual_sensitivity`
(hipp/controller/network.py), which learns per preference how much to follow them.
"""
from __future__ import annotations

import torch

from ..backends import backend_for
from ..backends.token_rank import record_from, recorded
from ..core.space import PruneSpace
from ..data.words import encode
from ..errors import HippError
from ..tasks import get_task

PROMPTS = 32  # calibration prompts the scores are averaged over


@torch.no_grad()
def image_attention(model, processor, image_size: int, n: int = PROMPTS, seed: int = 0) -> torch.Tensor:
    """[decoder layers] the mean share of the last prompt token's attention that lands on image tokens
    (a prunable LLaVA at its dense gates; NaN for a layer that computes no attention)."""
    samples = get_task("instruct").calibration_batch(image_size, n, seed=seed).samples
    inputs = encode(processor, samples, train=False)
    inputs.pop("answers")
    image = inputs["input_ids"] == model.config.image_token_id
    blocks = backend_for(model).blocks(model)["language"]
    for block in blocks:
        record_from(block, query=-1)
    device = next(model.parameters()).device
    model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
    shares = []
    for block in blocks:
        attn, rows = recorded(block)
        if attn is None or not rows:
            shares.append(float("nan"))
            continue
        valid = inputs["attention_mask"].bool()[:, None, :]
        probs = rows[-1].cpu().masked_fill(~valid, float("-inf")).softmax(-1)  # [B, H, T]
        shares.append(float((probs * image[:, None, :]).sum(-1).mean()))
    return torch.tensor(shares, dtype=torch.float64)


def layer_scores(space: PruneSpace, shares: torch.Tensor) -> torch.Tensor:
    """[space layers] the decoder layers' shares standardised (mean 0, sd 1), 0 elsewhere."""
    language = [i for i, layer in enumerate(space.layers) if layer.tower == "language"]
    if len(language) != len(shares):
        raise HippError(f"{len(shares)} decoder layers measured for a space with {len(language)}")
    shares = torch.nan_to_num(shares, nan=float(shares.nanmean()))
    z = (shares - shares.mean()) / shares.std().clamp_min(1e-12) if len(shares) > 1 else shares * 0
    out = torch.zeros(len(space.layers), dtype=torch.float64)
    out[language] = z
    return out
