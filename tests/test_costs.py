"""hipp.core.costs against torch.utils.flop_counter on real transformers blocks (CLIP, Llama, Qwen2)."""
import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from hipp.core.costs import AttentionCost, BlockCost, Load, MLPCost, NormCost, decode, prefill
from hipp.core.space import LayerSpec
from conftest import counted_flops

WIDTH = 64


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- CLIP: multi-head attention, fc1/fc2 with biases, LayerNorms ---

def clip_layer(heads=4, head_dim=16, hidden=96, seed=0):
    """A CLIP encoder layer; fewer heads than width // head_dim are cut out of the full one's weights."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(hidden_size=WIDTH, num_attention_heads=WIDTH // head_dim,
                                        intermediate_size=hidden)
    layer = CLIPEncoderLayer(cfg).eval()
    attn, inner = layer.self_attn, heads * head_dim
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            full = getattr(attn, name)
            cut = torch.nn.Linear(WIDTH, inner)
            cut.weight.copy_(full.weight[:inner]), cut.bias.copy_(full.bias[:inner])
            setattr(attn, name, cut)
        out = torch.nn.Linear(inner, WIDTH)
        out.weight.copy_(attn.out_proj.weight[:, :inner]), out.bias.copy_(attn.out_proj.bias)
        attn.out_proj = out
    return layer


@pytest.mark.parametrize("heads,hidden", [(4, 96), (3, 40), (1, 7)], ids=["dense", "pruned", "one_head"])
@pytest.mark.parametrize("tokens", [5, 17])
def test_clip_layer_flops_and_params(heads, hidden, tokens):
    layer, cost = clip_layer(heads, 16, hidden), BlockCost.vit(WIDTH, heads, 16, hidden)
    x = torch.randn(2, tokens, WIDTH)
    counted = counted_flops(layer, x, None)
    assert counted == 2 * cost.flops(tokens)
    a, m = cost.attention, cost.mlp
    assert counted == 2 * (heads * a.unit_flops(tokens) + hidden * m.unit_flops(tokens) + a.layer_flops(tokens))
    assert counted_flops(layer.self_attn, x) == 2 * a.flops(tokens)
    assert counted_flops(layer.mlp, x) == 2 * m.flops(tokens)
    assert numel(layer) == cost.params == heads * a.unit_params + hidden * m.unit_params + cost.layer_params
    assert numel(layer.self_attn) == a.params and numel(layer.mlp) == m.params
    assert numel(layer.layer_norm1) + numel(layer.layer_norm2) == cost.norm.params


@pytest.mark.parametrize("width,heads,head_dim,hidden,tokens", [
    (64, 4, 16, 256, 50), (768, 12, 64, 3072, 197), (512, 8, 64, 2048, 77), (1280, 16, 80, 5120, 257),
    (8192, 64, 128, 28672, 4097), (48, 3, 16, 7, 1)])
def test_mha_is_bit_identical_to_layer_spec(width, heads, head_dim, hidden, tokens):
    spec = LayerSpec(tower="image", index=0, width=width, num_heads=heads, head_dim=head_dim,
                     mlp_hidden=hidden, tokens=tokens)
    for unit in ("kv_group", "head"):  # the two units coincide under MHA
        block = BlockCost(AttentionCost(width, heads, head_dim, unit=unit), MLPCost(width, hidden), NormCost(width))
        a, m = block.attention, block.mlp
        assert a.num_units == heads and a.layer_flops(tokens) == 0.0
        assert a.unit_flops(tokens) == spec.head_flops and m.unit_flops(tokens) == spec.channel_flops
        assert a.unit_params == spec.head_params and m.unit_params == spec.channel_params
        assert block.layer_params == spec.layer_params
        assert block.flops(tokens) == heads * spec.head_flops + hidden * spec.channel_flops


# --- Llama / Qwen2: grouped-query attention, SwiGLU, RMSNorm ---

def decoder_layer(kind="llama", heads=4, kv_heads=2, hidden=96, attn="sdpa", seed=0):
    cls = {"llama": (transformers.LlamaConfig, LlamaDecoderLayer, LlamaRotaryEmbedding),
           "qwen2": (transformers.Qwen2Config, Qwen2DecoderLayer, Qwen2RotaryEmbedding)}[kind]
    cfg = cls[0](hidden_size=WIDTH, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=hidden, num_hidden_layers=1, vocab_size=10)
    # set after validation, which wants width == heads * head_dim, untrue of pruned layers
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg._attn_implementation = heads, kv_heads, attn
    torch.manual_seed(seed)
    return cls[1](cfg, layer_idx=0).eval(), cls[2](cfg)


def run_decoder(layer, rotary, x, start=0, cache=None, mask=None):
    positions = torch.arange(start, start + x.shape[1])[None].expand(x.shape[0], -1)
    return layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary(x, positions), cache=cache)


def decoder_cost(kind, heads, kv_heads, hidden, unit="kv_group"):
    return BlockCost.decoder(WIDTH, heads, 16, kv_heads, hidden, qkv_bias=kind == "qwen2", unit=unit)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("heads,kv_heads,hidden", [(4, 2, 96), (2, 1, 96), (4, 4, 40), (6, 2, 33), (2, 2, 96)],
                         ids=["dense", "one_group", "mha", "group3", "one_head_per_group"])
def test_decoder_layer_flops_and_params(kind, attn, heads, kv_heads, hidden):
    layer, rotary = decoder_layer(kind, heads, kv_heads, hidden, attn)
    for tokens in (5, 12):
        x = torch.randn(2, tokens, WIDTH)
        cost = decoder_cost(kind, heads, kv_heads, hidden)
        with torch.no_grad():
            counted = counted_flops(run_decoder, layer, rotary, x)
            assert counted_flops(layer.mlp, x) == 2 * cost.mlp.flops(tokens)
        assert counted == 2 * cost.flops(tokens)
        for unit in ("kv_group", "head"):
            a = decoder_cost(kind, heads, kv_heads, hidden, unit).attention
            assert a.flops(tokens) == a.num_units * a.unit_flops(tokens) + a.layer_flops(tokens)
            assert counted == 2 * (a.flops(tokens) + cost.mlp.flops(tokens))
    a, m = cost.attention, cost.mlp
    assert numel(layer) == cost.params == a.num_units * a.unit_params + hidden * m.unit_params + cost.layer_params
    assert numel(layer.self_attn) == a.params and numel(layer.mlp) == m.params
    assert numel(layer.input_layernorm) + numel(layer.post_attention_layernorm) == cost.norm.params


def test_units_price_what_pruning_removes():
    """Dense minus removed units is the smaller real layer: a kv group takes its k/v, a query head does not."""
    tokens, x = 9, torch.randn(1, 9, WIDTH)
    counted, mlp = {}, MLPCost(WIDTH, 96, gated=True, bias=False).flops(tokens)
    for shape in ((4, 2), (2, 1), (2, 2)):
        layer, rotary = decoder_layer("llama", *shape)
        with torch.no_grad():
            counted[shape] = counted_flops(run_decoder, layer, rotary, x) - mlp
    group, head = (AttentionCost(WIDTH, 4, 16, 2, False, False, unit) for unit in ("kv_group", "head"))
    assert counted[2, 1] == group.flops(tokens) - group.unit_flops(tokens)
    assert counted[2, 2] == head.flops(tokens) - 2 * head.unit_flops(tokens)  # one query head off each group
    assert group.layer_flops(tokens) == 0 and head.layer_flops(tokens) == 2 * 2 * 2 * tokens * WIDTH * 16
    assert decoder_cost("llama", 4, 2, 96, "head").layer_flops(tokens) == head.layer_flops(tokens)
    assert group.unit_params == 2 * head.unit_params + 2 * WIDTH * 16
    assert group.params == head.params == 4 * 2 * WIDTH * 16 + 2 * 2 * WIDTH * 16


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_steps_with_a_kv_cache(kind, attn):
    layer, rotary = decoder_layer(kind, attn=attn)
    cost, prompt, steps = decoder_cost(kind, 4, 2, 96), 7, 4
    cache = DynamicCache()
    with torch.no_grad():
        x = torch.randn(1, prompt, WIDTH)
        assert counted_flops(run_decoder, layer, rotary, x, 0, cache) == cost.flops(prompt)
        total = 0
        for i in range(steps):
            step = counted_flops(run_decoder, layer, rotary, torch.randn(1, 1, WIDTH), prompt + i, cache)
            assert step == cost.flops(1, context=prompt + i + 1)
            total += step
        # a chunk of new tokens against the cache; without a mask, sdpa would take it for a prefill and crop the keys
        start = prompt + steps
        causal = torch.arange(start + 3)[None] <= torch.arange(start, start + 3)[:, None]
        chunk = counted_flops(run_decoder, layer, rotary, torch.randn(1, 3, WIDTH), start, cache, causal[None, None])
    assert total == cost.decode_flops(prompt, steps) == cost.flops(decode(prompt, steps))
    assert chunk == cost.flops(3, context=prompt + steps + 3)
    a = cost.attention
    assert a.decode_flops(prompt, steps) == sum(a.flops(1, prompt + i + 1) for i in range(steps))
    assert cost.mlp.decode_flops(prompt, steps) == cost.mlp.flops(steps)


def test_loads_and_validation():
    assert prefill(5) == Load(5, 25) and prefill(2, context=9) == Load(2, 18)
    assert decode(10, 0) == Load(0, 0) and decode(0, 3) == Load(3, 1 + 2 + 3)
    assert prefill(4) + decode(4, 2) == Load(6, 16 + 5 + 6)
    # a 70B-sized layer over a long generation: sums stay exact integers until the end
    big, prompt, steps = AttentionCost(8192, 64, 128, 8, False, False), 10 ** 6, 10 ** 5
    pairs = steps * (prompt + 1) + steps * (steps - 1) // 2
    assert big.decode_flops(prompt, steps) == float(2 * (steps * 8192 * 128 * (2 * 64 + 2 * 8) + pairs * 128 * 2 * 64))
    empty = AttentionCost(64, 0, 16)
    assert empty.num_units == 0 and empty.flops(7) == 0.0 and empty.params == 64.0
    for bad in (dict(heads=4, kv_heads=3), dict(heads=4, kv_heads=0), dict(heads=0, kv_heads=2),
                dict(heads=4, unit="query")):
        with pytest.raises(ValueError):
            AttentionCost(64, head_dim=16, **bad)
    with pytest.raises(ValueError):
        prefill(5, context=4)
    with pytest.raises(ValueError):
        AttentionCost(64, 4, 16).flops(prefill(3), context=3)
