"""Materialisation: the smaller model equals the hard-gated one, costs match the flop counter,
the structure rebuilds it from JSON + safetensors, and FLAP-style compensation does what it says."""
import copy

import pytest
import torch

from hipp.backends import clear_gates, make_prunable, set_gates, tower_blocks
from hipp.errors import HippError
from hipp.storage.fileio import load_tensors, save_tensors
from hipp.export.slicing import (compensate_bias, empty_model, layer_plans, materialize, model_structure,
                              structure)
from hipp.backends.modules import DroppedBlock
from hipp.backends.open_clip import PrunableBlock
from conftest import counted_flops
from test_modules import CUSTOM, TINY, build, embeddings, inputs, random_gates, vitb32  # noqa: F401


def tiny_plans(space):
    """Plans over TINY (3 image + 3 text layers, 4 heads, 256 channels) covering the edge cases."""
    n = len(space.layers)
    layers, heads, chans = space.all_kept()
    out = {"all_kept": (layers, heads, chans), "random": random_gates(space, 11)}
    lk, hk, ck = random_gates(space, 12)
    lk = torch.ones(n)
    lk[0] = lk[3] = lk[5] = 0  # first layer of both towers (get_cast_dtype asks block 0) and the last text one
    out["drop_layers"] = (lk, hk, ck)
    lk, hk, ck = random_gates(space, 13)
    lk = torch.ones(n)
    hk[1] = torch.zeros_like(hk[1])                    # image layer 1: no heads
    ck[3] = torch.zeros_like(ck[3])                    # text layer 0: no channels
    hk[4], ck[4] = torch.zeros_like(hk[4]), torch.zeros_like(ck[4])  # text layer 1: both branches empty
    out["empty_branches"] = (lk, hk, ck)
    out["nothing_left"] = (torch.zeros(n), heads, chans)
    return out


def check_plan(model, space, plan, batch=2, atol=1e-4, params=True):
    """Hard-gated vs materialised embeddings; flop counter and parameter count vs space.costs."""
    x = inputs(model, batch=batch)
    set_gates(model, *plan)
    gated = embeddings(model, *x)
    clear_gates(model)
    small = materialize(model, *plan).eval()
    for a, b in zip(embeddings(small, *x), gated):
        assert (a - b).abs().max().item() <= atol
    costs = space.costs(plan[0].double(), [h.double() for h in plan[1]], [c.double() for c in plan[2]])
    with torch.no_grad():
        assert counted_flops(small.encode_image, x[0]) == batch * float(costs["flops/image"])
        assert counted_flops(small.encode_text, x[1]) == batch * float(costs["flops/text"])
    if params:  # (costs leave LayerScale out, so configs with it skip this)
        assert sum(p.numel() for p in small.parameters()) == float(costs["params/image"] + costs["params/text"])
    assert model_structure(small) == structure(space, *plan)
    return small, x


@pytest.mark.parametrize("name", ["all_kept", "random", "drop_layers", "empty_branches", "nothing_left"])
def test_tiny_plans_match_gated_costs_and_structure(name):
    model = build(TINY)
    space = make_prunable(model)
    plan = tiny_plans(space)[name]
    small, _ = check_plan(model, space, plan)
    kinds = [type(b) for bl in tower_blocks(small).values() for b in bl]
    assert kinds == [PrunableBlock if k else DroppedBlock for k in plan[0].tolist()]


def test_grouped_channels_with_a_short_last_group():
    model = build(TINY)
    space = make_prunable(model, channel_group=24)  # 256 = 10 * 24 + 16
    check_plan(model, space, random_gates(space, 21))


def test_custom_text_clip_with_class_token_and_layer_scale():
    model = build(CUSTOM)
    space = make_prunable(model)
    lk, hk, ck = random_gates(space, 31)
    lk = torch.tensor([1.0, 1.0, 1.0, 1.0])
    hk[2] = torch.tensor([1.0, 0.0])  # a text layer with one head left: the 3-D mask must follow
    check_plan(model, space, (lk, hk, ck), batch=3, params=False)


def test_vit_b_32_plan(vitb32):  # noqa: F811
    model = copy.deepcopy(vitb32)
    space = make_prunable(model)
    lk, hk, ck = random_gates(space, 41)
    lk = torch.ones(len(space.layers))
    lk[3] = lk[12] = 0                      # image layer 3, text layer 0
    hk[5] = torch.zeros_like(hk[5])        # image layer 5: no heads
    ck[19] = torch.zeros_like(ck[19])      # text layer 7: no channels
    check_plan(model, space, (lk, hk, ck))


def test_materialize_leaves_the_model_alone_and_accepts_an_unswapped_one():
    original = build(TINY)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    model = copy.deepcopy(original)
    space = make_prunable(model)
    plan = tiny_plans(space)["random"]
    soft = plan[0].clone().requires_grad_()
    set_gates(model, soft * 1.0, *plan[1:])  # non-leaf gates left on (deepcopy refuses those): still fine
    from_prunable = materialize(model, *plan)
    from_plain = materialize(original, *plan)
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert not any(isinstance(b, PrunableBlock) for b in original.visual.transformer.resblocks)
    x = inputs(model)
    for a, b in zip(embeddings(from_prunable, *x), embeddings(from_plain, *x)):
        assert torch.equal(a, b)
    shared = {p.data_ptr() for p in original.parameters()}
    assert not any(p.data_ptr() in shared for p in from_plain.parameters())


def test_bad_plans_are_hipp_errors():
    model = build(TINY)
    space = make_prunable(model)
    lk, hk, ck = space.all_kept()
    with pytest.raises(HippError, match="hard 0/1"):
        materialize(model, lk * 0.5, hk, ck)
    with pytest.raises(HippError, match="1-D"):
        materialize(model, lk[None], hk, ck)
    with pytest.raises(HippError, match="cover"):
        materialize(model, lk[:-1], hk[:-1], ck[:-1])
    with pytest.raises(HippError, match="head_keep"):
        materialize(model, lk, [h[:-1] for h in hk], ck)
    with pytest.raises(HippError, match="channel gates"):
        materialize(model, lk, hk, [c[:-1] for c in ck])


def test_layer_plans_apply_channel_groups():
    model = build(TINY)
    space = make_prunable(model, channel_group=100)  # groups 0-99, 100-199, 200-255
    lk, hk, ck = space.all_kept()
    ck = [torch.tensor([0.0, 1.0, 1.0])] * len(ck)
    hk = [torch.tensor([1.0, 0.0, 0.0, 1.0])] * len(hk)
    p = layer_plans(model, lk, hk, ck)[0]
    assert p.heads.tolist() == [0, 3] and p.channels.tolist() == list(range(100, 256))


@pytest.mark.parametrize("cfg", [TINY, CUSTOM], ids=["clip", "custom_text"])
def test_export_round_trip_through_safetensors_and_structure(cfg, tmp_path):
    model = build(cfg)
    space = make_prunable(model)
    lk, hk, ck = random_gates(space, 51)
    lk[0] = 0
    small = materialize(model, lk, hk, ck).eval()
    save_tensors(tmp_path / "model.safetensors", small.state_dict())
    rebuilt = empty_model(cfg, structure(space, lk, hk, ck)).eval()
    rebuilt.load_state_dict(load_tensors(tmp_path / "model.safetensors"), strict=True)
    x = inputs(model)
    for a, b in zip(embeddings(rebuilt, *x), embeddings(small, *x)):
        assert torch.equal(a, b)


def test_empty_model_rejects_bad_structures():
    model = build(TINY)
    struct = model_structure(model)
    with pytest.raises(HippError, match="3 text layers"):
        empty_model(TINY, {**struct, "text": struct["text"][:2]})
    too_big = copy.deepcopy(struct)
    too_big["image"][0]["heads"] = 5
    with pytest.raises(HippError, match="larger"):
        empty_model(TINY, too_big)
    with pytest.raises(HippError, match="kept / heads / channels"):
        empty_model(TINY, {**struct, "image": [{}] * 3})
    with pytest.raises(HippError, match="model_cfg key 'bogus' is not one HiPP builds"):
        empty_model({**TINY, "bogus": 1}, struct)


# --- FLAP-style bias compensation ---

def _branch_outputs(model, tower, branch, x):
    """The last block's attn or mlp output in `tower`, captured by a forward hook."""
    seen = []
    module = getattr(tower_blocks(model)[tower][-1], branch)
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model.encode_image(x[0]) if tower == "image" else model.encode_text(x[1])
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_compensation_removes_the_mean_error_of_a_pruned_branch(branch):
    """Prune only the last layer of each tower: its input is then the dense one, so after
    compensation the branch's error against the dense model has zero mean over the calibration set."""
    model = build(TINY)
    space = make_prunable(model)
    lk, hk, ck = space.all_kept()
    for i in (2, 5):  # last image layer, last text layer
        if branch == "attn":
            hk[i] = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        else:
            ck[i] = (torch.arange(256) % 3 == 0).double()
    x = inputs(model, batch=6, seed=3)
    set_gates(model, lk, hk, ck)
    gates_before = [(b.layer_gate, b.attn.head_gate, b.mlp.channel_gate)
                    for bl in tower_blocks(model).values() for b in bl]
    plain = materialize(model, lk, hk, ck)
    fixed = compensate_bias(model, lk, hk, ck, images=x[0], texts=x[1], batch_size=4)
    assert [(b.layer_gate, b.attn.head_gate, b.mlp.channel_gate)
            for bl in tower_blocks(model).values() for b in bl] == gates_before
    clear_gates(model)
    for tower in ("image", "text"):
        dense = _branch_outputs(model, tower, branch, x)
        err_plain = (_branch_outputs(plain, tower, branch, x) - dense).mean(dim=(0, 1))
        err_fixed = (_branch_outputs(fixed, tower, branch, x) - dense).mean(dim=(0, 1))
        assert err_fixed.abs().max() < 1e-5
        assert err_plain.abs().max() > 1e-3


def test_compensation_without_calibration_data_is_plain_materialize():
    model = build(TINY)
    space = make_prunable(model)
    plan = tiny_plans(space)["random"]
    x = inputs(model)
    a = embeddings(materialize(model, *plan), *x)
    b = embeddings(compensate_bias(model, *plan), *x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(HippError, match="make_prunable"):
        compensate_bias(build(TINY), *plan)
