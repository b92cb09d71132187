import json
import os
import shutil
import subprocess
import sys


from hipp.cli.main import main
from hipp.storage.checkpoint import WEIGHTS_NAME


def hipp(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hipp", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_bad_input(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]
    assert result.stdout == ""


def test_eval_json_on_a_saved_model(tiny_model_dir, capsys):
    """Through the command line's entry point in this process: stdout holds one JSON object only."""
    assert main(["eval", "--model", str(tiny_model_dir), "--data", "shapes", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"metrics", "params", "flops", "latency_ms"}
    m = out["metrics"]
    for key in ("shapes/zs_color", "shapes/zs_position", "shapes/zs_mean", "shapes/i2t_r1", "shapes/t2i_r5",
                "shapes/ground_swap", "shapes/ground_absent", "shapes/ground_mean"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["shapes/i2t_r1"] <= m["shapes/i2t_r5"]
    assert out["flops"]["image"] > 0 and out["latency_ms"]["image"] > 0


def test_eval_bad_input(tiny_model_dir, tmp_path, capsys):
    """Through the command line's entry point in this process; the missing dataset in a real process,
    since its folder comes from the environment the process starts with."""
    def bad(*args, needle):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        out, err = capsys.readouterr()
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and needle in lines[0], err
        assert out == ""

    bad("eval", "--model", str(tmp_path / "nope"), needle="neither a model folder")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / WEIGHTS_NAME).write_bytes(b"\x00" * 100)
    bad("eval", "--model", str(corrupt), needle="not a readable safetensors")
    bad("eval", "--model", str(tiny_model_dir), "--data", "imagenet", needle="unknown dataset 'imagenet'")
    bad("eval", needle="--model")
    bad("frobnicate", needle="invalid choice")
    assert_bad_input(hipp("eval", "--model", str(tiny_model_dir), "--data", "fmnist",
                          env={"HIPP_FASHION_MNIST": str(tmp_path / "no-fmnist")}), "dataset-fashion-mnist")
