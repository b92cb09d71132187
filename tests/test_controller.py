import json
import math
import os

import pytest
import torch

from hipp.controller.network import CONFIG_NAME, WEIGHTS_NAME, Controller, prunable_params
from hipp.controller.files import load_controller
from hipp.errors import HippError
from hipp.training.objectives import expected_cost_ratios
from hipp.core.plan import Plan
from hipp.core.preference import sample_dirichlet, simplex_grid, sweep
from hipp.core.space import LayerSpec, PruneSpace

NAMES = ["utility", "grounding", "flops", "params"]
FP = "0123456789abcdef"  # a saved controller names its base model's weights fingerprint


def small_space() -> PruneSpace:
    layers = (LayerSpec("image", 0, 16, 4, 4, 32, 5), LayerSpec("image", 1, 16, 4, 4, 32, 5),
              LayerSpec("text", 0, 8, 2, 4, 24, 6, channel_group=5), LayerSpec("text", 1, 8, 2, 4, 24, 6))
    return PruneSpace(layers, {"image": 100.0, "text": 50.0}, {"image": 10.0, "text": 20.0})


def scrambled(controller: Controller, seed: int = 0) -> Controller:
    """Random weights everywhere, so plans depend on the preference and are not all-dense."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return controller


def test_logit_shapes_follow_the_space():
    space = small_space()
    c = Controller(space, NAMES, hidden=16, rank=4)
    layer, heads, chans = c(torch.full((3, 4), 0.25))
    assert layer.shape == (3, 4)
    assert [h.shape for h in heads] == [(3, 4), (3, 4), (3, 2), (3, 2)]
    assert [x.shape for x in chans] == [(3, 32), (3, 32), (3, 5), (3, 24)]
    single = c(torch.full((4,), 0.25))
    assert single[0].shape == (4,) and single[2][2].shape == (5,)
    with pytest.raises(HippError, match=r"shape \[B, 4\]"):
        c(torch.ones(2, 3))


def test_starts_near_dense_for_every_preference():
    c = Controller(small_space(), NAMES, hidden=16, rank=4, init_bias=3.0)
    prefs = simplex_grid(4, divisions=3)
    layer, heads, chans = c.keep_probs(prefs)
    for x in [layer, *heads, *chans]:
        assert torch.allclose(x, torch.full_like(x, torch.sigmoid(torch.tensor(3.0)).item()))
    for p in prefs[:5]:
        s = c.plan(p).summary()
        assert s["flops_ratio"] == 1.0 and s["params_ratio"] == 1.0


def test_plan_is_deterministic_and_depends_on_preference():
    c = scrambled(Controller(small_space(), NAMES, hidden=16, rank=4))
    a, b = c.plan("utility=1,flops=1"), c.plan({"flops": 0.5, "utility": 0.5})
    assert a == b and a.summary() == b.summary()
    plans = {json.dumps(c.plan(p).to_dict()["layers"]) for p in simplex_grid(4, divisions=2)}
    assert len(plans) > 1


def test_plan_accepts_every_preference_form_and_rejects_bad_ones():
    c = scrambled(Controller(small_space(), NAMES, hidden=16, rank=4))
    want = c.plan("utility=3,params=1")
    assert c.plan([3, 0, 0, 1]) == want and c.plan(torch.tensor([0.75, 0, 0, 0.25])) == want
    assert want.preference == pytest.approx({"utility": 0.75, "grounding": 0.0, "flops": 0.0, "params": 0.25})
    with pytest.raises(HippError, match="unknown objective 'speed'"):
        c.plan("speed=1")


def test_hierarchy_in_plans_a_dropped_layer_keeps_nothing():
    c = Controller(small_space(), NAMES, hidden=16, rank=4)
    with torch.no_grad():
        c.bias["image_layer"][1] = -5.0  # drop image layer 1; its head / channel logits stay +3
    plan = c.plan("utility=1")
    assert plan.layer_keep.tolist() == [1, 0, 1, 1]
    assert plan.head_keep[1].sum() == 0 and plan.channel_keep[1].sum() == 0
    s = plan.summary()
    assert s["image"]["layers_kept"] == [True, False]
    assert s["image"]["heads_kept"] == [4, 0] and s["image"]["channels_kept"] == [32, 0]
    assert s["text"]["channels_kept"] == [24, 24]  # groups of 5 expanded back to channels
    assert s["image"]["flops_ratio"] < 1.0 and s["text"]["flops_ratio"] == 1.0
    assert 0 < s["flops_ratio"] < 1.0 and 0 < s["params_ratio"] < 1.0


def test_every_parameter_learns_after_one_step():
    # Preference-dependent outputs start at zero, so the trunk gets gradient only from step 2 on.
    space = small_space()
    c = Controller(space, NAMES, hidden=16, rank=4)
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    pref = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    for _ in range(2):
        opt.zero_grad()
        gates = c.sample(pref, 0.5, torch.Generator().manual_seed(0))
        loss = expected_cost_ratios(space, c.keep_probs(pref))["flops"].sum() + sum(h.sum() for h in gates[1])
        loss.backward()
        opt.step()
    for name, p in c.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def train_toy(seed: int = 0) -> Controller:
    """A 2-objective toy: utility charges the share of units dropped, flops their expected cost."""
    space = small_space()
    torch.manual_seed(seed)
    c = Controller(space, ["utility", "flops"], hidden=32, rank=8)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(c.parameters(), lr=0.03)
    for step in range(150):
        pref = sample_dirichlet(16, 1.0, 2, generator=g)
        layer, heads, chans = c.keep_probs(pref)
        lost = (1 - layer).mean(-1) + torch.stack([(1 - h).mean(-1) for h in heads]).mean(0) \
            + torch.stack([(1 - x).mean(-1) for x in chans]).mean(0)
        flops = expected_cost_ratios(space, (layer, heads, chans))["flops"]
        loss = (pref[:, 0] * lost + pref[:, 1] * flops).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return c


@pytest.fixture(scope="module")
def toy():
    return train_toy()


def test_controller_learns_preference_dependent_plans(toy):
    ratios = [toy.plan(p).summary()["flops_ratio"] for p in sweep(["utility", "flops"], "utility", "flops", 6)]
    assert ratios[0] > 0.9 and ratios[-1] < 0.5
    assert all(a >= b for a, b in zip(ratios, ratios[1:])), ratios


def test_plan_within_a_budget(toy):
    half = toy.plan_within(max_flops=0.5)
    assert half.summary()["flops_ratio"] <= 0.5 and half.meta == {"max_flops": 0.5}
    assert toy.plan_within(max_flops=1.0).summary()["flops_ratio"] == 1.0
    with pytest.raises(HippError, match="no preference from utility to flops meets the budget"):
        toy.plan_within(max_flops=1e-6)
    with pytest.raises(HippError, match=r"max_flops must be a ratio in \(0, 1\], got 1.5"):
        toy.plan_within(max_flops=1.5)
    with pytest.raises(HippError, match="no 'params' objective"):
        toy.plan_within(max_params=0.5)


def test_size_ratio_on_open_clip_vit_b_32():
    open_clip = pytest.importorskip("open_clip")
    from hipp.backends import describe
    model = open_clip.create_model("ViT-B-32")
    space = describe(model)
    c = Controller(space, NAMES)
    ratio = c.size_ratio()
    print(f"\ncontroller params {c.num_parameters():,} / prunable VLM params {prunable_params(space):,.0f} "
          f"= {ratio:.4f} (ViT-B-32)")
    assert prunable_params(space) > 0.8 * sum(p.numel() for p in model.parameters())
    assert ratio <= 0.05


def test_save_load_round_trip_gives_identical_plans(tmp_path):
    c = scrambled(Controller(small_space(), NAMES, hidden=16, rank=4, factorised=True))
    c.save(tmp_path, fingerprint="tiny-v1", extra={"steps": 7})
    assert sorted(os.listdir(tmp_path)) == sorted([WEIGHTS_NAME, CONFIG_NAME])  # no temp files left over
    d = load_controller(tmp_path)
    assert d.fingerprint == "tiny-v1" and d.extra == {"steps": 7} and d.objective_names == NAMES
    for p in simplex_grid(4, divisions=3):
        assert c.plan(p) == d.plan(p)
    assert load_controller(tmp_path, fingerprint="tiny-v1").hparams == c.hparams
    with pytest.raises(HippError, match="trained for base model 'tiny-v1', not 'other'"):
        load_controller(tmp_path, fingerprint="other")


def test_a_controller_without_a_fingerprint_is_neither_saved_nor_loaded(tmp_path):
    c = Controller(small_space(), NAMES, hidden=8, rank=2)
    with pytest.raises(HippError, match="weights fingerprint of its base model"):
        c.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()
    c.save(tmp_path / "c", fingerprint=FP)
    cfg = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    for bad in ("", None, 7):
        (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps({**cfg, "fingerprint": bad}))
        with pytest.raises(HippError, match="a controller must say which base model"):
            load_controller(tmp_path / "c")


def test_unfactorised_controller_round_trips(tmp_path):
    c = scrambled(Controller(small_space(), NAMES, hidden=8, rank=2, depth=1, factorised=False))
    c.save(tmp_path, fingerprint=FP)
    assert load_controller(tmp_path).plan("1,1,1,1") == c.plan("1,1,1,1")


def test_quality_biases_let_the_split_reorder_units_and_round_trip(tmp_path):
    c = Controller(small_space(), NAMES, hidden=8, rank=2, quality_biases=True)
    layer, heads, _ = c(torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(layer, torch.full_like(layer, 3.0))  # every split starts at the dense model
    with torch.no_grad():  # utility's bias keeps image head 0 and drops head 1; grounding's the other way
        c.bias["image_head"][0, :2] = torch.tensor([5.0, -5.0])
        c.bias["image_head"][1, :2] = torch.tensor([-5.0, 5.0])
    first = lambda pref: c.plan(pref).head_keep[0][:2].tolist()  # noqa: E731
    assert first("utility=1") == [True, False] and first("grounding=1") == [False, True]
    assert first("utility=0.5,grounding=0.5,flops=1") == [False, False]  # an even mix: both logits 0
    # the split ignores the cost weights: the same quality ratio mixes the same biases
    split = c.quality_split(torch.tensor([[0.6, 0.2, 0.2, 0.0], [0.3, 0.1, 0.1, 0.5]]))
    assert torch.allclose(split[0], split[1], atol=1e-3) and torch.allclose(split.sum(-1), torch.ones(2))
    c.save(tmp_path, fingerprint=FP)
    back = load_controller(tmp_path)
    assert back.hparams["quality_biases"] and back.plan("0.2,0.5,0.3,0") == c.plan("0.2,0.5,0.3,0")
    with pytest.raises(HippError, match="two or more quality objectives"):
        Controller(small_space(), ["utility", "flops"], hidden=8, rank=2, quality_biases=True)


def _saved(tmp_path):
    Controller(small_space(), NAMES, hidden=8, rank=2).save(tmp_path, fingerprint=FP)
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10), "not a readable safetensors file"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), "missing weights file"),
    (lambda d: (d / CONFIG_NAME).write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / CONFIG_NAME).unlink(), "has no controller.json"),
    (lambda d: (d / CONFIG_NAME).write_text('{"format": "something-else"}'), "is not a HiPP controller"),
])
def test_damaged_controller_files_raise_hipp_error(tmp_path, damage, message):
    d = _saved(tmp_path)
    damage(d)
    with pytest.raises(HippError, match=message):
        load_controller(d)


def test_weights_that_do_not_match_the_config_raise_hipp_error(tmp_path):
    d = _saved(tmp_path / "a")
    Controller(small_space(), NAMES, hidden=8, rank=3).save(tmp_path / "b", fingerprint=FP)
    (tmp_path / "b" / WEIGHTS_NAME).replace(d / WEIGHTS_NAME)
    with pytest.raises(HippError, match="has shape"):
        load_controller(d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["hparams"]["factorised"] = False
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(HippError, match="does not match controller.json"):
        load_controller(d)
    with pytest.raises(HippError, match="controller folder not found"):
        load_controller(tmp_path / "nowhere")


def test_plan_json_round_trip(tmp_path):
    c = scrambled(Controller(small_space(), NAMES, hidden=16, rank=4), seed=3)
    plan = c.plan("utility=0.6,grounding=0.1,flops=0.2,params=0.1")
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back == plan and back.summary() == plan.summary()
    assert back.kept_channels(2) == plan.kept_channels(2)
    same_masks = Plan(plan.space, *plan.gates, preference={"utility": 1.0})
    assert same_masks != plan and same_masks.mask_key() == plan.mask_key() == back.mask_key()
    assert Plan.dense(plan.space).mask_key() != plan.mask_key()


def test_plan_costs_match_the_space_and_bad_plans_are_rejected(tmp_path):
    space = small_space()
    dense = Plan.dense(space)
    assert dense.costs()["flops"] == pytest.approx(sum(v for k, v in space.dense_costs().items() if k.startswith("flops/")))
    assert dense.summary()["flops_ratio"] == 1.0
    d = dense.to_dict()
    d["layers"][0]["heads"] = [0, 9]
    with pytest.raises(HippError, match="layer 0 heads index 9 is out of range"):
        Plan.from_dict(d)
    with pytest.raises(HippError, match="must be hard 0/1"):
        Plan(space, torch.full((4,), 0.5), *space.all_kept()[1:])
    (tmp_path / "p.json").write_text('{"format": "hipp-plan", "version": 99}')
    with pytest.raises(HippError, match="plan version 99"):
        Plan.load(tmp_path / "p.json")


def flat(logits) -> torch.Tensor:
    layer, heads, chans = logits
    return torch.cat([layer, *heads, *chans], dim=-1)


def test_a_flops_target_is_an_input_only_of_a_controller_trained_with_one(tmp_path):
    plain = Controller(small_space(), NAMES, hidden=16, rank=4)
    with pytest.raises(HippError, match="trained without FLOPs targets"):
        plain(torch.full((4,), 0.25), 0.5)
    for names in (["utility", "params"], ["flops", "params"]):
        with pytest.raises(HippError, match="needs the 'flops' objective and a quality objective"):
            Controller(small_space(), names, flops_target=True)
    c = scrambled(Controller(small_space(), NAMES, hidden=16, rank=4, flops_target=True))
    prefs = torch.full((3, 4), 0.25)
    none = flat(c(prefs))
    assert torch.equal(none, flat(c(prefs, torch.full((3,), math.nan))))  # NaN = no target
    mixed = flat(c(prefs, torch.tensor([math.nan, 0.3, 0.7])))
    assert torch.equal(mixed[0], none[0])
    assert not torch.allclose(mixed[1], none[1]) and not torch.allclose(mixed[1], mixed[2])
    assert torch.allclose(flat(c(prefs[1], 0.3)), mixed[1], atol=1e-4)  # one preference, a float target
    c.save(tmp_path / "c", fingerprint=FP)
    back = load_controller(tmp_path / "c")
    assert back.takes_target and torch.equal(flat(back(prefs, torch.tensor([math.nan, 0.3, 0.7]))), mixed)
    assert not load_controller(plain.save(tmp_path / "p", fingerprint=FP)).takes_target
