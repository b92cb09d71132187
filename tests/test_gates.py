import math

import pytest
import torch

from hipp.errors import HippError
from hipp.core.gates import (TemperatureSchedule, couple, gumbel_sigmoid, hard_gates, hard_plan, keep_prob, map_gates,
                        sample_gates, straight_through, topk_mask)
from hipp.core.space import LayerSpec, PruneSpace


def small_space() -> PruneSpace:
    layers = (LayerSpec("image", 0, 16, 4, 4, 32, 5), LayerSpec("image", 1, 16, 4, 4, 32, 5),
              LayerSpec("text", 0, 8, 2, 4, 24, 6, channel_group=5))
    return PruneSpace(layers, {"image": 100.0, "text": 50.0}, {"image": 10.0, "text": 20.0})


def test_keep_prob_is_sigmoid():
    x = torch.linspace(-5, 5, 11)
    assert torch.allclose(keep_prob(x), 1 / (1 + torch.exp(-x)))


def test_straight_through_forward_is_binary_and_backward_is_soft():
    logits = torch.randn(64, requires_grad=True)
    w = torch.randn(64)
    hard = gumbel_sigmoid(logits, 0.5, torch.Generator().manual_seed(0), hard=True)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    (hard * w).sum().backward()
    grad_hard = logits.grad.clone()
    assert bool((grad_hard != 0).all())

    logits.grad = None
    soft = gumbel_sigmoid(logits, 0.5, torch.Generator().manual_seed(0), hard=False)
    assert torch.equal(hard.detach(), (soft.detach() > 0.5).float())  # same noise, thresholded
    (soft * w).sum().backward()
    assert torch.allclose(grad_hard, logits.grad)


def test_straight_through_passes_gradient_unchanged():
    s = torch.tensor([0.2, 0.7, 0.5], requires_grad=True)
    out = straight_through(s)
    assert out.tolist() == [0.0, 1.0, 0.0]
    out.sum().backward()
    assert s.grad.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_hard_samples_are_bernoulli_of_keep_prob_at_any_temperature(temperature):
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0]).expand(20000, 4)
    g = gumbel_sigmoid(logits, temperature, torch.Generator().manual_seed(1), hard=True)
    assert torch.allclose(g.mean(0), keep_prob(logits[0]), atol=0.015)


def test_lower_temperature_gives_sharper_soft_samples():
    logits = torch.zeros(5000)
    def spread(t):
        s = gumbel_sigmoid(logits, t, torch.Generator().manual_seed(2))
        return float(torch.minimum(s, 1 - s).mean())  # distance to the nearest of 0 / 1
    assert spread(0.1) < spread(0.5) < spread(2.0)
    with pytest.raises(ValueError):
        gumbel_sigmoid(logits, 0.0)


def test_samples_are_reproducible_with_a_generator():
    logits = (torch.randn(3), [torch.randn(4)], [torch.randn(7)])
    a = sample_gates(logits, 0.5, torch.Generator().manual_seed(9))
    b = sample_gates(logits, 0.5, torch.Generator().manual_seed(9))
    c = sample_gates(logits, 0.5, torch.Generator().manual_seed(10))
    assert torch.equal(a[2][0], b[2][0])
    assert not all(torch.equal(x, y) for x, y in zip([a[0], *a[1], *a[2]], [c[0], *c[1], *c[2]]))


def test_temperature_schedule():
    s = TemperatureSchedule(2.0, 0.02, steps=100)
    assert s(0) == pytest.approx(2.0) and s(100) == pytest.approx(0.02) and s(5000) == pytest.approx(0.02)
    assert s(50) == pytest.approx(math.sqrt(2.0 * 0.02))  # geometric midpoint
    assert s(-3) == pytest.approx(2.0)
    values = [s(i) for i in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    lin = TemperatureSchedule(1.0, 0.2, steps=10, kind="linear")
    assert lin(5) == pytest.approx(0.6)
    with pytest.raises(HippError, match="unknown temperature schedule 'cosine'"):
        TemperatureSchedule(kind="cosine")
    with pytest.raises(HippError, match="must be > 0"):
        TemperatureSchedule(1.0, 0.0)


def test_hard_gates_threshold_at_zero_logit():
    assert hard_gates(torch.tensor([-1.0, 0.0, 1e-4, 2.0])).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_topk_mask():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    m = topk_mask(scores, 2)
    assert m.tolist() == [[0, 1, 0, 1], [1, 1, 0, 0]]
    assert topk_mask(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [1, 0, 0]  # ties: lower index
    assert topk_mask(scores, 0).sum() == 0
    with pytest.raises(ValueError):
        topk_mask(scores, 5)


def test_hierarchy_zeroes_units_of_a_dropped_layer():
    layer = torch.tensor([1.0, 0.0, 1.0])
    heads = [torch.ones(4), torch.ones(4), torch.tensor([1.0, 0.0])]
    chans = [torch.ones(32), torch.ones(32), torch.ones(5)]
    z, h, c = couple((layer, heads, chans))
    assert h[1].sum() == 0 and c[1].sum() == 0
    assert torch.equal(h[0], heads[0]) and torch.equal(h[2], heads[2]) and torch.equal(c[2], chans[2])


def test_hierarchy_on_probabilities_and_batches():
    layer = torch.tensor([[0.5, 1.0], [0.0, 0.25]])
    heads = [torch.full((2, 3), 0.8), torch.full((2, 3), 0.4)]
    _, h, _ = couple((layer, heads, [torch.ones(2, 1), torch.ones(2, 1)]))
    assert torch.allclose(h[0], torch.tensor([[0.4] * 3, [0.0] * 3]))  # P(head and layer kept)
    assert torch.allclose(h[1], torch.tensor([[0.4] * 3, [0.1] * 3]))


def test_hard_plan_applies_threshold_and_hierarchy():
    logits = (torch.tensor([2.0, -1.0]), [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 3.0])],
              [torch.tensor([-2.0, 2.0]), torch.tensor([5.0])])
    z, h, c = hard_plan(logits)
    assert z.tolist() == [1, 0]
    assert h[0].tolist() == [1, 0] and h[1].tolist() == [0, 0]
    assert c[0].tolist() == [0, 1] and c[1].tolist() == [0]


def test_hierarchy_in_costs_a_dropped_layer_costs_nothing_whatever_its_heads():
    space = small_space()
    ones = space.all_kept()
    layer = ones[0].clone()
    layer[1] = 0
    with_units = space.costs(layer, ones[1], ones[2])
    z, h, c = couple((layer, ones[1], ones[2]))
    coupled = space.costs(z, h, c)
    layer_alone = space.costs(*space.all_kept())
    for k in with_units:
        assert float(with_units[k]) == pytest.approx(float(coupled[k]))
    assert float(with_units["flops/image"]) < float(layer_alone["flops/image"])
    assert float(with_units["flops/text"]) == pytest.approx(float(layer_alone["flops/text"]))


def test_map_gates_keeps_structure():
    g = map_gates(lambda x: x * 2, (torch.ones(2), [torch.ones(3)], [torch.ones(4)]))
    assert g[0].tolist() == [2, 2] and g[1][0].shape == (3,) and g[2][0].shape == (4,)


def test_no_stage_name_outside_the_backends_and_the_clip_task_code():
    """Stages are the backend's data: the core (space, plans, costs, controller, budget fitting,
    slicing, queries, baselines' allocation) never names one. The modules listed still hold the CLIP
    task's encode_image / encode_text calls (evaluation, ONNX export, latency, calibration damage)
    until tasks become plug-ins; the list may only shrink."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "hipp"
    task_code = {"export/onnx.py", "evaluation/evaluate.py", "evaluation/pareto.py", "baselines/calibration.py",
                 "data/user.py"}
    named = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("backends/"):
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        if re.search(r"""["'](image|text)["']|\bTOWERS\b""", code):
            named.add(rel)
    assert named <= task_code, sorted(named - task_code)
