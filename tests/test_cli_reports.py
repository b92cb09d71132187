"""`hipp pareto` and `hipp bench` from the command line: outputs written, bad input one line."""
import json

from test_query import assert_bad, cli, tiny_controller_dir  # noqa: F401


def test_pareto_writes_the_front(tiny_controller_dir, tmp_path, capsys):  # noqa: F811
    code, out, err = cli(capsys, "pareto", "--controller", tiny_controller_dir, "--points", 4,
                         "--out", tmp_path / "front", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result["hypervolume"]["utility"] <= 1.0
    for name in ("pareto.json", "pareto.csv", "pareto.png", "pareto.md"):
        assert (tmp_path / "front" / name).stat().st_size > 0


def test_bench_runs_chosen_methods_with_the_controller(tiny_controller_dir, tmp_path, capsys):  # noqa: F811
    code, out, err = cli(capsys, "bench", "--controller", tiny_controller_dir, "--budgets", "0.5",
                         "--methods", "uniform,magnitude", "--polish", 2, "--out", tmp_path / "bench", "--json",
                         "--test-items", 300)
    assert code == 0, err
    result = json.loads(out)
    ours = ("hipp", "hipp+polish")
    assert [r["method"] for r in result["results"]] == ["uniform", "magnitude", *ours]
    for row in result["results"]:
        assert row["budget"] == 0.5 and 0.48 <= row["flops_ratio"] <= 0.5
    assert set(result["hypervolume"]) == {"uniform", "magnitude", *ours}
    assert result["settings"]["n"] == result["settings"]["fmnist_limit"] == 300
    assert result["train_seconds"]["hipp"] == result["train_seconds"]["hipp+polish"]
    utility = {r["method"]: r["utility"] for r in result["results"]}
    best = max(("uniform", "magnitude"), key=utility.get)
    md = (tmp_path / "bench" / "bench.md").read_text()
    for row, other in zip(ours, reversed(ours)):  # each planner's row is also set against the other's
        margin = result["margins"][row]["0.5"]
        errors = margin.pop("se")
        se = errors["over_training_free"]
        assert margin == {"best_training_free": best, "over_training_free": utility[row] - utility[best],
                          f"vs_{other}": utility[row] - utility[other]}
        assert 0 <= se < 0.5 and 0 <= errors[f"vs_{other}"] < 0.5
        assert (f"- {row} @0.5: {utility[row] - utility[best]:+.3f} ± {se:.3f} over the best training-free method "
                f"({best})") in md
    detail = md.split("## Every method at every budget")[1]
    assert [line.split(" | ")[0] for line in detail.splitlines() if line.startswith("| ") and "0.5" in line] == \
        ["| uniform", "| magnitude", "| hipp", "| hipp+polish"]


def test_bench_and_pareto_bad_input(tiny_controller_dir, tmp_path, capsys):  # noqa: F811
    ctrl = str(tiny_controller_dir)
    assert_bad(*cli(capsys, "bench", "--controller", ctrl, "--budgets", "0.5,1.5", "--out", tmp_path / "b"),
               "(0, 1]")
    assert_bad(*cli(capsys, "bench", "--controller", ctrl, "--budgets", "0", "--out", tmp_path / "b"), "(0, 1]")
    assert_bad(*cli(capsys, "bench", "--controller", ctrl, "--test-items", "3", "--out", tmp_path / "b"),
               "--test-items must be at least 10")
    assert_bad(*cli(capsys, "bench", "--controller", ctrl, "--methods", "pruneall", "--out", tmp_path / "b"),
               "pruneall")
    assert_bad(*cli(capsys, "bench", "--controller", ctrl, "--polish", -1, "--out", tmp_path / "b"), "whole number")
    (tmp_path / "file").write_text("keep me")
    assert_bad(*cli(capsys, "bench", "--controller", ctrl, "--out", tmp_path / "file"), "is a file")
    assert_bad(*cli(capsys, "pareto", "--controller", ctrl, "--out", tmp_path / "file" / "sub"), "is a file")
    assert (tmp_path / "file").read_text() == "keep me"
    assert not (tmp_path / "b").exists()
