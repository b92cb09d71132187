"""benchmarks/bench_seeds.py: the bench's claims read from each run's own paired margins."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_seeds.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_seeds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _margin(diff, se=0.01, trains=False):
    return {**{k: {"diff": diff, "se": se} for k in ("utility", "pope/random_f1", "pope/popular_f1",
                                                    "pope/adversarial_f1")}, "trains": trains}


def _run(m03, m07, gates=-0.5):
    rows = [{"method": m, "budget": b, **dict.fromkeys(("utility", "pope/random_f1", "pope/popular_f1",
                                                        "pope/adversarial_f1"), u)}
            for m, u in (("hipp", 0.8), ("mope", 0.6), ("fixed_budget", 0.9)) for b in (0.3, 0.7)]
    dense = dict.fromkeys(("utility", "pope/random_f1", "pope/popular_f1", "pope/adversarial_f1"), 0.9)
    return {"budgets": [0.3, 0.7], "results": rows, "dense": dense,
            "hypervolume": {"hipp": 0.5, "mope": 0.3, "fixed_budget": 0.6},
            "train_seconds": {"hipp": 100.0, "mope": 0.0, "fixed_budget": 400.0},
            "margins": {"hipp": {"0.3": {"mope": _margin(m03), "fixed_budget": _margin(gates, trains=True)},
                                 "0.7": {"mope": _margin(m07), "fixed_budget": _margin(gates, trains=True)}}}}


def test_claims_need_two_se_at_strict_budgets_and_ignore_training_methods():
    mod = _module()
    assert mod.claims(_run(0.05, -0.015), {"0.3"}) == []  # won by 5 SE; lost by 1.5 SE only where not strict
    missed = mod.claims(_run(0.015, -0.03), {"0.3"})
    assert len(missed) == 8 and all(m.startswith(("0.3 mope", "0.7 mope")) for m in missed)


def test_table_and_command_line(tmp_path, capsys, monkeypatch):
    mod = _module()
    for i, diff in enumerate((0.05, 0.01)):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "bench.json").write_text(json.dumps(_run(diff, 0.0)))
    assert mod.table([_run(0.05, 0.0)] * 2)[2].startswith("| fixed_budget | 0.900 ± 0.000")
    monkeypatch.setattr("sys.argv", ["bench_seeds.py", str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert mod.main() == 0
    out = capsys.readouterr().out
    assert "0.25x fixed_budget's" in out and "best training-free 0.300" in out
    assert "| 0.3 | 0.889 ± 0.000 | 0.889 ± 0.000 | 0.889 ± 0.000 | 0.889 ± 0.000 |" in out  # 0.8 of 0.9
    assert out.count("claims missed: none") == 1  # s1 wins at 0.3 by 1 SE only
    monkeypatch.setattr("sys.argv", ["bench_seeds.py", str(tmp_path / "missing")])
    assert mod.main() == 2


def test_controllability_over_seeds_reads_steps_and_both_spearmans(tmp_path, capsys, monkeypatch):
    """Two runs whose own orders differ, one step each: each run's Spearman, the mean curve's, and the
    steps as mean ± sd of the per-run steps."""
    spec = importlib.util.spec_from_file_location("controllability_seeds", SCRIPT.with_name("controllability_seeds.py"))
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it reads bench_seeds beside it, as when run
    spec.loader.exec_module(mod)
    for i, f1 in enumerate(((0.80, 0.90, 0.85), (0.80, 0.84, 0.91))):
        rows = [{"grounding_weight": w, "pope/adversarial_f1": f, "utility": u}
                for w, f, u in zip((0, 0.5, 1), f1, (0.7 + i / 10, 0.6, 0.5))]
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "result.json").write_text(json.dumps({"rows": rows, "split": "val", "n": 10, "budget": 0.4}))
    monkeypatch.setattr("sys.argv", ["controllability_seeds.py", str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert mod.main() == 0
    out = capsys.readouterr().out
    assert "| 0 | 0.800 ± 0.000 | 0.750 ± 0.071 | - |" in out
    assert "| 0.5 | 0.870 ± 0.042 | 0.600 ± 0.000 | +0.070 ± 0.042 |" in out  # steps +0.10 and +0.04
    assert "per run: 0.50 / 1.00 (mean 0.750 ± 0.354); of the mean curve: 1.00" in out
    (tmp_path / "s1" / "result.json").write_text(json.dumps({"rows": rows[:2], "split": "val", "n": 10, "budget": 0.4}))
    assert mod.main() == 2 and "different weights" in capsys.readouterr().err
    (tmp_path / "s1" / "result.json").write_text(json.dumps({"rows": rows, "split": "test", "n": 10, "budget": 0.4}))
    assert mod.main() == 2 and "settings (split)" in capsys.readouterr().err  # never averaged under the first run's label
    # a run from before --probes read n probes: it pairs with one that says so, not with one of more probes
    for probes, code in ((10, 0), (40, 2)):
        (tmp_path / "s1" / "result.json").write_text(json.dumps({"rows": rows, "split": "val", "n": 10, "budget": 0.4,
                                                                 "probes": probes}))
        assert mod.main() == code
    got = capsys.readouterr()
    assert "2 runs (val, 10 per kind, 10 adversarial probes, FLOPs 0.4)" in got.out
    assert got.err.strip().endswith("differ in their settings (probes)")
    monkeypatch.setattr("sys.argv", ["controllability_seeds.py", str(tmp_path / "missing")])
    assert mod.main() == 2
