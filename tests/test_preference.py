import math

import pytest
import torch

from hipp.errors import HippError
from hipp.core.preference import (as_dict, as_tensor, format_spec, grid_size, parse_spec, sample_dirichlet,
                             simplex_grid, sweep)

NAMES = ["utility", "grounding", "flops", "params"]


def test_named_spec_missing_names_are_zero_and_normalised():
    p = parse_spec("utility=3, flops = 1", NAMES)
    assert list(p) == NAMES
    assert p == pytest.approx({"utility": 0.75, "grounding": 0.0, "flops": 0.25, "params": 0.0})


def test_positional_spec_in_name_order():
    assert parse_spec("1,0,0,3", NAMES) == pytest.approx({"utility": 0.25, "grounding": 0, "flops": 0, "params": 0.75})


@pytest.mark.parametrize("spec, message", [
    ("", "empty preference"),
    ("   ", "empty preference"),
    ("foo=1", "unknown objective 'foo'"),
    ("utility=-1,flops=2", "'utility' must be >= 0, got -1"),
    ("utility=nan", "'utility' must be finite"),
    ("flops=inf", "'flops' must be finite"),
    ("utility=0,flops=0", "sum to 0"),
    ("0,0,0,0", "sum to 0"),
    ("utility=abc", "'utility' is not a number: 'abc'"),
    ("1,2", "has 2 positional values; expected 4"),
    ("1,2,3,4,5", "has 5 positional values; expected 4"),
    ("utility=1,0.5", "mixes name=value pairs and positional"),
    ("utility=1,utility=2", "'utility' appears twice"),
    ("utility=1,,flops=1", "empty item"),
    ("utility=1e999", "'utility' must be finite"),
    ("utility=1e308,flops=1e308", "add up beyond the largest float"),
    ("utility=1=2", "'utility' is not a number: '1=2'"),
])
def test_bad_specs_raise_one_clear_line(spec, message):
    with pytest.raises(HippError) as err:
        parse_spec(spec, NAMES)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_input_form_agrees():
    want = parse_spec("utility=2,params=2", NAMES)
    assert as_dict({"utility": 1, "params": 1}, NAMES) == pytest.approx(want)
    assert as_dict([1, 0, 0, 1], NAMES) == pytest.approx(want)
    assert as_dict(torch.tensor([5.0, 0, 0, 5.0]), NAMES) == pytest.approx(want)
    assert torch.allclose(as_tensor("utility=1,params=1", NAMES), torch.tensor([0.5, 0, 0, 0.5]))
    with pytest.raises(HippError, match="unknown objective 'speed'"):
        as_dict({"speed": 1}, NAMES)
    with pytest.raises(HippError, match="has 3 values; expected 4"):
        as_dict([1, 1, 1], NAMES)
    with pytest.raises(HippError, match="must be 1-D"):
        as_dict(torch.ones(2, 4), NAMES)


def test_format_spec_round_trips():
    p = parse_spec("utility=0.6,grounding=0.1,flops=0.2,params=0.1", NAMES)
    assert format_spec(p) == "utility=0.6,grounding=0.1,flops=0.2,params=0.1"
    assert parse_spec(format_spec(p), NAMES) == pytest.approx(p)


def test_dirichlet_samples_lie_on_the_simplex_and_are_reproducible():
    x = sample_dirichlet(500, 1.0, 4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (500, 4)
    assert bool((x >= 0).all())
    assert torch.allclose(x.sum(-1), torch.ones(500), atol=1e-6)
    again = sample_dirichlet(500, 1.0, 4, generator=torch.Generator().manual_seed(0))
    other = sample_dirichlet(500, 1.0, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_dirichlet_moments_match_theory_for_small_and_large_alpha():
    # alpha < 1 and alpha >= 1 take different Gamma branches; both must give the right law.
    alpha = torch.tensor([0.3, 1.0, 2.0, 4.0], dtype=torch.float64)
    x = sample_dirichlet(40000, alpha, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a0 = alpha.sum()
    mean = alpha / a0
    var = alpha * (a0 - alpha) / (a0 ** 2 * (a0 + 1))
    assert torch.allclose(x.mean(0), mean, atol=0.006)
    assert torch.allclose(x.var(0), var, rtol=0.08)


def test_dirichlet_rejects_bad_alpha():
    with pytest.raises(HippError, match="positive and finite"):
        sample_dirichlet(3, [1.0, -1.0])
    with pytest.raises(HippError, match="needs n_objectives"):
        sample_dirichlet(3, 1.0)


def test_simplex_grid_is_das_dennis():
    g = simplex_grid(3, divisions=2)
    assert g.shape == (6, 3)
    assert torch.allclose(g.sum(-1), torch.ones(6))
    assert {tuple(r) for r in (g * 2).round().int().tolist()} == {
        (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1)}
    assert simplex_grid(4, divisions=3).shape[0] == grid_size(4, 3) == 20
    assert torch.equal(simplex_grid(1, divisions=4), torch.ones(1, 1))


def test_simplex_grid_from_approximate_point_count():
    assert simplex_grid(3, n_points=10).shape[0] == 10   # H=3 exactly
    assert simplex_grid(3, n_points=12).shape[0] == 10   # 10 is closer than 15
    assert simplex_grid(3, n_points=14).shape[0] == 15
    assert simplex_grid(2, n_points=11).shape[0] == 11
    with pytest.raises(HippError, match="exactly one of"):
        simplex_grid(3)
    with pytest.raises(HippError, match="exactly one of"):
        simplex_grid(3, n_points=5, divisions=2)


def test_two_objective_sweep():
    s = sweep(NAMES, "utility", "flops", 5)
    assert s.shape == (5, 4)
    assert torch.allclose(s.sum(-1), torch.ones(5))
    assert s[0].tolist() == [1, 0, 0, 0] and s[-1].tolist() == [0, 0, 1, 0]
    assert bool((s[1:, 2] > s[:-1, 2]).all())
    r = sweep(NAMES, "utility", "flops", 3, rest={"grounding": 0.2})
    assert torch.allclose(r[:, 1], torch.full((3,), 0.2))
    assert torch.allclose(r.sum(-1), torch.ones(3))
    with pytest.raises(HippError, match="unknown objective 'speed'"):
        sweep(NAMES, "utility", "speed", 3)
    with pytest.raises(HippError, match="two different objectives"):
        sweep(NAMES, "flops", "flops", 3)
    with pytest.raises(HippError, match="must leave room below 1"):
        sweep(NAMES, "utility", "flops", 3, rest={"grounding": 1.0})


def test_uniform_dirichlet_covers_the_corners():
    # alpha = 1 is uniform on the simplex: P(x_0 > 0.9) = 0.1 ** (K - 1) for K = 2 is 0.1
    x = sample_dirichlet(20000, 1.0, 2, generator=torch.Generator().manual_seed(5))
    assert math.isclose(float((x[:, 0] > 0.9).float().mean()), 0.1, abs_tol=0.01)
