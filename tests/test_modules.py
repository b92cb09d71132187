"""Prunable modules on real open_clip models: dense equivalence, exact gate semantics, gradients."""
import copy

import open_clip
import pytest
import torch

from hipp.backends import clear_gates, describe, make_prunable, set_gates, tower_blocks
from hipp.errors import HippError
from hipp.backends.open_clip import PrunableAttention, PrunableBlock

TINY = dict(embed_dim=64,
            vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16),
            text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=4, layers=3))

# CustomTextCLIP with a class token (so a 3-D per-head text mask), LayerScale and mlp_ratio 3
CUSTOM = dict(embed_dim=32, custom_text=True,
              vision_cfg=dict(image_size=32, patch_size=8, width=48, layers=2, head_width=16, ls_init_value=0.5),
              text_cfg=dict(context_length=12, vocab_size=500, width=32, heads=2, layers=2,
                            embed_cls=True, pool_type="last", mlp_ratio=3.0))


def build(cfg, seed=0):
    cfg = copy.deepcopy(cfg)
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    torch.manual_seed(seed)
    return cls(**cfg).eval()


def inputs(model, batch=2, seed=1):
    """Random images and token ids with trailing padding, sized for the model."""
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    text = model.text if hasattr(model, "text") else model
    ctx, vocab = text.context_length, text.vocab_size
    tokens = torch.randint(1, vocab, (batch, ctx), generator=g)
    tokens[:, ctx * 3 // 4:] = 0
    return torch.randn(batch, 3, size, size, generator=g), tokens


def embeddings(model, images, tokens, grad=False):
    with torch.set_grad_enabled(grad):
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def random_gates(space, seed, soft=False, batch=()):
    g = torch.Generator().manual_seed(seed)
    draw = (lambda n: torch.rand(*batch, n, generator=g)) if soft else \
        (lambda n: (torch.rand(*batch, n, generator=g) > 0.4).float())
    return (draw(len(space.layers)), [draw(l.num_heads) for l in space.layers],
            [draw(l.num_channel_gates) for l in space.layers])


@pytest.fixture(scope="module")
def vitb32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32").eval()


def assert_close(a, b, atol):
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= atol


# --- dense equivalence and weights ---

@pytest.mark.parametrize("cfg", [TINY, CUSTOM], ids=["clip", "custom_text"])
def test_ungated_and_all_ones_match_the_original(cfg):
    original = build(cfg)
    model = copy.deepcopy(original)
    space = make_prunable(model)
    assert all(isinstance(b, PrunableBlock) for bl in tower_blocks(model).values() for b in bl)
    assert space == describe(original)
    x = inputs(model)
    ref = embeddings(original, *x)
    assert_close(embeddings(model, *x), ref, 1e-6)
    set_gates(model, *space.all_kept())  # float64 ones: must not change dtype or values
    out = embeddings(model, *x)
    assert out[0].dtype == torch.float32
    assert_close(out, ref, 1e-6)


def test_vit_b_32_dense_equivalence_and_strict_state_dict(vitb32):
    model = copy.deepcopy(vitb32)
    keys = [(k, v.shape) for k, v in vitb32.state_dict().items()]
    make_prunable(model)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == keys
    x = inputs(vitb32, batch=2)
    assert_close(embeddings(model, *x), embeddings(vitb32, *x), 1e-5)
    # a state dict of another (unswapped) ViT-B-32 loads strictly and gives that model's outputs
    torch.manual_seed(5)
    other = open_clip.create_model("ViT-B-32").eval()
    model.load_state_dict(other.state_dict(), strict=True)
    assert_close(embeddings(model, *x), embeddings(other, *x), 1e-5)


def test_make_prunable_shares_weights_and_is_idempotent():
    model = build(TINY)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    make_prunable(model)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    space = make_prunable(model, channel_group=5)
    assert space.layers[0].num_channel_gates == 52 and space.layers[0].channel_group == 5
    with pytest.raises(HippError):
        make_prunable(model, channel_group=0)
    with pytest.raises(HippError, match="neither an open_clip"):
        make_prunable(torch.nn.Linear(2, 2))


def test_unsupported_blocks_are_a_hipp_error_and_leave_the_model_untouched():
    cfg = copy.deepcopy(TINY)
    cfg["text_cfg"]["qk_norm"] = True  # open_clip builds CustomResidualAttentionBlocks for the text tower
    model = build(cfg)
    with pytest.raises(HippError, match="text block 0"):
        make_prunable(model)
    assert not any(isinstance(b, PrunableBlock) for bl in tower_blocks(model).values() for b in bl)


# --- where each gate acts (checked against edited weights of the ungated model) ---

def _block(model, tower, i):
    return tower_blocks(model)[tower][i]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_head_gate_equals_scaling_that_heads_out_proj_columns(tower):
    model = build(TINY)
    space = make_prunable(model)
    edited = copy.deepcopy(model)
    n_img = len(space.tower_layers("image"))
    layer = 1 + (n_img if tower == "text" else 0)
    hd = space.layers[layer].head_dim
    heads = torch.ones(space.layers[layer].num_heads)
    heads[0], heads[2] = 0.0, 0.3
    with torch.no_grad():
        w = _block(edited, tower, 1).attn.out_proj.weight
        w[:, 0:hd] = 0
        w[:, 2 * hd:3 * hd] *= 0.3
    ones = space.all_kept()
    set_gates(model, ones[0], [heads if i == layer else h for i, h in enumerate(ones[1])], ones[2])
    x = inputs(model)
    assert_close(embeddings(model, *x), embeddings(edited, *x), 1e-6)


def test_channel_gate_equals_scaling_c_proj_columns_with_short_last_group():
    model = build(TINY)
    space = make_prunable(model, channel_group=100)  # 256 channels -> groups of 100, 100, 56
    assert [float(s) for s in space.layers[0].channel_sizes()] == [100, 100, 56]
    edited = copy.deepcopy(model)
    chans = torch.tensor([1.0, 0.0, 0.5])
    with torch.no_grad():
        w = _block(edited, "image", 0).mlp.c_proj.weight
        w[:, 100:200] = 0
        w[:, 200:] *= 0.5
    ones = space.all_kept()
    set_gates(model, ones[0], ones[1], [chans] + ones[2][1:])
    x = inputs(model)
    assert_close(embeddings(model, *x), embeddings(edited, *x), 1e-6)


def test_layer_gate_scales_both_branches_and_zero_is_identity():
    model = build(TINY)
    space = make_prunable(model)
    x = inputs(model)
    layer = torch.ones(len(space.layers))
    layer[1] = 0.0
    layer[4] = 0.25
    set_gates(model, layer)
    out = embeddings(model, *x)
    ref = copy.deepcopy(model)
    clear_gates(ref)
    clear_gates(model)
    del tower_blocks(ref)["image"][1]  # gate 0 == image layer 1 removed outright
    b = _block(ref, "text", 1)
    with torch.no_grad():  # scaling both branch outputs == scaling out_proj and c_proj (weights and biases)
        for lin in (b.attn.out_proj, b.mlp.c_proj):
            lin.weight.mul_(0.25)
            lin.bias.mul_(0.25)
    assert_close(out, embeddings(ref, *x), 1e-6)


def test_zero_heads_and_zero_channels_reduce_to_biases():
    attn = PrunableAttention(8, 0, 4)
    with torch.no_grad():
        attn.out_proj.bias.copy_(torch.arange(8.0))
    x = torch.randn(2, 5, 8)
    assert torch.equal(attn(x), torch.arange(8.0).expand(2, 5, 8))
    model = build(TINY)
    space = make_prunable(model)
    ones = space.all_kept()
    heads = [torch.zeros_like(h) for h in ones[1]]
    chans = [torch.zeros_like(c) for c in ones[2]]
    set_gates(model, ones[0], heads, chans)
    edited = copy.deepcopy(model)
    clear_gates(edited)
    with torch.no_grad():
        for bl in tower_blocks(edited).values():
            for b in bl:
                b.attn.out_proj.weight.zero_()
                b.mlp.c_proj.weight.zero_()
    x = inputs(model)
    assert_close(embeddings(model, *x), embeddings(edited, *x), 1e-6)


def test_per_sample_gates_equal_separate_runs():
    model = build(TINY)
    space = make_prunable(model)
    images, tokens = inputs(model, batch=2)
    batched = random_gates(space, 3, soft=True, batch=(2,))
    set_gates(model, *batched)
    both = embeddings(model, images, tokens)
    for s in range(2):
        set_gates(model, batched[0][s], [h[s] for h in batched[1]], [c[s] for c in batched[2]])
        one = embeddings(model, images[s:s + 1], tokens[s:s + 1])
        assert_close((both[0][s:s + 1], both[1][s:s + 1]), one, 1e-6)


def test_set_gates_rejects_mismatched_shapes_and_unprunable_models():
    model = build(TINY)
    space = make_prunable(model)
    layers, heads, chans = space.all_kept()
    with pytest.raises(HippError, match="layer_keep"):
        set_gates(model, layers[:-1], heads, chans)
    with pytest.raises(HippError, match="head_keep"):
        set_gates(model, layers, heads[:-1], chans)
    with pytest.raises(HippError, match="channel_keep"):
        set_gates(model, layers, heads, [c[:-1] for c in chans])
    with pytest.raises(HippError, match="make_prunable"):
        set_gates(build(TINY), layers, heads, chans)


# --- gradients ---

@pytest.mark.parametrize("cfg", [TINY, CUSTOM], ids=["clip", "custom_text"])
def test_gradients_reach_every_soft_gate_and_no_weight(cfg):
    model = build(cfg)
    space = make_prunable(model, channel_group=4)
    model.requires_grad_(False)
    layers, heads, chans = random_gates(space, 0, soft=True)
    gates = [layers.requires_grad_()] + [h.requires_grad_() for h in heads] + [c.requires_grad_() for c in chans]
    set_gates(model, layers, heads, chans)
    img, txt = embeddings(model, *inputs(model), grad=True)
    g = torch.Generator().manual_seed(2)
    loss = (img * torch.randn(img.shape, generator=g)).sum() + (txt * torch.randn(txt.shape, generator=g)).sum()
    loss.backward()
    for t in gates:
        assert t.grad is not None and bool((t.grad != 0).all())
    assert all(p.grad is None for p in model.parameters())


def test_gated_restores_the_gates_the_model_had_even_when_the_block_raises():
    import open_clip
    from hipp.backends import gated, make_prunable, prunable_blocks, set_gates
    from conftest import TINY_CFG
    model = open_clip.CLIP(**TINY_CFG)
    space = make_prunable(model)
    half = (torch.full((len(space.layers),), 0.5), [torch.ones(l.num_heads) for l in space.layers],
            [torch.ones(l.num_channel_gates) for l in space.layers])
    set_gates(model, *half)
    with pytest.raises(RuntimeError):
        with gated(model, space.all_kept()):
            assert all(b.layer_gate == 1 for b in prunable_blocks(model))
            raise RuntimeError
    assert all(b.layer_gate == 0.5 for b in prunable_blocks(model))
