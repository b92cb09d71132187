"""A preference under a bound (hipp/query/trade_off.py): the split kept, the cost weight set to meet it."""
import json

import pytest

from hipp.cli.main import main
from hipp.controller.files import load_controller
from hipp.core.budget import ratios
from hipp.errors import HippError
from hipp.query.trade_off import POINTS, matched_preference, plan_for_preference, split_and_direction
from tests.test_query import assert_bad, cli, tiny_controller_dir  # noqa: F401  (a fixture)


def test_the_split_steers_which_units_go_at_one_bound(tiny_controller_dir):
    c = load_controller(tiny_controller_dir)
    # the designed controller: grounding empties text layer 0's heads, utility moves nothing
    text0 = [i for i, l in enumerate(c.space.layers) if (l.tower, l.index) == ("text", 0)][0]
    plans = {split: plan_for_preference(c, split, max_flops=0.6) for split in ("utility=1", "grounding=1")}
    for split, plan in plans.items():
        assert ratios(plan)["flops"] <= 0.6
        asked = plan.meta["trade_off"]["asked"]
        assert plan.meta["max_flops"] == 0.6 and plan.preference["flops"] > 0  # some cost weight was needed
        quality = {n: plan.preference[n] for n in ("utility", "grounding")}
        assert quality[max(asked, key=asked.get)] == pytest.approx(sum(quality.values()))  # the split kept
    kept = {split: int(plan.head_keep[text0].sum()) for split, plan in plans.items()}
    assert kept["utility=1"] == 4 and kept["grounding=1"] <= 1  # the top-up may fill the room with one back


def test_the_cost_weight_is_the_grid_point_whose_own_plan_lands_closest(tiny_controller_dir):
    c = load_controller(tiny_controller_dir)
    pref, bounds = c.preference("utility=0.3,grounding=0.7"), {"flops": 0.5}
    matched, weight = matched_preference(c, pref, bounds)
    gaps = [abs(ratios(c.plan({"utility": 0.3 * (1 - w), "grounding": 0.7 * (1 - w), "flops": w}))["flops"] - 0.5)
            for w in (i / (POINTS - 1) * 0.999 for i in range(POINTS))]
    assert abs(ratios(c.plan(matched))["flops"] - 0.5) == pytest.approx(min(gaps))
    assert matched["flops"] == pytest.approx(weight) and matched["utility"] / matched["grounding"] == pytest.approx(0.3 / 0.7)


def test_cost_weights_of_the_preference_set_the_direction_and_a_quality_weight_is_needed(tiny_controller_dir):
    c = load_controller(tiny_controller_dir)
    q, d = split_and_direction(c, c.preference("utility=2,grounding=2,params=1"), {"flops": 0.5})
    assert q == {"utility": 0.5, "grounding": 0.5} and d == {"params": 1.0}  # named costs are kept
    assert split_and_direction(c, c.preference("utility=1"), {"params": 0.5})[1] == {"params": 1.0}
    with pytest.raises(HippError, match="gives them no weight"):
        plan_for_preference(c, "flops=1,params=1", max_flops=0.5)
    with pytest.raises(HippError, match="no plan meets"):
        plan_for_preference(c, "utility=1", max_flops=0.001)


def test_cli_answers_a_preference_under_a_bound_without_loading_the_model(tiny_controller_dir, capsys, tmp_path):
    code, out, err = cli(capsys, "query", "--controller", tiny_controller_dir, "--pref", "grounding=1",
                         "--max-flops", "0.6", "--json", "--base-model", tmp_path / "no-such-model")
    assert code == 0, err
    got = json.loads(out)
    assert got["flops_ratio"] <= 0.6 and "grounding=" in got["preference_spec"] and "flops=" in got["preference_spec"]
    code, out, err = cli(capsys, "query", "--controller", tiny_controller_dir, "--pref", "grounding=1", "--max-flops", "0.6")
    assert code == 0 and "within max_flops=0.6: cost weight" in out, err
    assert_bad(*cli(capsys, "query", "--controller", tiny_controller_dir, "--pref", "utility=1", "--max-flops", "0.5",
                    "--polish", "3"), "generative (LLaVA) models only")
