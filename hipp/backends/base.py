"""The backend interface: what a model family must say about its models, and the registry of families.

A backend knows where a family keeps its transformer blocks, what lies outside them (tokens, fixed
FLOPs and parameters, stage by stage) and how to wrap one block in the project's gated classes.
Everything else — the prune space, the swap to prunable blocks, gates, slicing — is written once in
backends/__init__.py and export/slicing.py on top of these answers. A new family is a subclass of
`Backend` decorated with `@register`; nothing else in the project changes.

`DualEncoder` is the separate, smaller contract of the contrastive (CLIP-style) task code: the two
encoders and the logit scale that evaluation, training and calibration call on a model.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import HippError

# imported on the first lookup, so that `backend_for` knows the families shipped with HiPP without
# importing them (and transformers' or open_clip's helpers) when hipp.backends is imported
BUILTIN = ("hipp.backends.open_clip", "hipp.backends.hf", "hipp.backends.llava")


@dataclass(frozen=True)
class Stage:
    """One stage of a model (CLIP-style: a tower) as the prune space sees it."""
    blocks: nn.ModuleList  # its transformer blocks, in order (plain, gated or dropped)
    tokens: int            # tokens per sample every block of the stage processes
    fixed_flops: float     # matmul FLOPs per sample outside the blocks (embeddings, heads, projections)
    fixed_params: int      # parameters outside the blocks


@runtime_checkable
class DualEncoder(Protocol):
    """What the contrastive (CLIP-style) task code calls on a model: two encoders into one embedding
    space and the learned temperature. open_clip's CLIP / CustomTextCLIP satisfy it natively;
    hipp.backends.hf.HFVLM implements it for transformers models."""

    logit_scale: torch.Tensor  # log of the temperature; similarities are scaled by its exp()

    def encode_image(self, pixels: torch.Tensor, /, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, D] embeddings (unit length when normalize)."""

    def encode_text(self, tokens: torch.Tensor, /, normalize: bool = False) -> torch.Tensor:
        """[B, context_length] token ids -> [B, D] embeddings (unit length when normalize)."""


class Backend(abc.ABC):
    """One model family. Instances are stateless: the registry holds one per family."""

    name: str  # the family's name in export configs ("backend" of pruned_config.json)

    @abc.abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is one of this family's models (the registry asks every family)."""

    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> dict[str, nn.ModuleList]:
        """Stage name -> its blocks, in stage order. Cheap: asked on every gated forward."""

    @abc.abstractmethod
    def stages(self, model: nn.Module) -> dict[str, Stage]:
        """Stage name -> the whole Stage, in the order of `blocks`."""

    @abc.abstractmethod
    def block_shape(self, block: nn.Module) -> tuple[int, int, int, int]:
        """(width, attention units, head_dim, mlp_hidden) of a plain or gated (possibly shrunk) block;
        a unit is a head, or a key/value group under grouped-query attention (layer_fields)."""

    def layer_fields(self, block: nn.Module) -> dict:
        """LayerSpec fields beyond block_shape's that price the block (hipp.core.space.BLOCK_DEFAULTS:
        grouped-query attention, biases, gated MLP, norm kind); {} for a CLIP-style block."""
        return {}

    @abc.abstractmethod
    def gated_block(self, block: nn.Module, channel_group: int) -> nn.Module:
        """The block as the family's GatedBlock subclass, sharing its parameters (state-dict keys
        unchanged). Raises ValueError or AttributeError for a block it cannot wrap."""

    @abc.abstractmethod
    def image_size(self, model: nn.Module) -> int:
        """Side of the square input image, in pixels."""

    @abc.abstractmethod
    def context_length(self, model: nn.Module) -> int:
        """Tokens per caption the text encoder takes."""

    @abc.abstractmethod
    def build(self, model_cfg: dict) -> nn.Module:
        """A model with fresh weights from the family's config dict (as exports record it)."""

    def token_levels(self, model: nn.Module, rule: str | None = None) -> tuple:
        """The token levels (hipp.core.space.TokenLevel) a plan for this model may prune, ranked by
        `rule` where the backend offers several (None: its default); none by default."""
        return ()

    def rebind(self, model: nn.Module) -> None:
        """Repair what copying blocks into `model` left pointing at another model (e.g. a config the
        blocks keep a reference to). Most families keep no such reference."""


_REGISTRY: dict[str, Backend] = {}
_loaded = False


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a Backend subclass known to `get` and `backend_for`."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{cls!r} is not a Backend subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"a backend named {name!r} is registered already ({type(_REGISTRY[name]).__name__})")
    _REGISTRY[name] = cls()
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN:
            importlib.import_module(module)
        _loaded = True


def registered() -> dict[str, Backend]:
    """Every known backend by name, in registration order."""
    _load_builtins()
    return dict(_REGISTRY)


def get(name: str) -> Backend:
    """The backend registered under `name`."""
    backends = registered()
    if name not in backends:
        raise HippError(f"unknown backend {name!r}; expected one of {', '.join(backends)}")
    return backends[name]


def backend_for(model: nn.Module) -> Backend:
    """The one registered backend that owns `model`."""
    owners = [b for b in registered().values() if b.owns(model)]
    if len(owners) == 1:
        return owners[0]
    if owners:  # two families claiming one model would price and gate it by chance
        raise HippError(f"{type(model).__name__} is claimed by several backends: {', '.join(b.name for b in owners)}")
    raise HippError(f"{type(model).__name__} is neither an open_clip CLIP model nor a transformers "
                    "CLIPModel / SiglipModel / LlavaForConditionalGeneration (no registered backend owns it)")
