"""Baselines: the shared allocator on hand-computed spaces, every method at every budget on a tiny
random CLIP, and the importance signals doing what each method says."""
import copy
import math
from dataclasses import asdict

import pytest
import torch

from hipp import baselines as B
from hipp.backends import make_prunable, prunable_blocks
from hipp.baselines.allocate import allocate, uniform, width_budget
from hipp.baselines.calibration import Damage
from hipp.baselines.ecoflap import layer_budgets
from hipp.baselines.magnitude import magnitude_scores
from hipp.baselines.mope import _without, ablation_scores
from hipp.baselines.units import Scores, unit_flops
from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg
from hipp.errors import HippError
from hipp.evaluation.evaluate import evaluate
from hipp.export.slicing import compensate_bias, materialize, model_structure, structure
from hipp.evaluation.pareto import calibration_inputs, evaluate_plan
from hipp.core.plan import Plan
from hipp.core.space import LayerSpec, PruneSpace

BUDGETS = (0.3, 0.5, 0.7)
GROUP = 8  # 256 MLP channels -> 32 channel gates per layer
FAST = {"fixed_budget": {"steps": 3, "batch_size": 8}}


# --- a hand-made space: every head costs 72 FLOPs, every channel 16, each layer 208, total 416 -----

def hand_space() -> PruneSpace:
    layers = tuple(LayerSpec(t, 0, width=4, num_heads=2, head_dim=2, mlp_hidden=4, tokens=1) for t in ("image", "text"))
    return PruneSpace(layers, {"image": 0.0, "text": 0.0}, {"image": 0.0, "text": 0.0})


def from_density(head_density, channel_density) -> Scores:
    """Scores whose score-per-FLOP is the given density."""
    return Scores([72.0 * torch.tensor(h, dtype=torch.float64) for h in head_density],
                  [16.0 * torch.tensor(c, dtype=torch.float64) for c in channel_density])


HAND = from_density([[10, 1], [4, 0.1]], [[5, 0.5, 3, 2], [6, 0.2, 0.3, 7]])


def masks(plan: Plan):
    return ([h.tolist() for h in plan.head_keep], [c.tolist() for c in plan.channel_keep])


def test_hand_space_costs_are_what_the_tests_assume():
    space = hand_space()
    heads, chans = unit_flops(space)
    assert heads[0].tolist() == [72.0, 72.0] and chans[1].tolist() == [16.0] * 4
    assert space.dense_costs()["flops/image"] + space.dense_costs()["flops/text"] == 416.0


def test_allocator_removes_lowest_score_per_flop_first():
    # ascending density: text h1, text c1, text c2, image c1, image h1, image c3 -> 416 - 208 = 208
    plan = allocate(hand_space(), 0.5, HAND)
    assert masks(plan) == ([[1, 0], [1, 0]], [[1, 0, 1, 0], [1, 0, 0, 1]])
    assert plan.costs()["flops_ratio"] == 0.5


def test_allocator_fills_the_budget_back_with_the_best_units_that_fit():
    # budget 187.2: the greedy pass ends at 120 (a text head had to go); cheaper channels come back to 184
    plan = allocate(hand_space(), 0.45, HAND)
    assert masks(plan) == ([[1, 0], [0, 0]], [[1, 1, 1, 1], [1, 0, 1, 1]])
    assert plan.costs()["flops_ratio"] == pytest.approx(184 / 416)


def test_the_fitter_never_trades_a_kept_unit_for_a_bigger_one():
    # the cheapest unit per FLOP is a head (72 of 416): the fitter's order drops it first and the
    # top-up cannot bring it back, so 0.827 is all it reaches for 0.97 (the old knapsack swapped it
    # for a channel); the window check says so in one line
    scores = from_density([[100, 100 / 72], [100, 100]], [[100, 100, 100, 50 / 16], [100] * 4])
    with pytest.raises(B.BudgetError, match="only 0.827 for a budget of 0.97"):
        allocate(hand_space(), 0.97, scores)
    assert allocate(hand_space(), 0.97, scores, tolerance=0.15).head_keep[0].tolist() == [1, 0]


def test_min_keep_protects_each_layers_best_units():
    scores = from_density([[10, 1], [0.05, 0.1]], [[5, 0.5, 3, 2], [6, 0.2, 0.3, 7]])
    assert allocate(hand_space(), 0.5, scores).head_keep[1].tolist() == [0, 0]
    plan = allocate(hand_space(), 0.5, scores, min_keep=0.25)  # one head, one channel per layer
    assert plan.head_keep[1].tolist() == [0, 1] and plan.costs()["flops_ratio"] == 0.5
    with pytest.raises(B.BudgetError, match="cannot prune down"):
        allocate(hand_space(), 0.3, scores, min_keep=0.5)  # the protected units alone cost 0.5


def test_per_tower_budgets_stop_one_tower_paying_for_the_other():
    scores = from_density([[10, 10], [1, 1]], [[10] * 4, [1] * 4])  # text worth less everywhere
    shared = allocate(hand_space(), 0.5, scores).costs()
    assert shared["flops_ratio/image"] == 1.0 and shared["flops_ratio/text"] == 0.0
    split = allocate(hand_space(), 0.5, scores, per_tower=True).costs()
    for t in ("image", "text"):
        assert 0.5 - 0.02 <= split[f"flops_ratio/{t}"] <= 0.5


def test_layer_keep_and_layer_budgets():
    space = hand_space()
    # one layer of 208: 0.3 of 416 (124.8) keeps the image layer's four best units per FLOP (120)
    plan = allocate(space, 0.3, HAND, layer_keep=[1, 0])
    assert plan.layer_keep.tolist() == [1, 0] and plan.head_keep[1].sum() == 0 and plan.channel_keep[1].sum() == 0
    assert masks(plan)[0][0] == [1, 0] and masks(plan)[1][0] == [1, 0, 1, 1]
    assert plan.costs()["flops_ratio"] == pytest.approx(120 / 416)
    with pytest.raises(B.BudgetError, match="only"):
        allocate(space, 0.7, HAND, layer_keep=[1, 0])  # one layer is at most half the model
    plan = allocate(space, 0.5, HAND, layer_budgets=[52.0, 156.0])
    image = 72 * plan.head_keep[0].sum() + 16 * plan.channel_keep[0].sum()
    assert image <= 52.0 + 16 and plan.costs()["flops_ratio"] <= 0.5


def test_an_emptied_layer_is_dropped_unless_asked_to_keep_it():
    scores = from_density([[10, 10], [0.1, 0.1]], [[10] * 4, [0.1] * 4])
    assert allocate(hand_space(), 0.5, scores).layer_keep.tolist() == [1, 0]
    kept = allocate(hand_space(), 0.5, scores, drop_empty=False)
    assert kept.layer_keep.tolist() == [1, 1] and kept.head_keep[1].sum() == 0


def test_density_needs_non_negative_scores_and_targets_are_checked():
    bad = from_density([[1, -1], [1, 1]], [[1] * 4] * 2)
    with pytest.raises(ValueError):
        allocate(hand_space(), 0.5, bad)
    assert allocate(hand_space(), 0.5, bad, key="score").costs()["flops_ratio"] <= 0.5
    for target in (0, 1.5, float("nan"), "half"):
        with pytest.raises(HippError, match="budget"):
            allocate(hand_space(), target, HAND)


def test_uniform_keeps_the_same_share_in_every_layer():
    space = PruneSpace(tuple(LayerSpec(t, i, 8, 4, 2, 32, 5, 2) for t in ("image", "text") for i in range(3)),
                       {"image": 10.0, "text": 0.0}, {"image": 0.0, "text": 0.0})
    g = torch.Generator().manual_seed(0)
    scores = Scores([torch.rand(4, generator=g) for _ in range(6)], [torch.rand(16, generator=g) for _ in range(6)])
    for target in BUDGETS:
        plan = uniform(space, target, scores)
        assert target - 0.02 <= plan.costs()["flops_ratio"] <= target
        assert len({int(h.sum()) for h in plan.head_keep}) == 1
        counts = [int(c.sum()) for c in plan.channel_keep]
        assert max(counts) - min(counts) <= 1
        for s, c in zip(scores.channels, plan.channel_keep):  # the best channels are the kept ones
            if 0 < c.sum() < len(c):
                assert s[c == 1].min() >= s[c == 0].max()


def test_ecoflap_layer_budgets_follow_importance_and_sum_to_the_budget():
    space = PruneSpace(tuple(LayerSpec("image", i, 8, 4, 2, 32, 5) for i in range(4)),
                       {"image": 50.0}, {"image": 0.0})
    budgets = layer_budgets(space, 0.5, torch.tensor([4.0, 1.0, 0.01, 1.0]))
    assert float(budgets.sum()) == pytest.approx(width_budget(space, 0.5))
    dense = 4 * space.layers[0].head_flops + 32 * space.layers[0].channel_flops
    shares = (budgets / dense).tolist()
    assert shares[1] == pytest.approx(shares[3])
    assert shares[0] > shares[1] > shares[2] >= 0.1 - 1e-9
    assert max(shares) <= 1 + 1e-9


# --- a tiny random CLIP ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir)
    tokenizer = get_tokenizer(tiny_model_dir)
    pp = preprocess_cfg(model)
    space = make_prunable(model, GROUP)
    calibration = B.make_calibration(model, tokenizer, pp, size=12)
    return model, space, calibration, {}


@pytest.mark.parametrize("method", list(B.METHODS))
def test_every_method_meets_every_budget_with_a_materialisable_plan(tiny, method):
    model, space, calibration, cache = tiny
    m = B.METHODS[method]
    plans = [B.make_plan(method, model, space, b, calibration, seed=s, cache=cache, options=FAST.get(method))
             for b in BUDGETS for s in range(m.seeds)]
    for plan, b in zip(plans, [b for b in BUDGETS for _ in range(m.seeds)]):
        assert b - B.TOLERANCE <= plan.costs()["flops_ratio"] <= b + 1e-9, (method, b)
        assert plan.meta["method"] == method and plan.meta["compensate"] == m.compensate
        if not m.compensate:  # a kept layer holds a head or a channel; emptied ones were dropped
            for i in range(len(space.layers)):
                if plan.layer_keep[i]:
                    assert plan.head_keep[i].sum() + plan.channel_keep[i].sum() > 0
        assert Plan.from_dict(plan.to_dict()) == plan
    small = materialize(model, *plans[0].gates)
    assert model_structure(small) == structure(space, *plans[0].gates)


def test_unknown_method_bad_input_and_missing_calibration(tiny):
    model, space, calibration, _ = tiny
    with pytest.raises(HippError, match="unknown baseline method 'upop'.*uniform"):
        B.make_plan("upop", model, space, 0.5, calibration)
    with pytest.raises(HippError, match="unknown baseline method"):
        B.make_plans("nope", model, space, [0.5], calibration)
    with pytest.raises(HippError, match="needs calibration"):
        B.make_plan("mope", model, space, 0.5)
    with pytest.raises(HippError, match="budget"):
        B.make_plan("uniform", model, space, 1.2)
    with pytest.raises(HippError, match="no option 'stepz'"):
        B.make_plan("fixed_budget", model, space, 0.5, calibration, options={"stepz": 1})
    with pytest.raises(HippError, match="steps >= 1"):
        B.make_plan("fixed_budget", model, space, 0.5, calibration, options={"steps": 0})
    with pytest.raises(HippError, match="unknown lr schedule"):
        B.make_plan("fixed_budget", model, space, 0.5, calibration, options={"lr_schedule": "step"})
    with pytest.raises(HippError, match="no option 'depth'"):
        B.make_plan("mope", model, space, 0.5, calibration, options={"depth": 1})
    with pytest.raises(HippError, match="does not match the prune space"):
        B.make_plan("uniform", model, hand_space(), 0.5)
    assert make_prunable(model, GROUP) == space


def test_random_plans_depend_on_the_seed_only(tiny):
    model, space, _, _ = tiny
    a, b, c = (B.make_plan("random", model, space, 0.5, seed=s) for s in (1, 1, 2))
    assert a == b and a != c


def test_magnitude_removes_a_dead_head_first_and_keeps_a_minimum_per_layer(tiny):
    model, space, _, _ = tiny
    dead = copy.deepcopy(model)
    attn = prunable_blocks(dead)[1].attn
    hd = attn.head_dim
    with torch.no_grad():
        attn.in_proj_weight.view(3, attn.num_heads, hd, -1)[:, 2] = 0
        attn.out_proj.weight[:, 2 * hd:3 * hd] = 0
    assert int(magnitude_scores(dead, space).heads[1].argmin()) == 2
    plan = B.make_plan("magnitude", dead, space, 0.7)
    assert plan.head_keep[1][2] == 0
    low = B.make_plan("magnitude", dead, space, 0.3)
    for i, l in enumerate(space.layers):
        assert low.head_keep[i].sum() >= 1 and low.channel_keep[i].sum() >= math.ceil(0.1 * l.num_channel_gates)


def test_batched_ablation_equals_one_gated_forward_at_a_time(tiny):
    model, space, calibration, _ = tiny
    damage = Damage(model, calibration, space)
    for i, l in enumerate(space.layers):
        sets = [_without(space, i, "head", 1), _without(space, i, "channel", 3)]
        one_by_one = torch.tensor([damage(s) for s in sets], dtype=torch.float64)
        assert torch.allclose(damage.ablate(l.tower, sets), one_by_one, atol=1e-5)
        assert torch.allclose(damage.ablate(l.tower, sets, start=l.index), one_by_one, atol=1e-5)
    assert damage() == pytest.approx(0.0, abs=1e-5)


def test_ablation_scores_a_head_that_does_nothing_at_zero(tiny):
    model, space, calibration, _ = tiny
    dead = copy.deepcopy(model)
    attn = prunable_blocks(dead)[2].attn  # text layer 0
    with torch.no_grad():
        attn.out_proj.weight[:, :attn.head_dim] = 0  # head 0 writes nothing
    scores = ablation_scores(Damage(dead, calibration, space), space)
    assert scores.heads[2][0] < 1e-6
    assert bool((scores.heads[2][1:] > 1e-4).all())


def test_multiflow_holds_each_tower_to_the_budget(tiny):
    model, space, calibration, cache = tiny
    for b in BUDGETS:
        c = B.make_plan("multiflow", model, space, b, calibration, cache=cache).costs()
        assert c["flops_ratio/image"] <= b + 1e-9 and c["flops_ratio/text"] <= b + 1e-9


def test_flap_is_evaluated_with_bias_compensation_which_brings_it_closer_to_dense(tiny):
    model, space, calibration, cache = tiny
    pp = calibration.preprocess_cfg
    plan = B.make_plan("flap", model, space, 0.5, calibration, cache=cache)
    images, texts = calibration_inputs(calibration, pp)
    compensated = compensate_bias(model, *plan.gates, images=images, texts=texts)
    plain = materialize(model, *plan.gates)

    @torch.no_grad()
    def gap(m):  # mean cosine distance to the dense embeddings, both towers
        return sum(float((1 - (f(m)(x, normalize=True) * f(model)(x, normalize=True)).sum(-1)).mean())
                   for f, x in ((lambda m: m.encode_image, images), (lambda m: m.encode_text, texts)))
    assert gap(compensated) < gap(plain)
    got = evaluate_plan(model, plan, calibration.tokenizer, pp, datasets=("shapes",), n=10, calibration=calibration)
    assert got["metrics"] == evaluate(compensated, calibration.tokenizer, pp, ("shapes",), n=10)


def test_fixed_budget_reports_training_time_and_leaves_the_vlm_frozen(tiny):
    model, space, calibration, _ = tiny
    plan = B.make_plan("fixed_budget", model, space, 0.5, calibration, options={"steps": 4, "batch_size": 8})
    assert plan.meta["train_seconds"] > 0 and plan.meta["steps"] == 4
    assert math.isfinite(plan.meta["expected_flops"])
    assert all(p.grad is None for p in model.parameters())  # the VLM stayed frozen


def test_fixed_budget_trains_for_the_quality_split_it_is_given(tiny):
    from hipp.baselines.fixed_budget import GateTraining, train_gates
    model, space, calibration, _ = tiny

    def logits(**weights):
        gates, _ = train_gates(model, space, calibration, 0.5, cfg=GateTraining(steps=2, batch_size=4, **weights))
        return torch.cat([p.detach().flatten() for p in gates.parameters()])

    plain = logits()
    assert torch.equal(plain, logits(utility_weight=1.0, grounding_weight=1.0))  # the default is the plain sum
    assert not torch.allclose(plain, logits(utility_weight=1.0, grounding_weight=0.0))
    assert not torch.allclose(logits(utility_weight=0.0, grounding_weight=1.0), logits(utility_weight=1.0, grounding_weight=0.0))
    for bad in ({"utility_weight": -0.5}, {"utility_weight": 0.0, "grounding_weight": 0.0}):
        with pytest.raises(HippError, match="quality weights"):
            B.make_plan("fixed_budget", model, space, 0.5, calibration, options={**FAST["fixed_budget"], **bad})
    with pytest.raises(HippError, match="generative task's existence questions"):
        train_gates(model, space, calibration, 0.5, cfg=GateTraining(steps=1, batch_size=4, existence_share=0.5))


def test_bench_object_holds_the_contract_keys(tiny, tmp_path):
    from hipp.evaluation.bench import bench
    model, space, calibration, _ = tiny
    tokenizer = calibration.tokenizer
    out = bench(model, tokenizer, calibration.preprocess_cfg, space, budgets=[0.5], methods=["uniform", "random", "flap"],
                out_dir=tmp_path, calibration=calibration, datasets=("shapes",), n=10, progress=False)
    assert [r["method"] for r in out["results"]] == ["uniform", "random", "flap"]
    for r in out["results"]:
        assert {"method", "budget", "flops_ratio", "metrics", "latency_ms"} <= set(r)
        assert 0.48 <= r["flops_ratio"] <= 0.5
    assert len(out["results"][1]["seeds"]) == 3
    assert set(out["hypervolume"]) == set(out["train_seconds"]) == {"uniform", "random", "flap"}
    assert all((tmp_path / f"bench.{ext}").is_file() for ext in ("json", "csv", "md", "png"))


def test_margins_name_the_best_training_free_method_and_the_fixed_budget_gap():
    from hipp.evaluation.bench import margins
    rows = [{"method": m, "budget": b, "utility": u} for m, b, u in (
        ("uniform", 0.3, 0.5), ("mope", 0.3, 0.7), ("fixed_budget", 0.3, 0.9), ("hipp", 0.3, 0.8),
        ("mope", 0.7, 0.85), ("ecoflap", 0.7, 0.86), ("hipp", 0.7, 0.84), ("uniform", 0.5, 0.6))]
    got = margins(rows)
    assert set(got) == {"0.3", "0.7"}  # no controller row at 0.5: no margin there
    assert got["0.3"]["best_training_free"] == "mope"  # the fixed-budget gates train: not a training-free method
    assert got["0.3"]["over_training_free"] == pytest.approx(0.1)
    assert got["0.3"]["vs_fixed_budget"] == pytest.approx(-0.1)
    assert got["0.7"] == {"best_training_free": "ecoflap", "over_training_free": pytest.approx(-0.02)}
    # with per-item scores, each margin carries its paired standard error
    scores = {m: {"fmnist/acc": torch.tensor(v)} for m, v in (
        ("hipp", [1.0, 1.0, 0.0, 1.0]), ("mope", [1.0, 0.0, 0.0, 1.0]), ("fixed_budget", [1.0, 1.0, 1.0, 1.0]))}
    got = margins(rows, {(m, 0.3): v for m, v in scores.items()})
    assert got["0.3"]["se"] == {"over_training_free": pytest.approx((0.25 / 4) ** 0.5),  # diffs 0 1 0 0
                                "vs_fixed_budget": pytest.approx((0.25 / 4) ** 0.5)}  # diffs 0 0 -1 0
    assert "se" not in got["0.7"]  # no scores measured there


def test_fixed_budget_gates_get_the_controllers_training_budget():
    from hipp.baselines.fixed_budget import GateTraining, matched_to
    from hipp.training.trainer import TrainConfig

    cfg = asdict(TrainConfig(steps=600, pref_groups=2, lr_schedule="cosine"))
    cfg["data"]["batch_size"] = 32
    options = matched_to(cfg)
    assert options["steps"] == 600 and options["batch_size"] == 64  # as many samples a step as the controller
    assert "lr_schedule" not in options  # the fixed-budget gates keep the learning rate that serves it best
    GateTraining(**options)  # every key is a real setting
