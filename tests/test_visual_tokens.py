"""Visual tokens as a plan level on a LLaVA: exact costs with the quadratic attention term, the
class-token ranking, hard-gated equals materialised (logits, greedy generations, a hand-written
decode loop), exports that prune their tokens themselves after a reload, and bad budgets in one line."""
import pytest
import torch

from hipp.backends import backend_for, describe, gated, llava_tokens, make_prunable, visual_tokens
from hipp.backends.visual_tokens import VisualTokens, pruning
from hipp.core.plan import Plan
from hipp.core.space import TokenLevel
from hipp.errors import HippError
from hipp.export.slicing import materialize
from conftest import counted_flops
from test_llava import decode_by_hand, generate, logits, plans, prompts, tiny_llava
from test_query import tiny_controller_dir  # noqa: F401  (a fixture)


def token_plan(space, gates, kept: int) -> Plan:
    return Plan.from_gates(space, gates, token_keep=[kept])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_token_level_is_priced_as_the_flop_counter_counts_the_pruned_model(kind):
    """Every language layer processes the kept image tokens plus the text; the projector runs on the
    kept tokens; the class-token row of the rank layer is paid when tokens go. Exact, per stage."""
    model = tiny_llava(kind)
    space = make_prunable(model, tokens="cls")
    level = space.tokens[0]
    image = backend_for(model).image_tokens(model)
    assert (level.stage, level.tokens, level.rank_stage) == ("language", image, "vision")
    assert level.rank_layer == (1 if kind == "llama" else 2)  # the layer whose output is the feature
    gates = plans(space)["partial_and_dropped"]
    for kept in (1, 5, image):
        plan = token_plan(space, gates, kept)
        small = materialize(model, plan)
        assert (visual_tokens.installed(small) is None) == (kept == image)
        with torch.no_grad():
            counted = counted_flops(lambda: small(**prompts(small, batch=1), logits_to_keep=1))
        c = plan.costs()
        assert counted == c["flops/vision"] + c["flops/language"]
        assert describe(small).dense_costs()["flops/language"] == c["flops/language"]
    full = token_plan(space, space.all_kept(), image).costs()
    assert full["flops_ratio"] == 1.0 and full["flops"] == sum(describe(model).dense_costs()[f"flops/{t}"]
                                                              for t in space.stages)


def test_soft_token_counts_are_differentiable_and_match_whole_ones():
    model = tiny_llava("llama")
    space = make_prunable(model, tokens="cls")
    keep = torch.tensor([7.0], dtype=torch.float64, requires_grad=True)
    soft = space.costs(*space.all_kept(), keep)["flops/language"]
    soft.backward()
    assert float(keep.grad) > 0  # more tokens cost more
    hard = space.costs(*space.all_kept(), torch.tensor([7.0], dtype=torch.float64))["flops/language"]
    assert float(soft.detach()) == float(hard)
    spec = space.tower_layers("language")[0]
    t = spec.tokens - (space.tokens[0].tokens - 7)
    head, chan = spec.unit_flops_at(t)
    assert head == spec.block_cost.attention.unit_flops(t) and chan == spec.block_cost.mlp.unit_flops(t)


@pytest.mark.parametrize("kind,plan", [("llama", "partial_and_dropped"), ("qwen2", "partial_and_dropped"),
                                       ("llama", "empty_branches")])
def test_hard_gated_equals_materialised_with_tokens_pruned(kind, plan):
    model = tiny_llava(kind)
    inputs = prompts(model)
    space = make_prunable(model, channel_group=8 if kind == "llama" else 1, tokens="cls")
    gates = plans(space)[plan]
    weights_only = materialize(model, Plan.from_gates(space, gates))
    p = token_plan(space, gates, 6)
    with gated(model, p.gates), pruning(model, visual_tokens.for_plan(p)):
        hard, hard_tokens, hard_steps = logits(model, inputs), generate(model, inputs), decode_by_hand(model, inputs)
    assert visual_tokens.installed(model) is None  # the block leaves the model as it was
    small = materialize(model, p)
    got = logits(small, inputs)
    assert got.shape[1] == inputs["input_ids"].shape[1] - (space.tokens[0].tokens - 6)  # a shorter prompt
    assert torch.allclose(got, hard, atol=1e-5, rtol=0)
    assert torch.equal(generate(small, inputs), hard_tokens)
    assert torch.allclose(decode_by_hand(small, inputs), hard_steps, atol=1e-5, rtol=0)
    assert (got[:, -1] - logits(weights_only, inputs)[:, -1]).abs().max() > 1e-4  # the tokens matter


def test_the_ranking_keeps_the_tokens_the_class_token_attends_to_most():
    model = tiny_llava("llama")
    space = make_prunable(model, tokens="cls")
    level = space.tokens[0]
    spec = VisualTokens(4, level.tokens, level.rank_layer)
    inputs = prompts(model, batch=2)
    attn = backend_for(model).blocks(model)["vision"][level.rank_layer].attn
    with torch.no_grad(), visual_tokens.recording(attn) as rows:
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, return_dict=True)
    scores = rows[0].softmax(-1).sum(1)[:, 1:]  # every head, the class token's own column left out
    chosen = scores.topk(4, -1).indices.sort(-1).values
    with torch.no_grad():
        features = visual_tokens.select_features(model, inputs["pixel_values"], spec)
        hidden = out.hidden_states[-2][:, 1:]
        expected = model.model.multi_modal_projector(hidden.gather(1, chosen[..., None].expand(-1, -1, hidden.shape[-1])))
    assert torch.allclose(features, expected, atol=1e-6)
    assert not torch.equal(chosen[0], torch.arange(4))  # not simply the first tokens


def test_a_plan_without_the_rank_layer_keeps_evenly_spaced_tokens():
    model = tiny_llava("llama")
    space = make_prunable(model, tokens="cls")
    level = space.tokens[0]
    layer_keep, heads, chans = space.all_kept()
    layer_keep[level.rank_layer] = 0.0  # vision layers come first in the space
    p = token_plan(space, (layer_keep, heads, chans), 4)
    inputs = prompts(model)
    with gated(model, p.gates), pruning(model, visual_tokens.for_plan(p)):
        hard = logits(model, inputs)
    small = materialize(model, p)
    assert torch.allclose(logits(small, inputs), hard, atol=1e-5, rtol=0)
    assert llava_tokens.rank_attention(small, level.rank_layer) is None
    assert visual_tokens.choose(None, 1, 16, 4, "cpu").tolist() == [[2, 6, 10, 14]]
    with torch.no_grad():
        counted = counted_flops(lambda: small(**prompts(small, batch=1), logits_to_keep=1))
    assert counted == p.costs()["flops/vision"] + p.costs()["flops/language"]


def test_plans_with_tokens_round_trip_and_bad_counts_are_one_line(tmp_path):
    model = tiny_llava("llama")
    space = make_prunable(model, tokens="cls")
    p = token_plan(space, space.all_kept(), 3)
    p.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back == p and back.summary()["language"]["tokens_kept"] == 3
    assert p.mask_key() != token_plan(space, space.all_kept(), 4).mask_key()
    for bad in (0, 17, 2.5):
        with pytest.raises(HippError, match="whole number from 1 to 16"):
            token_plan(space, space.all_kept(), bad)
    plain = describe(model)
    assert Plan.dense(plain).summary()["language"].get("tokens_kept") is None
    with pytest.raises(HippError, match="its space has 0"):
        Plan.from_gates(plain, plain.all_kept(), token_keep=[3])
    with pytest.raises(HippError, match="no token level"):
        from test_hf_backend import tiny_hf  # SigLIP: no class token to rank by
        describe(tiny_hf("siglip"), tokens=True)
    with pytest.raises(HippError, match="whole number"):
        VisualTokens(0, 16, 1)
    assert TokenLevel(**space.tokens[0].to_dict()) == space.tokens[0]


# --- inside a LLaVA's language model (FastV-style: the text rule) ---

def padded(model):
    """Two prompts, the first left-padded by one position (its mask's zero)."""
    inputs = prompts(model)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][0, 0] = 0
    return inputs


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_text_rule_is_priced_exactly_and_hard_gated_equals_materialised(kind):
    """Layers up to K see every token, later ones the text and the kept image tokens; the plans drop
    language layer 0 (then the rank layer: evenly spaced tokens, and the first cache layer is a
    shorter one) or empty branches. Logits keep the prompt's length; padded generations and a
    hand-written decode loop (positions from the cache) agree token for token."""
    from hipp.backends import decoder_tokens
    from hipp.query.tokens import token_level
    model = tiny_llava(kind)
    assert token_level(model).rule == "text" and token_level(model).after == 1  # a llava's default
    level = decoder_tokens.level(model, after=0)
    assert (level.after, level.rank_stage, level.rank_layer) == (0, "language", 0)
    space = make_prunable(model).with_tokens(level)
    inputs = padded(model)
    for name in ("partial_and_dropped", "empty_branches", None):
        gates = plans(space)[name] if name else space.all_kept()
        p = token_plan(space, gates, 5)
        with gated(model, p.gates), pruning(model, visual_tokens.for_plan(p)):
            hard, hard_tokens, hard_steps = logits(model, inputs), generate(model, inputs), decode_by_hand(model, inputs)
        small = materialize(model, p)
        assert visual_tokens.installed(small).rule == "text"
        got = logits(small, inputs)
        assert got.shape == hard.shape and got.shape[1] == inputs["input_ids"].shape[1]
        assert torch.allclose(got[:, -1], hard[:, -1], atol=1e-5, rtol=0)
        assert torch.equal(generate(small, inputs), hard_tokens)
        assert torch.allclose(decode_by_hand(small, inputs), hard_steps, atol=1e-5, rtol=0)
        with torch.no_grad():
            counted = counted_flops(lambda: small(**prompts(small, batch=1), logits_to_keep=1))
        c = p.costs()
        assert counted == c["flops/vision"] + c["flops/language"]
        assert describe(small).dense_costs()["flops/language"] == c["flops/language"]
    dense = logits(model, inputs)[:, -1]
    assert (hard[:, -1] - dense).abs().max() > 1e-4  # the tokens matter


def test_the_text_rule_keeps_the_image_tokens_the_last_token_attends_to_most():
    """Layer K's attention row of the prompt's last token, by hand from its input hidden states:
    softmax over the unpadded keys, summed over the query heads; the hooks keep its top k."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from hipp.query.tokens import token_level
    model = tiny_llava("llama")
    make_prunable(model)
    level = token_level(model, "text")
    inputs = padded(model)
    lm = model.model.language_model
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
        layer = lm.layers[level.rank_layer]
        x = layer.input_layernorm(states[level.rank_layer])
        attn, (b, t) = layer.self_attn, x.shape[:2]
        q, k = (p(x).view(b, t, -1, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
        positions = torch.arange(t)[None]
        q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(x, positions))
        k = k.repeat_interleave(attn.num_key_value_groups, 1)
        row = (q[:, :, -1:] @ k.transpose(-1, -2))[:, :, 0] * attn.head_dim ** -0.5
        probs = row.masked_fill(inputs["attention_mask"][:, None] == 0, float("-inf")).softmax(-1).sum(1)
        image = inputs["input_ids"] == model.config.image_token_id
        scores = probs.masked_fill(~image, float("-inf"))
        expected = scores.topk(4, -1).indices.sort(-1).values
        with pruning(model, VisualTokens(4, level.tokens, level.rank_layer, "text")):
            model(**inputs)
            keep = model.hipp_drop_tokens.keep
    got = (keep & image).nonzero()[:, 1].reshape(2, 4)
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])


# --- a CLIP-style image tower (EViT-style: patches kept after a layer) ---

def clip_models(hf_tiny_dir, tiny_model_dir):
    from hipp.storage.checkpoint import load_model
    return {"open_clip": load_model(tiny_model_dir), "hf": load_model(hf_tiny_dir)}


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_a_clip_tower_keeps_the_patches_its_class_token_attends_to(family, hf_tiny_dir, tiny_model_dir):
    """After layer `after` only the class token and the kept patches go on: hard-gated equals
    materialised, the materialised model is priced as the flop counter counts it, the level is in
    the space, and fewer tokens change the embedding."""
    model = clip_models(hf_tiny_dir, tiny_model_dir)[family]
    space = make_prunable(model, tokens=True)
    level = space.tokens[0]
    assert (level.stage, level.tokens, level.after, level.rank_layer) == ("image", 16, 0, 0)
    layer_keep, heads, chans = space.all_kept()
    heads[0][1] = 0.0  # the rank layer loses a head: the ranking reads the kept ones only
    chans[1][: len(chans[1]) // 2] = 0.0
    plan = Plan.from_gates(space, (layer_keep, heads, chans), token_keep=[5])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), gated(model, plan.gates), pruning(model, visual_tokens.for_plan(plan)):
        hard = model.encode_image(images)
    small = materialize(model, plan)
    with torch.no_grad():
        got, weights_only = small.encode_image(images), materialize(model, Plan.from_gates(space, plan.gates)).encode_image(images)
        counted = counted_flops(lambda: small.encode_image(images[:1]))
    assert torch.allclose(got, hard, atol=1e-5, rtol=0)
    assert (got - weights_only).abs().max() > 1e-3
    assert counted == plan.costs()["flops/image"] == describe(small).dense_costs()["flops/image"]


def test_a_clip_export_with_tokens_reloads_pruning_them(tiny_controller_dir, tmp_path, capsys):
    import json

    from hipp import load_model
    from hipp.cli.main import main
    from hipp.query.bound import load_base
    from hipp.controller.files import load_controller
    assert main(["export", "--controller", str(tiny_controller_dir), "--max-flops", "0.6", "--visual-tokens", "0.5",
                 "--candidates", "2", "--calib-images", "8", "--out", str(tmp_path / "e"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"]["tokens_kept"] == 8 and 0.58 <= out["flops_ratio"] <= 0.6
    config = json.loads((tmp_path / "e" / "pruned_config.json").read_text())
    assert config["visual_tokens"]["stage"] == "image" and config["visual_tokens"]["kept"] == 8
    plan = Plan.from_dict(config["plan"])
    model = load_model(tmp_path / "e")
    base = load_base(load_controller(tiny_controller_dir), tiny_controller_dir, None, "cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), gated(base.model, plan.gates), pruning(base.model, visual_tokens.for_plan(plan)):
        hard = base.model.encode_image(images)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), hard, atol=1e-5, rtol=0)
    assert describe(model).dense_costs()["flops/image"] == plan.costs()["flops/image"]


def test_a_malformed_token_budget_in_an_export_is_one_line(tiny_controller_dir, tmp_path, capsys):
    import json
    import shutil

    from hipp.cli.main import main
    from hipp.storage.checkpoint import load_model
    assert main(["export", "--controller", str(tiny_controller_dir), "--max-flops", "0.6", "--visual-tokens", "0.5",
                 "--candidates", "1", "--calib-images", "8", "--out", str(tmp_path / "e")]) == 0
    for name, change, needle in (("layer", "x", "whole numbers"), ("stage", "language", "sets language tokens"),
                                 ("kept", 99, "from 1 to 16"), ("rule", "fastv", "unknown visual-token rule")):
        bad = tmp_path / name
        shutil.copytree(tmp_path / "e", bad)
        config = json.loads((bad / "pruned_config.json").read_text())
        config["visual_tokens"][name] = change
        (bad / "pruned_config.json").write_text(json.dumps(config))
        with pytest.raises(HippError, match=needle):
            load_model(bad)


def test_bench_sets_the_joint_plan_against_weights_only(tiny_controller_dir, tmp_path, capsys):
    import json

    from hipp.cli.main import main
    assert main(["bench", "--controller", str(tiny_controller_dir), "--budgets", "0.6", "--methods", "uniform",
                 "--visual-tokens", "0.5", "--candidates", "1", "--calib-images", "8", "--test-items", "50",
                 "--out", str(tmp_path / "b"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["results"]}
    assert {"uniform", "hipp", "hipp+tokens"} <= set(rows)
    assert rows["hipp+tokens"]["seeds"][0]["tokens"] == ["8/16"] and rows["hipp"]["seeds"][0]["tokens"] == []
    margin = result["margins"]["hipp+tokens"]["0.6"]
    assert margin["vs_hipp"] == pytest.approx(rows["hipp+tokens"]["utility"] - rows["hipp"]["utility"])
    assert margin["se"]["vs_hipp"] >= 0
    tokens_only = rows.get("tokens")  # every weight kept: reached, or refused with its reason
    assert tokens_only is not None and tokens_only["flops_ratio"] <= 0.6 or \
        any(f["method"] == "tokens" and "tokens alone cannot reach" in f["error"] for f in result["failures"])
    assert "- hipp+tokens @0.6 keeps 8/16 image tokens" in (tmp_path / "b" / "bench.md").read_text()


def test_a_token_count_whose_smallest_plan_is_over_the_bound_is_skipped_not_fatal():
    """At a FLOPs bound of 0.015 only a plan with few image tokens fits at all (the projector and the
    language model's prompt cost too much with all 16): the search keeps the counts that fit."""
    from hipp.controller.network import Controller
    from hipp.query.bound import bound_candidates
    model = tiny_llava("llama")
    space = make_prunable(model, 8)
    level = make_prunable(model, 8, tokens="cls").tokens[0]
    controller = Controller(space, ["utility", "flops"], hidden=8, rank=2, depth=1)
    found = bound_candidates(controller, max_flops=0.015, n_rank=2, tokens=(level, [16, 8, 1]))
    assert found and {int(c.plan.token_keep[0]) for c in found} <= {8, 1}
    assert all(c.plan.costs()["flops_ratio"] <= 0.015 for c in found)
    with pytest.raises(HippError, match="no plan meets max_flops=0.005"):
        bound_candidates(controller, max_flops=0.005, n_rank=2, tokens=(level, [16, 8]))
