"""YAML configs: values no setting can take are refused with the key that holds them."""
import pytest

from hipp.config import check_numbers, load_config
from hipp.errors import HippError
from hipp.training.trainer import TrainConfig


def test_numbers_written_the_yaml_1_1_way_load(tmp_path):
    (tmp_path / "c.yaml").write_bytes("\ufeffsteps: 7\nlr: 1.0e-3\n".encode())  # a BOM, as some editors write
    cfg = load_config(TrainConfig, tmp_path / "c.yaml")
    assert cfg.steps == 7 and cfg.lr == 1.0e-3


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": float("inf")}, "'lr' must be > 0, got inf"),
    ({"lr": float("nan")}, "'lr' must be > 0, got nan"),
    ({"steps": 10**40}, "'steps' must be >= 1, got 1000"),
    ({"temperature_start": float("inf")}, "'temperature_start' must be > 0"),
    ({"dirichlet_alpha": True}, "'dirichlet_alpha' must be > 0, got True"),
])
def test_python_callers_get_the_same_checks(kwargs, message):
    with pytest.raises(HippError, match=message.replace("(", r"\(")):
        TrainConfig(**kwargs)


def test_shared_yaml_anchors_are_checked_once(monkeypatch):
    """Nine levels of nine aliases name 9**9 values; each anchor is walked once, so the walk makes
    about a hundred calls (one per alias) rather than one per value."""
    import yaml

    import hipp.config
    lines = ["a0: &a0 [1.0, 2.0]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    data = yaml.safe_load("\n".join(lines))
    calls, walk = 0, hipp.config.check_numbers

    def counted(*args):  # the recursion goes through the module's name, so every call is counted
        nonlocal calls
        calls += 1
        assert calls <= 1000, "the walk enters shared anchors again"
        return walk(*args)

    monkeypatch.setattr(hipp.config, "check_numbers", counted)
    counted(data)
    assert 9 * 9 < calls <= 1000  # every alias is looked at, once
    data["a0"].append(float("nan"))
    with pytest.raises(HippError, match=r"config key 'a0\[2\]'"):
        check_numbers(data)
