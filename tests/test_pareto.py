"""Fronts: exact 2-D hypervolume on hand-computed sets, front membership, rank correlation, plan
evaluation, and a whole sweep of a tiny controller writing its CSV, JSON, plot and summary."""
import csv
import itertools
import json

import pytest
import torch

from hipp.backends import make_prunable
from hipp.storage.checkpoint import get_tokenizer, load_model, preprocess_cfg
from hipp.controller.network import Controller
from hipp.errors import HippError
from hipp.evaluation.front import hypervolume_2d, non_dominated, spearman
from hipp.evaluation.pareto import evaluate_plan, sweep, utility_difference, utility_of
from hipp.core.space import PruneSpace


def test_hypervolume_of_hand_computed_sets():
    assert hypervolume_2d([(0.5, 0.5)]) == pytest.approx(0.25)
    # two boxes of 0.32 overlapping in 0.16
    assert hypervolume_2d([(0.2, 0.6), (0.6, 0.2)]) == pytest.approx(0.48)
    assert hypervolume_2d([(0.6, 0.2), (0.2, 0.6), (0.4, 0.4)]) == pytest.approx(0.48 + 0.2 * 0.2)
    assert hypervolume_2d([(0.0, 0.0)]) == pytest.approx(1.0)
    assert hypervolume_2d([(1.0, 0.5), (0.5, 1.0), (1.2, 0.1)]) == 0.0  # on or beyond the reference
    assert hypervolume_2d([]) == 0.0
    assert hypervolume_2d([(1.0, 1.0)], reference=(2.0, 3.0)) == pytest.approx(2.0)


def test_a_dominated_or_repeated_point_does_not_change_the_hypervolume():
    front = [(0.1, 0.8), (0.3, 0.5), (0.7, 0.2)]
    base = hypervolume_2d(front)
    for extra in [(0.4, 0.6), (0.3, 0.5), (0.7, 0.9), (0.95, 0.95), (0.3, 0.55)]:
        assert hypervolume_2d(front + [extra]) == pytest.approx(base)
    assert hypervolume_2d(front + [(0.2, 0.4)]) > base  # a point that is not dominated does


def test_hypervolume_matches_counting_grid_cells():
    g = torch.Generator().manual_seed(3)
    step = 0.05
    for _ in range(20):
        pts = [(int(a) * step, int(b) * step) for a, b in torch.randint(0, 21, (6, 2), generator=g)]
        cells = sum(1 for i, j in itertools.product(range(20), range(20))
                    if any(a <= i * step + 1e-12 and b <= j * step + 1e-12 for a, b in pts))
        assert hypervolume_2d(pts) == pytest.approx(cells * step * step)


def test_non_dominated_flags_and_nan_points():
    pts = [(0.1, 0.9), (0.5, 0.5), (0.6, 0.6), (0.5, 0.5), (0.9, 0.1), (0.5, 0.7)]
    assert non_dominated(pts) == [True, True, False, True, True, False]
    with pytest.raises(HippError):
        hypervolume_2d([(float("nan"), 0.5)])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties share mean ranks
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None


def test_paired_utility_difference_and_its_standard_error():
    a = {"shapes/zs_mean": torch.tensor([1.0, 0.75, 0.5, 1.0]), "fmnist/acc": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])}
    b = {"shapes/zs_mean": torch.tensor([1.0, 0.5, 0.5, 0.75]), "fmnist/acc": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])}
    diff, se = utility_difference(a, b)
    metrics = lambda m: {k: float(v.mean()) for k, v in m.items()}
    assert diff == pytest.approx(utility_of(metrics(a)) - utility_of(metrics(b)))
    # by hand: shapes differences (0, .25, 0, .25), sample var 1/48 over 4 items; fmnist (0, 0, 1, 0, 0), var 1/5 over 5
    assert se == pytest.approx(0.5 * ((1 / 48) / 4 + (1 / 5) / 5) ** 0.5)
    assert utility_difference(a, a) == (0.0, 0.0)  # a model against itself: no difference, no noise
    assert utility_difference(a, {"fmnist/acc": b["fmnist/acc"]}) == pytest.approx((0.2, (0.2 / 5) ** 0.5))
    with pytest.raises(HippError, match="per-item"):
        utility_difference(a, {"shapes/ground_mean": torch.ones(4)})


# --- a tiny random CLIP and a controller whose plans vary with the preference --------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir)
    space = make_prunable(model, 16)
    torch.manual_seed(0)
    controller = Controller(space, hidden=16, rank=4, init_bias=0.5)
    with torch.no_grad():
        for lin in controller.up.values():
            lin.weight.normal_(0, 2.0)
        controller.budget.weight.normal_(0, 2.0)
    return model, get_tokenizer(tiny_model_dir), preprocess_cfg(model), controller


def test_gated_and_materialised_evaluation_agree(tiny):
    model, tokenizer, pp, controller = tiny
    plan = controller.plan("utility=0.3,flops=0.7")
    a = evaluate_plan(model, plan, tokenizer, pp, datasets=("shapes",), n=20, mode="gates")
    b = evaluate_plan(model, plan, tokenizer, pp, datasets=("shapes",), n=20, mode="materialize", latency=True)
    assert a["metrics"].keys() == b["metrics"].keys()
    for k in a["metrics"]:
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], abs=0.051), k  # at most one sample flips
    assert a["flops_ratio"] == plan.costs()["flops_ratio"] < 1
    assert b["latency_ms"]["image"] > 0 and "items" not in b
    c = evaluate_plan(model, plan, tokenizer, pp, datasets=("shapes",), n=20, items=True)
    assert c["metrics"] == b["metrics"]
    assert set(c["items"]) == {"shapes/zs_mean", "shapes/zs_heldout_prompts", "shapes/ground_mean"}
    for key in ("shapes/zs_mean", "shapes/ground_mean"):  # per-scene scores that average to the metric
        assert len(c["items"][key]) == 20
        assert float(c["items"][key].mean()) == pytest.approx(c["metrics"][key])
    with pytest.raises(HippError, match="evaluation mode"):
        evaluate_plan(model, plan, tokenizer, pp, datasets=("shapes",), n=5, mode="hard")
    plan.meta["compensate"] = True
    with pytest.raises(HippError, match="calibration"):
        evaluate_plan(model, plan, tokenizer, pp, datasets=("shapes",), n=5)


def test_sweep_writes_csv_json_plot_and_summary(tiny, tmp_path):
    model, tokenizer, pp, controller = tiny
    out = sweep(controller, model, tokenizer, pp, points=10, out_dir=tmp_path, datasets=("shapes",), n=12,
                progress=False)
    assert out["points"] == 10 and 1 < out["distinct_plans"] <= 10
    rows = list(csv.DictReader((tmp_path / "pareto.csv").open()))
    assert len(rows) == 10
    assert {"spec", "utility", "grounding", "pref_flops", "flops_ratio", "non_dominated", "shapes/zs_mean"} <= set(rows[0])
    saved = json.loads((tmp_path / "pareto.json").read_text())
    points = [(1 - float(r["utility"]), float(r["flops_ratio"])) for r in rows]
    assert saved["hypervolume"]["utility"] == pytest.approx(hypervolume_2d(points))
    assert saved["reference"] == {"point": [1.0, 1.0], "axes": ["1 - utility", "flops_ratio"]}
    assert [r["non_dominated"] == "1" for r in rows] == non_dominated(points)
    by_plan = {}
    for r in saved["rows"]:  # preferences sharing a plan share its measurement
        assert by_plan.setdefault(r["plan"], r["metrics"]) == r["metrics"]
    assert set(saved["rank_correlation"]) == {"utility", "grounding", "flops", "params"}
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "pareto.md").read_text()
    assert "hypervolume" in md and md.count("\n| ") == 11  # header + one line per preference


def test_sweep_refuses_a_controller_for_another_model(tiny, tmp_path):
    model, tokenizer, pp, controller = tiny
    space = controller.space
    other = Controller(PruneSpace(space.layers[1:], space.fixed_flops, space.fixed_params), hidden=8, rank=2)
    with pytest.raises(HippError, match="different model"):
        sweep(other, model, tokenizer, pp, points=2, datasets=("shapes",), n=4, progress=False)
    with pytest.raises(HippError, match="at least one point"):
        sweep(controller, model, tokenizer, pp, points=0)
