"""Polishing a bound query's plan: starts from the controller's logits, holds the bound, never ranks worse."""
import json

import pytest
import torch

from hipp.baselines.fixed_budget import FreeGates
from hipp.errors import HippError
from hipp.core.gates import map_gates
from hipp.query.polish import plan_logits, polish
from hipp.core.budget import Units
from hipp.query.bound import plan_for_budget
from hipp.query.ranking import rank_losses
from test_query import assert_bad, cli, loaded, tiny_controller_dir  # noqa: F401

BOUND = 0.45


def keep_vector(plan) -> torch.Tensor:
    return torch.cat([plan.layer_keep, *plan.head_keep, *plan.channel_keep])


def test_polishing_starts_from_the_plans_own_logits(loaded):  # noqa: F811
    controller, base = loaded
    plan = plan_for_budget(controller, max_flops=BOUND, base=base)
    units = Units(controller.space)
    flat = units.flat(map_gates(lambda t: t.double(), plan_logits(controller, plan)))
    positive = keep_vector(units.plan((flat > 0).double(), {}))
    assert positive.sum() > 0
    # the shifted logits keep the search's top-k (but for a unit the offset leaves at exactly 0); the
    # plan adds only its top-up to them
    assert bool((keep_vector(plan) >= positive).all())
    assert int((keep_vector(plan) - positive).sum()) <= plan.meta["search"]["units_added"] + 1
    gates = FreeGates(controller.space, 0.0, 0.0).load(plan_logits(controller, plan))
    assert torch.equal(units.flat(map_gates(lambda t: t.detach().double(), gates())), flat)


def test_polished_plan_holds_the_bound_and_never_ranks_worse(loaded):  # noqa: F811
    controller, base = loaded
    plan = plan_for_budget(controller, max_flops=BOUND, base=base)
    before = rank_losses(base, [plan])[0][0]
    out = polish(base, controller, plan, steps=4)
    info = out.meta["polish"]
    assert info["steps"] == 4 and info["loss_before"] == pytest.approx(before)
    assert out.costs()["flops_ratio"] <= BOUND
    assert rank_losses(base, [out])[0][0] == pytest.approx(min(info["loss_before"], info["loss_after"]))
    if not info["kept"]:
        assert out.mask_key() == plan.mask_key()
    assert out.meta["max_flops"] == BOUND and out.meta["search"] == plan.meta["search"]


def test_polish_input_is_checked(loaded):  # noqa: F811
    controller, base = loaded
    bound_plan = plan_for_budget(controller, max_flops=BOUND, base=base)
    assert polish(base, controller, bound_plan, steps=0) is bound_plan
    for bad in (-1, 2.5, True):
        with pytest.raises(HippError, match="whole number >= 0"):
            polish(base, controller, bound_plan, steps=bad)
    with pytest.raises(HippError, match="needs a plan from a --max-flops query"):
        polish(base, controller, controller.plan(controller.preference("utility=1")), steps=2)


def test_polish_from_the_command_line(tiny_controller_dir, capsys):  # noqa: F811
    from hipp.cli.main import build_parser
    for command in ("query", "bench"):  # off unless asked: the seed study's decision on validation
        args = ["--controller", "c"] + (["--max-flops", "0.5"] if command == "query" else ["--out", "o"])
        assert build_parser().parse_args([command, *args]).polish == 0
    code, out, err = cli(capsys, "query", "--controller", tiny_controller_dir, "--max-flops", BOUND,
                         "--polish", 2, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["flops_ratio"] <= BOUND and got["meta"]["polish"]["steps"] == 2
    code, out, err = cli(capsys, "query", "--controller", tiny_controller_dir, "--max-flops", BOUND, "--polish", 2)
    assert code == 0 and "polished      2 steps: loss" in out
    ctrl = str(tiny_controller_dir)
    assert_bad(*cli(capsys, "query", "--controller", ctrl, "--max-flops", BOUND, "--polish", -3), "whole number >= 0")
    assert_bad(*cli(capsys, "query", "--controller", ctrl, "--pref", "utility=1", "--polish", 2), "needs --max-flops")
    assert_bad(*cli(capsys, "query", "--controller", ctrl, "--max-params", 0.9, "--polish", 2), "needs --max-flops")
    for extra in (("--round", 8), ("--max-latency", 0.5)):  # polishing refits to FLOPs / params alone
        assert_bad(*cli(capsys, "query", "--controller", ctrl, "--max-flops", BOUND, "--polish", 2, *extra),
                   "does not take --max-latency or --round")


def test_a_split_picks_from_a_pool_by_its_weighed_disagreement_and_never_keeps_fewer_yes_no_answers_as_it_rises():
    from hipp.query.polish import pick_by_split

    parts = [(0.5, 0.1), (0.3, 0.2), (0.1, 0.5)]  # (yes / no answers differing, others differing)
    assert [pick_by_split(parts, e) for e in (0.0, 0.5, 1.0)] == [0, 1, 2]
    assert pick_by_split([(0.2, 0.2), (0.2, 0.2)], 0.9, shares=[0.1, 0.8]) == 1  # a tie: the one polished nearest
    assert pick_by_split([(0.2, 0.2), (0.2, 0.2)], 0.9) == 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        pool = [tuple(torch.rand(2, generator=gen).tolist()) for _ in range(6)]
        yes_no = [pool[pick_by_split(pool, e / 20)][0] for e in range(21)]
        assert all(b <= a for a, b in zip(yes_no, yes_no[1:]))
    with pytest.raises(HippError, match="no candidate"):
        pick_by_split([], 0.5)



def test_a_pool_is_checked_before_anything_is_polished_even_for_no_steps():
    from hipp.query.polish import check_pool

    assert check_pool([0, 0.5, 1.0]) == (0, 0.5, 1.0)
    for bad in (0.5, "0.5", [0.2, 1.5], [True], [float("nan")]):
        with pytest.raises(HippError, match="pool"):
            polish(None, None, None, steps=0, pool=bad)
