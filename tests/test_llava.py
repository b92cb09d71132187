"""LLaVA backend: a CLIP vision tower and a Llama / Qwen2 decoder under one plan, gated and materialised."""
import copy
import json

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from hipp.backends import backend_for, describe, gated, make_prunable, set_gates
from hipp.backends.decoder import DecoderBlock
from hipp.backends.hf import HFBlock
from hipp.backends.modules import DroppedBlock
from hipp.controller.network import CONFIG_NAME, Controller
from hipp.controller.files import load_controller
from hipp.core.costs import BlockCost
from hipp.core.space import LayerSpec, PruneSpace
from hipp.errors import HippError
from hipp.export.slicing import empty_model, materialize, model_structure
from conftest import counted_flops

IMAGE_TOKEN = 119
KINDS = ["llama", "qwen2", "llama-biases"]


def tiny_llava(kind: str, seed: int = 0):
    """Llama: GQA 4 query / 2 k/v heads, SwiGLU, features from the second-to-last vision layer without
    the class token (LLaVA-1.5's choice). Qwen2: q/k/v biases, 6 / 2 heads, every vision position.
    llama-biases: Llama with attention_bias and mlp_bias (biases on every linear of the block)."""
    torch.manual_seed(seed)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_hidden_layers=3, image_size=16, patch_size=4)
    text = dict(model_type=kind.split("-")[0], hidden_size=48, intermediate_size=80, num_hidden_layers=3, vocab_size=120,
                max_position_embeddings=128, pad_token_id=0, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16)
    options = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
    if kind == "llama-biases":
        text.update(attention_bias=True, mlp_bias=True)
    if kind == "qwen2":
        text.update(num_attention_heads=6, num_key_value_heads=2, head_dim=8)
        options = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, **options)
    return transformers.LlavaForConditionalGeneration(cfg).eval().requires_grad_(False)


def prompts(model, batch: int = 2, seed: int = 1):
    """Pixels and prompts of the declared length: one token, the image tokens, text."""
    b = backend_for(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_TOKEN, (batch, b.context_length(model)), generator=g)
    ids[:, 1:1 + b.image_tokens(model)] = IMAGE_TOKEN
    size = b.image_size(model)
    return dict(input_ids=ids, pixel_values=torch.randn(batch, 3, size, size, generator=g))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, steps: int = 8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def decode_by_hand(model, inputs, steps: int = 4) -> torch.Tensor:
    """Greedy steps without position ids, as a hand-written loop runs them: the model reads the
    position from the KV cache, whose length transformers takes from the cache's layer 0."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        step_logits = [out.logits[:, -1]]
        for _ in range(steps - 1):
            out = model(input_ids=step_logits[-1].argmax(-1)[:, None], cache=out.cache, use_cache=True)
            step_logits.append(out.logits[:, -1])
    return torch.stack(step_logits, 1)


def plans(space: PruneSpace) -> dict:
    """Partial groups / heads and channels in both stages plus a dropped layer in each (the first
    decoder layer among them); and emptied attention and MLP branches."""
    n = len(space.layers)
    ones = [torch.ones(l.num_heads) for l in space.layers], [torch.ones(l.num_channel_gates) for l in space.layers]
    first = {t: next(i for i, l in enumerate(space.layers) if l.tower == t) for t in space.stages}
    g = torch.Generator().manual_seed(3)
    layers = torch.ones(n)
    layers[first["vision"]] = layers[first["language"]] = 0
    heads = [h.clone() for h in ones[0]]
    for i, h in enumerate(heads):
        h[i % len(h)] = 0
    chans = [(torch.rand(len(c), generator=g) > 0.4).float() for c in ones[1]]
    partial = (layers, heads, chans)
    empty_heads = [h * (space.layers[i].index % 2) for i, h in enumerate(ones[0])]
    empty_chans = [c * ((space.layers[i].index + 1) % 2) for i, c in enumerate(ones[1])]
    return {"partial_and_dropped": partial, "empty_branches": (torch.ones(n), empty_heads, empty_chans)}


def assert_a_transformers_layer(block: DecoderBlock, model) -> None:
    """A shrunk decoder block is an ordinary transformers decoder layer: one built from a config with
    the block's own head counts and width loads its state dict strictly and computes the same."""
    a = block.attn
    cfg = copy.deepcopy(model.config.text_config)
    cfg.num_attention_heads, cfg.num_key_value_heads = a.num_heads, a.num_key_value_heads
    cfg.intermediate_size = block.mlp.hidden
    layer_cls = {"llama": LlamaDecoderLayer, "qwen2": Qwen2DecoderLayer}[cfg.model_type]
    layer = layer_cls(cfg, layer_idx=a.layer_idx).eval()
    layer.load_state_dict(block.state_dict(), strict=True)
    x, positions = torch.randn(2, 5, cfg.hidden_size), torch.arange(5)[None]
    rotary = model.model.language_model.rotary_emb(x, positions)
    with torch.no_grad():
        ours, theirs = (m(x, position_embeddings=rotary, position_ids=positions) for m in (block, layer))
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_layer_spec_fields_leave_clip_specs_as_they_were():
    clip = LayerSpec("image", 0, 64, 4, 16, 256, 50)
    assert clip.to_dict() == {"tower": "image", "index": 0, "width": 64, "num_heads": 4, "head_dim": 16,
                              "mlp_hidden": 256, "tokens": 50, "channel_group": 1}
    decoder = LayerSpec("language", 2, 64, 2, 16, 96, 48, 1, group_size=2, qkv_bias=0, out_bias=0, mlp_gated=1,
                        mlp_bias=0, norm_bias=0)
    space = PruneSpace((clip, decoder), {"image": 1.0}, {"image": 2.0})
    assert PruneSpace.from_dict(space.to_dict()) == space
    cost = BlockCost.decoder(64, 4, 16, 2, 96)
    assert decoder.head_flops == cost.attention.unit_flops(48) and decoder.channel_flops == cost.mlp.unit_flops(48)
    assert decoder.head_params == cost.attention.unit_params and decoder.layer_params == cost.layer_params
    assert space.dense_costs()["flops/language"] == cost.flops(48)
    assert space.dense_costs()["params/language"] == cost.params


@pytest.mark.parametrize("kind", KINDS)
def test_describe_prices_a_prefill_as_the_flop_counter_counts_it(kind):
    model = tiny_llava(kind)
    space = describe(model)
    assert space.stages == ("vision", "language")
    vision, language = space.tower_layers("vision"), space.tower_layers("language")
    assert len(vision) == len(language) == 3
    assert vision[0].tokens == 17 and vision[0].to_dict().keys() == LayerSpec("v", 0, 1, 1, 1, 1, 1).to_dict().keys()
    heads, kv = (6, 2) if kind == "qwen2" else (4, 2)
    assert language[0].num_heads == kv and language[0].group_size == heads // kv
    assert language[0].qkv_bias == (kind != "llama") and language[0].mlp_bias == (kind == "llama-biases")
    assert language[0].tokens == backend_for(model).context_length(model)
    dense = space.dense_costs()
    inputs = prompts(model, batch=1)
    with torch.no_grad():  # a generation's prefill: next-token logits only
        counted = counted_flops(lambda: model(**inputs, logits_to_keep=1))
    assert counted == dense["flops/vision"] + dense["flops/language"]
    assert sum(p.numel() for p in model.parameters()) == dense["params/vision"] + dense["params/language"]


def test_the_prompt_length_is_declared_in_the_config():
    model, b = tiny_llava("llama"), backend_for(tiny_llava("llama"))
    assert b.image_tokens(model) == 16 and b.context_length(model) == 16 + 32  # patches, no class token
    model.config.hipp_prompt_tokens = 20
    assert describe(model).tower_layers("language")[0].tokens == 20
    for bad in (8, 20.0, True):
        model.config.hipp_prompt_tokens = bad
        with pytest.raises(HippError, match="hipp_prompt_tokens"):
            b.context_length(model)


@pytest.mark.parametrize("kind", KINDS)
def test_all_open_gates_are_the_dense_model(kind):
    model = tiny_llava(kind)
    inputs = prompts(model)
    before, keys = logits(model, inputs), list(model.state_dict())
    space = make_prunable(model, channel_group=8 if kind == "llama" else 1)
    blocks = backend_for(model).blocks(model)
    assert all(isinstance(b, HFBlock) for b in blocks["vision"])
    assert all(isinstance(b, DecoderBlock) for b in blocks["language"])
    assert list(model.state_dict()) == keys  # transformers' names and order: checkpoints load unchanged
    set_gates(model, *space.all_kept())
    assert torch.equal(logits(model, inputs), before)


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama-biases", "sdpa"),
                                       ("llama", "eager")])
@pytest.mark.parametrize("plan", ["partial_and_dropped", "empty_branches"])
def test_hard_gated_equals_materialised(kind, attn, plan):
    model = tiny_llava(kind)
    model.set_attn_implementation(attn)
    inputs = prompts(model)
    dense = logits(model, inputs)
    space = make_prunable(model, channel_group=8 if kind == "llama" else 1)
    gates = plans(space)[plan]
    with gated(model, gates):
        hard, hard_tokens, hard_steps = logits(model, inputs), generate(model, inputs), decode_by_hand(model, inputs)
    small = materialize(model, *gates)
    assert (hard - dense).abs().max() > 1e-3  # the plan changes the function
    assert torch.allclose(logits(small, inputs), hard, atol=1e-5, rtol=0)
    assert torch.equal(generate(small, inputs), hard_tokens)
    # both plans leave the first decoder layer without attention (dropped, or emptied): the cache's
    # layer 0 is then the first layer that still attends (LlavaBackend.rebind)
    assert torch.allclose(decode_by_hand(small, inputs), hard_steps, atol=1e-5, rtol=0)

    # the smaller model is priced as the plan was, and its decoder layers are plain GQA shapes
    planned = space.costs(gates[0].double(), [h.double() for h in gates[1]], [c.double() for c in gates[2]])
    assert describe(small).dense_costs() == {k: float(v) for k, v in planned.items()}
    for block in backend_for(small).blocks(small)["language"]:
        if isinstance(block, DecoderBlock) and not (block.attn.empty or block.mlp.empty):
            assert_a_transformers_layer(block, small)
    if plan == "partial_and_dropped":
        assert isinstance(small.model.language_model.layers[0], DroppedBlock)
        with torch.no_grad():
            counted = counted_flops(lambda: small(**prompts(small, batch=1), logits_to_keep=1))
        costs = describe(small).dense_costs()
        assert counted == costs["flops/vision"] + costs["flops/language"]


def test_empty_model_rebuilds_a_materialised_llava():
    model = tiny_llava("llama")
    space = make_prunable(model)
    small = materialize(model, *plans(space)["partial_and_dropped"])
    rebuilt = empty_model(small.config.to_dict(), model_structure(small), "llava")
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    inputs = prompts(model)
    # a dropped vision layer still reports its hidden state: LLaVA picks its features by index
    with torch.no_grad():
        states = rebuilt.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    assert isinstance(rebuilt.model.vision_tower.encoder.layers[0], DroppedBlock) and len(states) == 3 + 1
    assert torch.equal(logits(rebuilt.eval(), inputs), logits(small, inputs))
    assert torch.equal(generate(rebuilt, inputs, 4), generate(small, inputs, 4))


def test_a_controller_over_both_stages_saves_and_loads(tmp_path):
    space = describe(tiny_llava("qwen2"))
    c = Controller(space, hidden=16)
    c.save(tmp_path / "c", fingerprint="llava-tiny")
    assert load_controller(tmp_path / "c").space == space
    plan = c.plan("1,1,1,1")
    assert [len(h) for h in plan.head_keep][-1] == 2  # one gate per key/value group
    cfg = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    for bad in (0, True):  # decoder fields are whole numbers, a group holds a query head at least
        cfg["space"]["layers"][-1]["group_size"] = bad
        (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(cfg))
        with pytest.raises(HippError, match="group_size"):
            load_controller(tmp_path / "c")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-biases"])
def test_owned_weights_are_what_removing_a_unit_removes(kind):
    """owned_l1 of a key/value group (or channel) is the L1 norm of the weights that slicing it away
    removes, so magnitude-scored baselines (magnitude, uniform) price decoder units as they price CLIP's."""
    from hipp.baselines import make_plan

    model = tiny_llava(kind)
    space = make_prunable(model)
    l1 = lambda m: sum(p.detach().abs().sum().item() for n, p in m.named_parameters() if n.endswith("weight"))  # noqa: E731
    for block in backend_for(model).blocks(model)["language"]:
        attn, mlp = block.attn, block.mlp
        for u in range(attn.units):
            rest = attn.keep_heads(torch.tensor([i for i in range(attn.units) if i != u]))
            assert attn.owned_l1()[u].item() == pytest.approx(l1(attn) - l1(rest), rel=1e-5)
        for c in (0, mlp.hidden - 1):
            rest = mlp.keep_channels(torch.tensor([i for i in range(mlp.hidden) if i != c]))
            assert mlp.owned_l1()[c].item() == pytest.approx(l1(mlp) - l1(rest), rel=1e-5)
    for method in ("magnitude", "uniform"):
        plan = make_plan(method, model, space, 0.6)
        assert 0.55 <= plan.costs()["flops_ratio"] <= 0.6
