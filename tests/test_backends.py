"""The backend interface and its registry: real families found, unknown models refused, and a family
registered from outside (here, in the test) served by the same describe / make_prunable / set_gates."""
import copy

import open_clip
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from hipp.backends import (Backend, DualEncoder, Stage, backend_for, clear_gates, context_length, describe,
                           gated, get_backend, image_size, make_prunable, register, registered, set_gates,
                           tower_blocks, unregister)
from hipp.backends.modules import GatedBlock
from hipp.backends.open_clip import PrunableBlock
from hipp.errors import HippError
from conftest import TINY_CFG
from test_hf_backend import tiny_hf
from test_modules import CUSTOM, build


def test_the_registry_finds_each_real_model_s_backend():
    torch.manual_seed(0)
    # CUSTOM's text tower appends a class token: 12 caption tokens, 13 positions
    cases = [(open_clip.CLIP(**TINY_CFG), "open_clip", 32, 32), (build(CUSTOM), "open_clip", 32, 13),
             (tiny_hf("clip"), "hf", 16, 8), (tiny_hf("siglip"), "hf", 16, 8)]
    for model, name, size, context in cases:
        b = backend_for(model)
        assert b.name == name and b is get_backend(name) and isinstance(b, Backend)
        assert (image_size(model), context_length(model)) == (size, context)
        assert isinstance(model, DualEncoder)  # what the contrastive task code calls, in both families
    assert {"open_clip", "hf"} <= set(registered())


def test_an_unknown_model_or_name_is_one_hipp_error():
    with pytest.raises(HippError, match="neither an open_clip CLIP model nor a transformers"):
        backend_for(nn.Linear(2, 2))
    with pytest.raises(HippError, match="neither an open_clip"):
        describe(nn.Sequential())
    with pytest.raises(HippError, match="unknown backend 'caffe'"):
        get_backend("caffe")
    assert not isinstance(nn.Linear(2, 2), DualEncoder)


def test_every_registered_backend_implements_the_whole_interface():
    torch.manual_seed(0)
    models = {"open_clip": open_clip.CLIP(**TINY_CFG), "hf": tiny_hf("siglip")}
    for name, b in registered().items():
        for method in Backend.__abstractmethods__:
            assert getattr(type(b), method) is not getattr(Backend, method), (name, method)
        if name not in models:
            continue
        model = models[name]
        assert b.owns(model) and all(not other.owns(model) for n, other in registered().items() if n != name)
        blocks, stages = b.blocks(model), b.stages(model)
        assert list(stages) == list(blocks)
        for stage_name, stage in stages.items():
            assert isinstance(stage, Stage) and stage.blocks is blocks[stage_name]
            assert stage.tokens > 0 and stage.fixed_flops > 0 and stage.fixed_params > 0
            block = stage.blocks[0]
            shape = b.block_shape(block)
            wrapped = b.gated_block(block, 4)
            assert isinstance(wrapped, GatedBlock) and b.block_shape(wrapped) == shape
            assert wrapped.mlp.channel_group == 4
            assert wrapped.attn.num_heads * wrapped.attn.head_dim == shape[1] * shape[2]


def test_registering_a_second_family_under_a_taken_name_or_a_non_backend_is_refused():
    with pytest.raises(TypeError):
        register(object)

    class Impostor(type(get_backend("hf"))):
        name = "open_clip"

    with pytest.raises(ValueError, match="registered already"):
        register(Impostor)
    assert type(get_backend("open_clip")).__name__ == "OpenClipBackend"


# --- a family the project does not ship: one stage of open_clip blocks between two linear layers ---

class Toy(nn.Module):
    def __init__(self, width=16, heads=2, layers=3, tokens=5):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio=2.0) for _ in range(layers))
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # [B, tokens, 4] -> [B, tokens, 3]
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


class ToyBackend(Backend):
    name = "toy"

    def owns(self, model):
        return isinstance(model, Toy)

    def blocks(self, model):
        return {"seq": model.layers}

    def stages(self, model):
        outside = sum(p.numel() for m in (model.embed, model.head) for p in m.parameters())
        flops = 2.0 * model.tokens * (model.embed.in_features * model.embed.out_features
                                      + model.head.in_features * model.head.out_features)
        return {"seq": Stage(model.layers, model.tokens, flops, outside)}

    def block_shape(self, block):
        return get_backend("open_clip").block_shape(block)

    def gated_block(self, block, channel_group):
        return PrunableBlock.from_block(block, channel_group)

    def image_size(self, model):
        raise HippError("the toy takes no images")

    def context_length(self, model):
        return model.tokens

    def build(self, model_cfg):
        return Toy(**model_cfg)


@pytest.fixture
def toy_backend():
    register(ToyBackend)
    try:
        yield get_backend("toy")
    finally:
        unregister("toy")


def test_a_backend_registered_from_outside_drives_describe_prune_and_gates(toy_backend):
    torch.manual_seed(0)
    model = Toy().eval()
    assert backend_for(model) is toy_backend
    space = describe(model)
    assert space.stages == ("seq",) and [l.tower for l in space.layers] == ["seq"] * 3
    assert (space.layers[0].width, space.layers[0].num_heads, space.layers[0].mlp_hidden) == (16, 2, 32)
    assert space.fixed_params == {"seq": float(4 * 16 + 16 + 16 * 3 + 3)}
    assert space.dense_costs()["params/seq"] == sum(p.numel() for p in model.parameters())

    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        dense = model(x)
        original = copy.deepcopy(model)
        assert make_prunable(model, 8) == describe(original, 8)
        assert all(isinstance(b, PrunableBlock) for b in tower_blocks(model)["seq"])
        assert torch.allclose(model(x), dense, atol=1e-6)
        set_gates(model, torch.zeros(3), None, None)  # every layer off: embed -> head alone
        assert torch.allclose(model(x), original.head(original.embed(x)), atol=1e-6)
        heads = [torch.tensor([1.0, 0.0])] * 3
        with gated(model, (None, heads, None)):
            assert not torch.allclose(model(x), dense, atol=1e-4)
        assert torch.allclose(model(x), original.head(original.embed(x)), atol=1e-6)  # restored on exit
        clear_gates(model)
        assert torch.allclose(model(x), dense, atol=1e-6)
    with pytest.raises(HippError, match="no images"):
        image_size(model)


def test_a_model_two_backends_claim_is_refused(toy_backend):
    class Greedy(ToyBackend):
        name = "greedy"

    register(Greedy)
    try:
        with pytest.raises(HippError, match="several backends: toy, greedy"):
            describe(Toy())
    finally:
        unregister("greedy")
    assert "toy" in registered() and "greedy" not in registered()
