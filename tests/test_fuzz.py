"""Fuzz: bad input to every command is one `hipp: error: ...` line on stderr and exit status 2, never a
traceback, and leaves every file the user has (the fixture folders, the repository checkout) as it was.

Each case builds its bad input in its own folder and runs `hipp.cli.main.main` in-process (fast); a few run as
real `python -m hipp` processes to show the exit status, and the permission cases run in a forked child
that drops root (chmod means nothing to root).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from hipp.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
CASE_SECONDS = 60  # a case that blocks (a FIFO opened, a huge grid) fails instead of hanging the suite
NOBODY = 65534
TRAIN = {"channel_group": 16, "seed": 0, "steps": 2, "pref_groups": 2, "save_every": 2, "lr": 1.0e-2,
         "controller": {"hidden": 16, "rank": 4}, "data": {"batch_size": 8, "shape_fraction": 1.0, "negatives": 2}}


# --- the shared world: a tiny model and a controller trained on it ---------------------------------

@dataclass
class World:
    model: Path
    controller: Path


@pytest.fixture(scope="session")
def world(tiny_model_dir, tmp_path_factory) -> World:
    """A controller trained for two steps on the tiny model (about a second), through the CLI."""
    root = tmp_path_factory.mktemp("fuzz-world")
    cfg = root / "train.yaml"
    cfg.write_text(yaml.safe_dump({**TRAIN, "model": str(tiny_model_dir), "output": str(root / "controller")}))
    assert main(["train", "--config", str(cfg)]) == 0
    return World(tiny_model_dir, root / "controller")


# --- fixture builders -------------------------------------------------------------------------------

def png(path: Path, value: int = 128) -> Path:
    Image.new("RGB", (16, 16), (value, 60, 200)).save(path)
    return path


def noisy(path: Path, fmt: str, size=(64, 64)) -> Path:
    """An image that compresses badly, so cutting its file short loses pixels."""
    arr = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return path


def truncated(path: Path, fmt: str) -> Path:
    data = noisy(path, fmt).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose header claims width x height: only a decoder that trusts it suffers."""
    one = path.with_suffix(".tmp.png")
    Image.new("L", (1, 1)).save(one)
    data = bytearray(one.read_bytes())
    one.unlink()
    ihdr = 8 + 8  # PNG signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


def pairs_csv(folder: Path, rows: list[str], header: str = "filepath,title", name: str = "pairs.csv") -> Path:
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def image_folder(d: Path, classes: dict[str, int]) -> Path:
    """classes: name -> how many good images."""
    root = d / "images"
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            png(root / name / f"{i}.png", value=40 * i)
    return root


def config(d: Path, world: World, **over) -> Path:
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TRAIN, "model": str(world.model), "output": str(d / "out"), **over}))
    return path


def raw_config(d: Path, text: str | bytes) -> Path:
    path = d / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def controller_copy(d: Path, world: World, edit: Callable[[dict], object] | None = None) -> Path:
    """The trained controller copied into the case folder, its controller.json passed through `edit`
    (which changes the dict in place, or returns what to write instead)."""
    out = d / "controller"
    shutil.copytree(world.controller, out)
    if edit is not None:
        cfg = json.loads((out / "controller.json").read_text())
        new = edit(cfg)
        (out / "controller.json").write_text(json.dumps(cfg if new is None else new))
    return out


def damaged_weights(d: Path, world: World, change: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file
    out = controller_copy(d, world)
    tensors = load_file(str(out / "controller.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "controller.safetensors"))
    return out


def remote_code_model(d: Path) -> Path:
    """A transformers-style folder whose config asks for code from the hub."""
    folder = d / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "clip", "architectures": ["EvilModel"], "auto_map": {"AutoModel": "evil/repo--modeling.Evil"},
        "trust_remote_code": True}))
    return folder


def user_folder(d: Path) -> Path:
    """An existing folder of the user's that no hipp command wrote."""
    out = d / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    return out


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def new_version(cfg: dict) -> None:
    cfg["version"] = 2


# --- the cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    build: Callable[[World, Path], list]  # -> argv, given the world and the case's own folder
    needle: str                           # a piece of the error line ("" where another part owns the wording)
    marks: tuple = ()


def case(id, needle, build, *marks):
    return Case(id, build, needle, marks)


# builders of argv: each takes (world, case folder)

def ev(spec_of: Callable[[Path], str], *extra):
    """eval on the tiny model with --data spec_of(case folder)."""
    return lambda w, d: ["eval", "--model", w.model, "--data", spec_of(d), *extra]


def csv_of(rows: list[str], header: str = "filepath,title"):
    """csv:FILE whose rows may name good.png, which exists."""
    def spec(d: Path) -> str:
        png(d / "good.png")
        return f"csv:{pairs_csv(d, rows, header)}"
    return spec


def csv_bytes(data: bytes):
    def spec(d: Path) -> str:
        (d / "pairs.csv").write_bytes(data)
        return f"csv:{d / 'pairs.csv'}"
    return spec


def csv_image(make_image: Callable[[Path], object], name: str = "img.png"):
    """csv:FILE of a good image and the one make_image(path) writes."""
    def spec(d: Path) -> str:
        png(d / "good.png")
        make_image(d / name)
        return f"csv:{pairs_csv(d, ['good.png,a good image', f'{name},the bad image'])}"
    return spec


def csv_outside(name_of: Callable[[Path], str]):
    """csv:FILE in data/ whose row names name_of(case folder), an image beside data/, not in it."""
    def spec(d: Path) -> str:
        png(d / "elsewhere.png")
        (d / "data").mkdir()
        return f"csv:{pairs_csv(d / 'data', [f'{name_of(d)},from outside'])}"
    return spec


def symlink_out(d: Path) -> str:
    (d / "data" / "link.png").symlink_to(d / "elsewhere.png")
    return "link.png"


def folder_with(classes: dict[str, int], change: Callable[[Path], object] = lambda root: None):
    """folder:DIR with good images per class, then change(root)."""
    def spec(d: Path) -> str:
        root = image_folder(d, classes)
        change(root)
        return f"folder:{root}"
    return spec


def _args(args, d: Path) -> list:
    """Arguments, where a callable one is a builder called with the case folder."""
    return [a(d) if callable(a) else a for a in args]


def out(d: Path) -> Path:
    return d / "out"


def a_file(d: Path) -> Path:
    return png(d / "x.png")


def exported(w: World, d: Path) -> Path:
    """An export of the world's controller (utility=1) in the case folder."""
    if not (d / "export").is_dir():
        assert main(["export", "--controller", str(w.controller), *PREF, "--out", str(d / "export")]) == 0
    return d / "export"


def config_of(text: str):
    def build(d: Path) -> Path:
        (d / "recover.yaml").write_text(text)
        return d / "recover.yaml"
    return build


def rc(model_of, *args, out_of=out):
    """recover --model model_of(world, case folder) --out out_of(case folder), then args."""
    return lambda w, d: ["recover", "--model", model_of(w, d), "--out", out_of(d), *_args(args, d)]


def q(*args, command="query"):
    """query (or export / pareto / bench) on the trained controller."""
    return lambda w, d: [command, "--controller", w.controller, *_args(args, d)]


def qc(edit, *args, command="query"):
    """query (...) on a copy of the controller whose controller.json went through `edit`."""
    return lambda w, d: [command, "--controller", controller_copy(d, w, edit), *_args(args, d)]


def qf(change: Callable[[Path], object], *args):
    """query on a copy of the controller folder after change(folder)."""
    def build(w: World, d: Path) -> list:
        folder = controller_copy(d, w)
        change(folder)
        return ["query", "--controller", folder, *args]
    return build


def qw(change: Callable[[dict], object], *args):
    """query on a copy of the controller whose weights went through change(tensors)."""
    return lambda w, d: ["query", "--controller", damaged_weights(d, w, change), *args]


def tr(*extra, **over):
    """train on a config with `over` changed (a callable value is a builder called with the case folder)."""
    def build(w: World, d: Path) -> list:
        values = {k: str(v(d)) if callable(v) else v for k, v in over.items()}
        return ["train", "--config", config(d, w, **values), *extra]
    return build


def tr_raw(text):
    return lambda w, d: ["train", "--config", raw_config(d, text)]


def resume_without_state(w: World, d: Path) -> list:
    out = controller_copy(d, w)
    (out / "train_state.safetensors").unlink()
    return ["train", "--config", config(d, w, output=str(out)), "--resume"]


def replace_by_fifo(path: Path) -> None:
    path.unlink()
    fifo(path)


PREF = ("--pref", "utility=1")
BUDGETS = [("nan", "0.5,nan", "ratio in (0, 1]"), ("inf", "inf", "ratio in (0, 1]"), ("zero", "0", "ratio in (0, 1]"),
           ("negative", "-0.3", "ratio in (0, 1]"), ("above-one", "0.5,1.5", "ratio in (0, 1]"),
           ("text", "half", "must be a number"), ("empty", "", "must be a number"),
           ("stray-comma", "0.5,,0.7", "must be a number")]

CASES = [
    # eval: the dataset list
    case("eval-unknown-dataset", "unknown dataset", ev(lambda d: "imagenet")),
    case("eval-csv-without-file", "unknown dataset", ev(lambda d: "csv:")),
    case("eval-folder-without-dir", "unknown dataset", ev(lambda d: "folder:")),
    # eval: the CSV file itself
    case("csv-missing", "CSV file not found", ev(lambda d: f"csv:{d / 'none.csv'}")),
    case("csv-is-a-folder", "is a folder", ev(lambda d: f"csv:{d}")),
    case("csv-is-a-fifo", "not a regular file", ev(lambda d: f"csv:{fifo(d / 'pairs.csv')}")),
    case("csv-is-a-device", "not a regular file", ev(lambda d: "csv:/dev/zero")),
    case("csv-not-utf8", "not UTF-8", ev(csv_bytes("filepath,title\ncaf\xe9.png,un caf\xe9\n".encode("latin-1")))),
    case("csv-empty", "is empty", ev(csv_bytes(b""))),
    case("csv-blank-lines-only", "is empty", ev(csv_bytes(b"\n\n  \n"))),
    case("csv-header-only", "header but no rows", ev(csv_of([]))),
    case("csv-missing-columns", "needs columns", ev(csv_of(["good.png,a caption"], header="path,caption"))),
    case("csv-empty-caption", "empty 'title'", ev(csv_of(["good.png,   "]))),
    case("csv-empty-filepath", "empty 'filepath'", ev(csv_of([",a caption"]))),
    case("csv-too-few-fields", "has 1 fields; the header has 2", ev(csv_of(["good.png"]))),
    case("csv-too-many-fields", "has 3 fields; the header has 2", ev(csv_of(["good.png,a red, big square"]))),
    case("csv-nul-in-path", "not a valid path", ev(csv_bytes(b"filepath,title\ngo\x00od.png,a caption\n"))),
    case("csv-unclosed-quote-huge-field", "field larger than field limit",
         ev(csv_bytes(b'filepath,title\ngood.png,"' + b"x" * (2 << 20) + b"\n"))),
    # eval: the CSV's rows
    case("csv-row-missing-image", "image not found", ev(csv_of(["good.png,ok", "gone.png,missing"]))),
    case("csv-row-newline-in-name", "image not found", ev(csv_of(['"gone\nagain.png",a name with a newline']))),
    case("csv-row-is-a-folder", "is a folder", ev(lambda d: (d / "sub").mkdir() or csv_of(["sub,a folder"])(d))),
    case("csv-row-is-a-fifo", "not a regular file",
         ev(lambda d: fifo(d / "f.png") and csv_of(["f.png,a fifo"])(d))),
    case("csv-row-absolute-path", "outside the CSV's folder", ev(csv_outside(lambda d: f"{d}/elsewhere.png"))),
    case("csv-row-dotdot", "outside the CSV's folder", ev(csv_outside(lambda d: "../elsewhere.png"))),
    case("csv-row-symlink-out", "outside the CSV's folder", ev(csv_outside(symlink_out))),
    case("csv-row-device-allowed-outside", "not a regular file",
         ev(csv_of(["/dev/zero,endless"]), "--allow-outside")),
    # eval: the CSV's images (decoded after the model loads)
    case("image-not-an-image", "not an image format", ev(csv_image(lambda p: p.write_bytes(b"hello, no picture")))),
    case("image-empty-file", "the file is empty", ev(csv_image(lambda p: p.write_bytes(b"")))),
    case("image-truncated-png", "cannot read image", ev(csv_image(lambda p: truncated(p, "PNG")))),
    case("image-truncated-jpeg", "cannot read image", ev(csv_image(lambda p: truncated(p, "JPEG"), "img.jpg"))),
    case("image-bomb-beyond-pillow", "decompression bomb", ev(csv_image(lambda p: bomb(p, 100_000, 100_000)))),
    case("image-bomb-beyond-hipp", "decompression bomb", ev(csv_image(lambda p: bomb(p, 9000, 9000)))),
    # eval: image folders
    case("folder-missing", "image folder not found", ev(lambda d: f"folder:{d / 'none'}")),
    case("folder-is-a-file", "is not a folder", ev(lambda d: f"folder:{png(d / 'x.png')}")),
    case("folder-no-classes", "at least two class sub-folders; found 0", ev(lambda d: f"folder:{d}")),
    case("folder-one-class", "found 1 (cats)", ev(folder_with({"cats": 2}))),
    case("folder-class-without-images", "holds no images", ev(folder_with({"cats": 2, "dogs": 0}))),
    case("folder-unreadable-image", "cannot read image",
         ev(folder_with({"cats": 2, "dogs": 1}, lambda r: (r / "dogs" / "bad.png").write_bytes(b"\x89PNG broken")))),
    case("folder-fifo-image", "not a regular file",
         ev(folder_with({"cats": 1, "dogs": 1}, lambda r: fifo(r / "dogs" / "f.png")))),
    case("folder-symlink-to-device", "not a regular file",
         ev(folder_with({"cats": 1, "dogs": 1}, lambda r: (r / "dogs" / "z.png").symlink_to("/dev/zero")))),
    # eval: the model (hipp/checkpoint.py)
    case("eval-model-missing", "", lambda w, d: ["eval", "--model", d / "none", "--data", "shapes"]),
    case("eval-model-empty-folder", "", lambda w, d: ["eval", "--model", d, "--data", "shapes"]),
    case("eval-model-remote-code", "", lambda w, d: ["eval", "--model", remote_code_model(d), "--data", "shapes"]),
    # train: the config file
    case("config-missing", "config file not found", lambda w, d: ["train", "--config", d / "none.yaml"]),
    case("config-is-a-folder", "is a folder", lambda w, d: ["train", "--config", d]),
    case("config-is-a-fifo", "not a regular file", lambda w, d: ["train", "--config", fifo(d / "cfg.yaml")]),
    case("config-not-utf8", "not UTF-8", tr_raw(b"model: caf\xe9\n")),
    case("config-bad-yaml", "not valid YAML", tr_raw("steps: [1, 2\n")),
    case("config-not-a-mapping", "mapping at the top level", tr_raw("- steps\n- 3\n")),
    case("config-python-tag", "not valid YAML", tr_raw("steps: !!python/object/apply:os.system ['true']\n")),
    case("config-nested-too-deep", "nested too deeply", tr_raw("steps: " + "[" * 20000 + "]" * 20000 + "\n")),
    case("config-unknown-key", "unknown config key 'stepz'", tr(stepz=3)),
    case("config-wrong-type", "config key 'steps': expected int", tr(steps="ten")),
    case("config-float-steps", "config key 'steps': expected int", tr(steps=1.5)),
    case("config-float-as-text", "write 1.0e-3", tr_raw("lr: 1e-3\n")),
    # train: values
    case("config-zero-steps", "'steps' must be >= 1, got 0", tr(steps=0)),
    case("config-negative-steps", "'steps' must be >= 1, got -5", tr(steps=-5)),
    case("config-overflowing-steps", "config key 'steps'", tr(steps=10**40)),
    case("config-zero-batch", "'data.batch_size' must be >= 2", tr(data={"batch_size": 0})),
    case("config-zero-pref-groups", "'pref_groups' must be >= 1", tr(pref_groups=0)),
    case("config-negative-save-every", "'save_every' must be >= 1", tr(save_every=-1)),
    case("config-zero-lr", "'lr' must be > 0", tr(lr=0.0)),
    case("config-negative-lr", "'lr' must be > 0", tr(lr=-1.0e-3)),
    case("config-inf-lr", "config key 'lr': expected a finite number", tr_raw("lr: .inf\n")),
    case("config-overflowing-lr", "config key 'lr': expected a finite number", tr_raw("lr: 1.0e+999\n")),
    case("config-nan-lr", "config key 'lr': expected a finite number", tr_raw("lr: .nan\n")),
    case("config-nan-deep", "config key 'objectives.names[1]'", tr_raw("objectives: {names: [utility, .nan]}\n")),
    case("config-zero-hidden", "'controller.hidden' must be >= 1", tr(controller={"hidden": 0})),
    case("config-negative-temperature", "'temperature_end' must be > 0", tr(temperature_end=-0.1)),
    case("config-seed-overflow", "'seed' must be in", tr(seed=2**40)),
    case("config-bad-target-range", "'target_range' must be", tr(target_range=[0.9, 0.2])),
    # train: the run (hipp/trainer.py, hipp/outputs.py, hipp/checkpoint.py)
    case("train-zero-max-steps", "--max-steps", tr("--max-steps", "0")),
    case("train-output-not-hipps", "not empty", tr(output=user_folder)),
    case("train-resume-without-state", "", resume_without_state),
    case("train-resume-not-hipps", "not empty", tr("--resume", output=user_folder)),
    case("train-model-missing", "", tr(model="/nonexistent/model")),
    case("train-model-remote-code", "", tr(model=remote_code_model)),
    # query: preferences
    case("pref-overflow", "'utility' must be finite", q("--pref", "utility=1e999")),
    case("pref-inf", "'flops' must be finite", q("--pref", "flops=inf")),
    case("pref-nan", "'utility' must be finite", q("--pref", "utility=nan,flops=1")),
    case("pref-sum-overflows", "add up beyond the largest float", q("--pref", "utility=1e308,flops=1e308")),
    case("pref-negative", "must be >= 0", q("--pref", "utility=-1,flops=2")),
    case("pref-all-zero", "sum to 0", q("--pref", "0,0,0,0")),
    case("pref-unknown-name", "unknown objective 'speed'", q("--pref", "speed=1")),
    case("pref-too-many-values", "has 5 positional values", q("--pref", "1,1,1,1,1")),
    case("pref-garbage", "is not a number", q("--pref", "utility=1=2")),
    case("pref-punctuation", "positional values", q("--pref", "!!!")),
    case("pref-empty", "empty preference", q("--pref", "")),
    case("pref-cost-only-and-bound", "gives them no weight", q("--pref", "flops=1", "--max-flops", "0.5")),
    case("pref-bound-and-tokens", "goes with a bound query", q(*PREF, "--max-flops", "0.5", "--visual-tokens", "0.5")),
    case("pref-nor-bound", "give --pref", q()),
    # query: bounds and polishing (checked before the base model loads)
    case("max-flops-nan", "max_flops must be a ratio", q("--max-flops", "nan")),
    case("max-flops-inf", "max_flops must be a ratio", q("--max-flops", "inf")),
    case("max-flops-zero", "max_flops must be a ratio", q("--max-flops", "0")),
    case("max-flops-negative", "max_flops must be a ratio", q("--max-flops=-0.5")),
    case("max-flops-above-one", "max_flops must be a ratio", q("--max-flops", "1.5")),
    case("max-flops-text", "invalid float value", q("--max-flops", "half")),
    case("max-params-zero", "max_params must be a ratio", q("--max-params", "0")),
    case("polish-negative", "polish steps", q("--max-flops", "0.5", "--polish=-1")),
    case("polish-overflow", "polish steps", q("--max-flops", "0.5", "--polish", str(10**40))),
    case("polish-fraction", "invalid int value", q("--max-flops", "0.5", "--polish", "1.5")),
    case("polish-with-pref", "--polish needs --max-flops", q(*PREF, "--polish", "3")),
    # query: the controller folder
    case("controller-missing", "controller folder not found",
         lambda w, d: ["query", "--controller", d / "none", *PREF]),
    case("controller-is-a-file", "is a file, not a folder", lambda w, d: ["query", "--controller", a_file(d), *PREF]),
    case("controller-empty-folder", "has no controller.json", lambda w, d: ["query", "--controller", d, *PREF]),
    case("controller-json-fifo", "not a regular file", qf(lambda c: replace_by_fifo(c / "controller.json"), *PREF)),
    case("controller-json-garbage", "not valid JSON",
         qf(lambda c: (c / "controller.json").write_text("{oops"), *PREF)),
    case("controller-json-array", "must hold a JSON object", qc(lambda cfg: [cfg], *PREF)),
    case("controller-no-fingerprint", "no base-model 'fingerprint'",
         qc(lambda cfg: cfg.pop("fingerprint") and None, *PREF)),
    case("controller-empty-fingerprint", "no base-model 'fingerprint'",
         qc(lambda cfg: cfg.update(fingerprint=""), *PREF)),
    case("controller-newer-version", "written by a newer HiPP (controller version 2); this HiPP reads up to 1",
         qc(new_version, *PREF)),
    case("controller-version-as-text", "controller version '1'", qc(lambda cfg: cfg.update(version="1"), *PREF)),
    case("controller-names-not-a-list", "'objective_names' must be",
         qc(lambda cfg: cfg.update(objective_names="utility"), *PREF)),
    case("controller-hidden-text", "hparams.hidden must be",
         qc(lambda cfg: cfg["hparams"].update(hidden="16"), *PREF)),
    case("controller-hidden-huge", "hparams.hidden must be",
         qc(lambda cfg: cfg["hparams"].update(hidden=10**9), *PREF)),
    case("controller-space-garbage", "'space' must be", qc(lambda cfg: cfg.update(space=[1, 2]), *PREF)),
    case("controller-space-huge-layer", "space.layers[0].num_heads",
         qc(lambda cfg: cfg["space"]["layers"][0].update(num_heads=10**12), *PREF)),
    case("controller-extra-not-object", "'extra' must be an object", qc(lambda cfg: cfg.update(extra=[1]), *PREF)),
    case("controller-weights-disagree", "config says", qc(lambda cfg: cfg["hparams"].update(rank=5), *PREF)),
    case("controller-weights-missing-tensor", "does not match controller.json",
         qw(lambda t: t.pop(sorted(t)[0]), *PREF)),
    case("controller-weights-nan", "non-finite", qw(lambda t: t[sorted(t)[0]].fill_(float("nan")), *PREF)),
    case("controller-weights-garbage", "not a readable safetensors file",
         qf(lambda c: (c / "controller.safetensors").write_bytes(b"\x00" * 64), *PREF)),
    # export
    case("export-pref-nan", "must be finite", q("--pref", "nan,1,0,0", "--out", out, command="export")),
    case("export-max-flops-zero", "max_flops must be a ratio", q("--max-flops", "0", "--out", out, command="export")),
    case("export-newer-controller", "newer HiPP", qc(new_version, *PREF, "--out", out, command="export")),
    case("export-out-is-a-file", "is a file", q(*PREF, "--out", a_file, command="export")),
    case("export-out-not-hipps", "not empty", q(*PREF, "--out", user_folder, command="export")),
    # pareto
    case("pareto-zero-points", "at least one point", q("--points", "0", "--out", out, command="pareto")),
    case("pareto-negative-points", "at least one point", q("--points=-3", "--out", out, command="pareto")),
    case("pareto-huge-points", "at most 10000", q("--points", str(10**12), "--out", out, command="pareto")),
    case("pareto-points-nan", "invalid int value", q("--points", "nan", "--out", out, command="pareto")),
    case("pareto-out-is-a-file", "is a file", q("--out", a_file, command="pareto")),
    case("pareto-out-not-hipps", "not empty", q("--out", user_folder, command="pareto")),
    case("pareto-newer-controller", "newer HiPP", qc(new_version, "--points", "2", "--out", out, command="pareto")),
    # bench
    *[case(f"bench-budgets-{name}", needle, q(f"--budgets={budgets}", "--out", out, command="bench"))
      for name, budgets, needle in BUDGETS],
    case("bench-unknown-method", "", q("--methods", "magic", "--out", out, command="bench")),
    case("bench-polish-negative", "polish steps", q("--polish=-1", "--out", out, command="bench")),
    case("bench-polish-overflow", "polish steps", q("--polish", str(10**40), "--out", out, command="bench")),
    case("bench-out-not-hipps", "not empty", q("--budgets", "0.5", "--out", user_folder, command="bench")),
    # convert (hipp/backends/convert.py, hipp/checkpoint.py)
    case("convert-model-missing", "", lambda w, d: ["convert", "--model", d / "none", "--out", d / "out"]),
    case("convert-model-is-a-file", "", lambda w, d: ["convert", "--model", png(d / "x.png"), "--out", d / "out"]),
    case("convert-model-empty-folder", "", lambda w, d: ["convert", "--model", d, "--out", d / "out"]),
    case("convert-out-is-a-file", "is a file", lambda w, d: ["convert", "--model", w.model, "--out", png(d / "x.png")]),
    case("convert-out-not-hipps", "not empty", lambda w, d: ["convert", "--model", w.model, "--out", user_folder(d)]),
    # recover (hipp/recovery/)
    case("recover-model-not-an-export", "is not a HiPP export", rc(lambda w, d: w.controller)),
    case("recover-model-missing", "is not a HiPP export", rc(lambda w, d: d / "none")),
    case("recover-config-negative-lr", "lr", rc(exported, "--config", config_of("lr: -1\n"))),
    case("recover-config-unknown-key", "", rc(exported, "--config", config_of("lr_max: 1\n"))),
    case("recover-out-is-the-export", "another folder", lambda w, d: ["recover", "--model", exported(w, d),
                                                                       "--out", d / "export"]),
    case("recover-out-not-hipps", "not empty", rc(exported, out_of=user_folder)),
    case("recover-resume-nothing", "nothing to resume", rc(exported, "--resume")),
    # the command line itself
    case("no-command", "", lambda w, d: []),
    case("unknown-command", "invalid choice", lambda w, d: ["prune"]),
    case("unknown-option", "unrecognized arguments", q(*PREF, "--fast")),
]


# --- what every case must leave unchanged -------------------------------------------------------------

_DIGESTS: dict[Path, tuple] = {}


def _digest(path: Path) -> str:
    """sha256 of a file, recomputed only when its size, mtime or inode moved (any write moves them)."""
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if _DIGESTS.get(path, (None,))[0] != key:
        _DIGESTS[path] = (key, hashlib.sha256(path.read_bytes()).hexdigest())
    return _DIGESTS[path][1]


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` (folders, links and special files included) -> what it holds."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p)] = _digest(p)
        elif stat.S_ISLNK(st.st_mode):
            out[str(p)] = "link:" + os.readlink(p)
        else:
            out[str(p)] = f"mode:{stat.S_IFMT(st.st_mode):o}"
    return out


class Checkout:
    """The repository's tracked files, path -> sha256. Other people edit this checkout too: each case
    compares with its own "before", not with the session's start."""

    def __init__(self, root: Path):
        names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        self.paths = [root / n for n in names.decode().split("\0") if n]

    def hashes(self) -> dict[str, str | None]:
        return {str(p): _digest(p) if p.is_file() else None for p in self.paths}


@pytest.fixture(scope="session")
def checkout() -> Checkout:
    return Checkout(ROOT)


def snapshot(world: World, d: Path) -> dict:
    return {**tree(d), **tree(world.model), **tree(world.controller)}


def assert_one_error_line(code, out: str, err: str, needle: str) -> None:
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr must be one line, got {err!r}"
    assert lines[0].startswith("hipp: error: "), lines[0]
    assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def _timeout(signum, frame):
    raise TimeoutError(f"the case ran over {CASE_SECONDS} s (blocked on a FIFO or a device?)")


def run_in_process(argv: list, capsys) -> tuple[int, str, str]:
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(CASE_SECONDS)
    try:
        code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(c: Case, world, checkout, tmp_path, capsys, monkeypatch):
    d = tmp_path / "case"
    d.mkdir()
    argv = c.build(world, d)
    monkeypatch.chdir(d)  # anything written to a relative path lands where the check below sees it
    before, repo = snapshot(world, d), checkout.hashes()
    capsys.readouterr()
    code, out, err = run_in_process(argv, capsys)
    assert_one_error_line(code, out, err, c.needle)
    assert snapshot(world, d) == before
    assert checkout.hashes() == repo


def test_cases_are_many_distinct_and_cover_every_command(world, tmp_path):
    assert len({c.id for c in CASES}) == len(CASES) >= 60
    commands = set()
    for i, c in enumerate(CASES):
        (tmp_path / str(i)).mkdir()
        commands.update(c.build(world, tmp_path / str(i))[:1])
    assert commands == {"eval", "train", "query", "export", "pareto", "bench", "convert", "recover", "prune"}


# --- real processes ------------------------------------------------------------------------------------

SUBPROCESS_CASES = ["pref-nan", "controller-newer-version", "csv-row-absolute-path"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_a_real_process_exits_2_with_one_line(name, world, checkout, tmp_path):
    c = next(c for c in CASES if c.id == name)
    d = tmp_path / "case"
    d.mkdir()
    argv = [str(a) for a in c.build(world, d)]
    before, repo = snapshot(world, d), checkout.hashes()
    r = subprocess.run([sys.executable, "-m", "hipp", *argv], capture_output=True, text=True, timeout=300, cwd=d,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_error_line(r.returncode, r.stdout, r.stderr, c.needle)
    assert r.stdout == "" and r.stderr.endswith("\n")
    assert snapshot(world, d) == before
    assert checkout.hashes() == repo


# --- permissions: a forked child that is not root ------------------------------------------------------

def run_as_user(argv: list, workdir: Path) -> tuple[int, str, str]:
    """main(argv) in a forked child that drops root first, so chmod applies; its exit status is main's."""
    out_path, err_path = workdir / ".stdout", workdir / ".stderr"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            import torch
            torch.set_num_threads(1)  # the parent's thread pool did not survive the fork
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            with open(out_path, "w") as out, open(err_path, "w") as err:
                sys.stdout, sys.stderr = out, err
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(workdir)
                try:
                    code = main([str(a) for a in argv])
                except BaseException:  # main let something through: show it, as a process would
                    traceback.print_exc()
                    code = 98
                out.flush()
                err.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + CASE_SECONDS
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"{argv} ran over {CASE_SECONDS} s")
        time.sleep(0.05)
    out, err = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    return os.waitstatus_to_exitcode(status), out, err


@pytest.fixture(scope="module")
def open_world(world) -> World:
    """The model and controller where the unprivileged child can read them (pytest's tmp is root's alone),
    and every command's modules imported here: the child may not be allowed to read the interpreter's own
    library (under root's home), and importing is not what these cases test."""
    import encodings.utf_8_sig  # noqa: F401
    import hipp.storage.checkpoint, hipp.evaluation.evaluate, hipp.export.pruned, hipp.evaluation.pareto, hipp.query.bound, hipp.training.trainer  # noqa: E401, F401
    base = Path(tempfile.mkdtemp(prefix="hipp-fuzz-"))
    for src, name in ((world.model, "model"), (world.controller, "controller")):
        shutil.copytree(src, base / name)
    cfg = json.loads((base / "controller" / "controller.json").read_text())
    cfg["extra"]["base_model"] = str(base / "model")
    (base / "controller" / "controller.json").write_text(json.dumps(cfg))
    for p in (base, *base.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield World(base / "model", base / "controller")
    shutil.rmtree(base)


def unreadable(p: Path) -> Path:
    p.chmod(0)
    return p


def read_only_parent(d: Path) -> Path:
    """An output path in a folder nobody may write."""
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    return d / "ro" / "out"


def unreadable_image(d: Path) -> str:
    unreadable(png(d / "a.png"))
    return f"csv:{pairs_csv(d, ['a.png,a'])}"


PERMISSION_CASES = [
    case("perm-csv-unreadable", "permission denied", ev(lambda d: f"csv:{unreadable(pairs_csv(d, ['a.png,a']))}")),
    case("perm-image-unreadable", "permission denied", ev(unreadable_image)),
    case("perm-class-folder-unreadable", "permission denied",
         ev(folder_with({"cats": 1, "dogs": 1}, lambda r: unreadable(r / "dogs")))),
    case("perm-config-unreadable", "permission denied", lambda w, d: ["train", "--config", unreadable(config(d, w))]),
    case("perm-controller-folder-unreadable", "permission denied", qf(unreadable, *PREF)),
    case("perm-controller-json-unreadable", "permission denied",
         qf(lambda c: unreadable(c / "controller.json"), *PREF)),
    case("perm-export-out-read-only", "permission denied", q(*PREF, "--out", read_only_parent, command="export")),
    case("perm-pareto-out-read-only", "permission denied",
         q("--points", "2", "--out", read_only_parent, command="pareto")),
]


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=c.marks) for c in PERMISSION_CASES])
def test_permissions_are_one_line(c: Case, open_world, checkout):
    d = Path(tempfile.mkdtemp(prefix="hipp-fuzz-case-", dir=open_world.model.parent))
    d.chmod(0o777)  # the child writes its captured output here
    try:
        argv = c.build(open_world, d)
        before, repo = snapshot(open_world, d), checkout.hashes()
        code, out, err = run_as_user(argv, d)
        assert_one_error_line(code, out, err, c.needle)
        assert snapshot(open_world, d) == before
        assert checkout.hashes() == repo
    finally:
        for p in (d, *d.rglob("*")):
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(d)
