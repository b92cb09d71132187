"""`hipp` command line. Bad input: one line on stderr, exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from ..errors import HippError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too: keep it to one line
        raise HippError(f"{self.prog}: {message}")


def _cmd_eval(args) -> int:
    from ..storage.checkpoint import family, get_processor, get_tokenizer, load_model, preprocess_cfg
    from ..evaluation.evaluate import DATASETS, check_datasets, report

    datasets = DATASETS if args.data is None else tuple(d.strip() for d in args.data.split(","))
    check_datasets(datasets, args.allow_outside)  # before loading anything
    model = load_model(args.model)
    if family(model) == "llava":  # generative: captions, attribute questions, POPE, Fashion-MNIST
        from ..evaluation.generative import evaluate_generative, kinds_for

        rep = evaluate_generative(model, get_processor(args.model), kinds=kinds_for(datasets))
    else:
        rep = report(model, get_tokenizer(args.model), preprocess_cfg(model), datasets,
                     allow_outside=args.allow_outside)
    if args.json:
        print(json.dumps(rep))
    else:
        for k, v in rep["metrics"].items():
            print(f"{k:28s} {v:.4f}")
        if "utility" in rep:
            print(f"{'utility':28s} {rep['utility']:.4f}")
        print(f"{'params':28s} {rep['params']:,}")
        for t, f in rep["flops"].items():
            print(f"{'flops/' + t:28s} {f / 1e6:.2f} M")
        for t in rep["flops"]:  # the model's stages
            print(f"{'latency_ms/' + t:28s} {rep['latency_ms'][t]:.3f} (batch {rep['latency_ms']['batch']})")
    return 0


def _cmd_train(args) -> int:
    from ..config import load_config
    from ..training.trainer import TrainConfig, train

    cfg = load_config(TrainConfig, args.config)
    if args.output:
        cfg.output = args.output
    info = train(cfg, resume=args.resume, max_steps=args.max_steps, overwrite=args.overwrite)
    print(f"controller saved in {info['output']} ({info['steps']} steps, {info['train_seconds']:.0f} s)",
          file=sys.stderr)
    return 0


def _cmd_recover(args) -> int:
    from ..config import load_config
    from ..recovery import RecoverConfig, recover

    cfg = load_config(RecoverConfig, args.config) if args.config else RecoverConfig()
    result = recover(args.model, cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if "val_utility_after" not in result:  # another process of a multi-process run
        return 0
    return _report(args, result, f"recovered export written to {result['out']}: validation utility "
                                 f"{result['val_utility_before']:.4f} -> {result['val_utility_after']:.4f} "
                                 f"(best at step {result['best_step']} of {result['steps_run']}"
                                 f"{', stopped early' if result['stopped_early'] else ''}; {result['seconds']:.0f} s)")


def _cmd_query(args) -> int:
    from .query import run
    return run(args)


def _cmd_export(args) -> int:
    from ..export.pruned import run
    return run(args)


def _claim(args, command: str, names: tuple[str, ...]):
    """Hold --out for a report command (hipp.storage.outputs.claim); a folder from before output markers that
    holds only the command's `names` counts as its own."""
    import os

    from ..storage.outputs import claim
    return claim(args.out, command, args.overwrite, legacy=lambda out: set(os.listdir(out)) <= set(names))


def _controller_and_base(args):
    from ..controller.files import load_controller
    from ..query.bound import load_base

    controller = load_controller(args.controller)
    return controller, load_base(controller, args.controller, args.base_model, args.device)


def _report(args, result: dict, line: str) -> int:
    """--json: the whole object on stdout; otherwise one line saying where the outputs are."""
    print(json.dumps(result) if args.json else line)
    return 0


def _cmd_pareto(args) -> int:
    from ..evaluation.pareto import check_points, sweep

    check_points(args.points)  # before the folder is claimed and the model loads
    with _claim(args, "pareto", PARETO_FILES) as out:
        controller, base = _controller_and_base(args)
        result = sweep(controller, base.model, base.tokenizer, base.preprocess_cfg, points=args.points, out_dir=out)
    return _report(args, result, f"{len(result['rows'])} preferences, utility hypervolume "
                                 f"{result['hypervolume']['utility']:.3f}; outputs in {out}")


def _cmd_bench(args) -> int:
    from ..baselines.allocate import check_target
    from ..query.polish import check_steps

    from ..query.bound import check_device, check_search

    budgets = [check_target(b) for b in args.budgets.split(",")]
    check_steps(args.polish)
    check_search(args.candidates, args.calib_images)
    check_device(args.device)
    if args.test_items is not None and args.test_items < 10:
        raise HippError(f"--test-items must be at least 10, got {args.test_items}")
    from ..recovery.of_plan import bench_config
    recovery = bench_config(args.recover_steps, args.recover_config)  # a bad config: one line, before any load
    if args.reconstruct is not None:
        from ..export.pruned import check_reconstruct_count
        check_reconstruct_count(args.reconstruct)
        if recovery is not None or args.visual_tokens is not None:
            raise HippError("--reconstruct refits every row as it is; give it without --recover-steps and "
                            "--visual-tokens")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    if methods is not None:
        from ..baselines import get_method
        for m in methods:
            get_method(m)  # unknown names fail before anything loads
    with _claim(args, "bench", BENCH_FILES) as out:
        result = _bench(args, budgets, methods, out, recovery)
    return _report(args, result, f"bench of {len(result['results'])} rows written to {out} "
                                 "(bench.md, bench.json, bench.csv, bench.png)")


def _bench(args, budgets, methods, out, recovery=None) -> dict:
    from ..evaluation.bench import CONTROLLER, POLISHED, bench
    from ..baselines.fixed_budget import matched_to
    from ..query.polish import polish
    from ..query.bound import plan_for_budget

    controller, base = _controller_and_base(args)
    summary = Path(args.controller) / "training_summary.json"
    seconds = json.loads(summary.read_text()).get("train_seconds") if summary.is_file() else None
    train_config = controller.extra.get("train_config")
    options = {"fixed_budget": matched_to(train_config)} if train_config else None  # the controller's budget each
    planners = {CONTROLLER: lambda b: plan_for_budget(controller, max_flops=b, base=base, n_rank=args.candidates,
                                                      calib_n=args.calib_images)}
    if args.polish:  # its own search, so its plan seconds are the whole query's
        planners[POLISHED] = lambda b: polish(base, controller, planners[CONTROLLER](b), args.polish)
    if args.visual_tokens is not None:
        from ..query import tokens
        level = tokens.token_level(base.model, args.token_rule)
        kept = tokens.counts(level, tokens.parse_shares(args.visual_tokens))
        planners[tokens.JOINT] = lambda b: plan_for_budget(controller, max_flops=b, base=base, n_rank=args.candidates,
                                                           calib_n=args.calib_images, token_counts=kept,
                                                           token_rule=level.rule)
        for other in tokens.levels(base.model):  # tokens alone, by each rule the model offers
            name = tokens.ONLY if other.rule == level.rule else f"{tokens.ONLY}/{other.rule}"
            planners[name] = lambda b, other=other: tokens.tokens_only(controller.space.with_tokens(other), b)
    from ..storage.checkpoint import family
    from ..recovery.of_plan import recovered_from
    reconstruct = None
    if args.reconstruct is not None:
        from ..export.pruned import check_reconstruct
        from ..export.reconstruct import refitted_from
        check_reconstruct(args.reconstruct, family(base.model), False, base.tokenizer)
        reconstruct = refitted_from(base, args.reconstruct)
    if recovery is not None:  # a config for the other family: one line before any plan is made
        from ..tasks import get_task
        get_task(recovery.task, recovery.task_options).check_model(family(base.model))
    if family(base.model) == "llava":
        from ..evaluation.generative_bench import bench_generative
        return bench_generative(base.model, base.tokenizer, controller.space, budgets, methods, out_dir=out,
                                controller=controller, controller_train_seconds=seconds, options=options,
                                planners=planners, recovery=None if recovery is None else recovered_from(base, recovery),
                                reconstruct=reconstruct, **({} if args.test_items is None else {"n": args.test_items}))
    return bench(base.model, base.tokenizer, base.preprocess_cfg, controller.space, budgets, methods, out_dir=out,
                 controller=controller, controller_train_seconds=seconds, options=options, planners=planners,
                 recovery=None if recovery is None else recovered_from(base, recovery), reconstruct=reconstruct,
                 **({} if args.test_items is None else {"n": args.test_items, "fmnist_limit": args.test_items}))


def _cmd_profile(args) -> int:
    from ..evaluation.profile import run
    return run(args)


def _cmd_convert(args) -> int:
    from ..backends.convert import convert_folder

    result = convert_folder(args.model, args.out, args.overwrite)
    return _report(args, result, f"transformers CLIPModel folder written to {result['out']} "
                                 f"({result['num_params']:,} parameters)")


def _add_controller_args(p) -> None:
    """query / export / pareto / bench: which controller, on which base model, and --json."""
    p.add_argument("--controller", required=True, help="trained controller folder")
    p.add_argument("--base-model", help="base model folder or open_clip name (default: the controller's)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--device", default="cpu", help="where the base model runs: cpu (default), cuda or cuda:N")


def _add_search_args(p) -> None:
    """query / export / bench: how much work a bound query's ranking does (hipp.query.bound.search_defaults)."""
    p.add_argument("--candidates", type=int, metavar="N",
                   help="distinct plans a bound query ranks (default scaled to the model: 16 on the embedded "
                        "teacher, 8 on models over 2 GFLOPs per sample)")
    p.add_argument("--calib-images", type=int, metavar="N",
                   help="calibration images per ranking loss (default scaled to the model's FLOPs: 128 on the "
                        "embedded teacher, at least 32); a LLaVA's: validation instructions answered (300 on the "
                        "embedded LLaVA teacher, at least 30)")


def _add_plan_args(p) -> None:
    """query / export: a preference or a cost bound."""
    _add_controller_args(p)
    p.add_argument("--pref", help="preference SPEC: name=value,... or positional values; with a bound, its split "
                                  "between the quality objectives is kept and the cost weight set to meet the bound")
    p.add_argument("--max-flops", type=float, metavar="R", help="FLOPs ratio bound in (0, 1]")
    p.add_argument("--max-params", type=float, metavar="R", help="parameter ratio bound in (0, 1]")
    p.add_argument("--max-latency", metavar="R|Nms",
                   help="latency bound: a ratio of the dense model's predicted latency (0.5) or milliseconds per "
                        "batch of the profile's batch size (12ms); needs a latency profile")
    p.add_argument("--latency-profile", metavar="FILE",
                   help="a profile from hipp profile (default: the one the controller trained with, if any); "
                        "plans then also report their predicted latency")
    p.add_argument("--calibrate-latency", action="store_true",
                   help="time the plan on this machine and, where it misses --max-latency by over 5%%, ask again "
                        "with the bound corrected by the measurement (up to 3 tries; hipp/query/measured.py)")
    p.add_argument("--round", type=int, metavar="N", help="keep MLP channels in multiples of N per layer")
    p.add_argument("--round-heads", type=int, metavar="M", help="keep attention units in multiples of M per layer")
    p.add_argument("--visual-tokens", metavar="S",
                   help="with a bound: keep this share of the image tokens (0.25), the best of several (0.25,0.5) "
                        "or of quarters ('search'), ranked as --token-rule says (llava, CLIP)")
    _add_rule_arg(p)
    _add_polish_arg(p, 0)
    _add_search_args(p)


PARETO_FILES = ("pareto.json", "pareto.csv", "pareto.png", "pareto.md")
BENCH_FILES = ("bench.json", "bench.csv", "bench.md", "bench.png")


def _add_polish_arg(p, default: int) -> None:
    p.add_argument("--polish", type=int, default=default, metavar="N",
                   help=f"polish each FLOPs-bound plan with N free-gate steps at the bound (default {default}; 120 is "
                        "the studied setting, about 0.6 s a step on the embedded teacher, 2 CPU cores; with --pref, a LLaVA's "
                        "plan trains on the preference's own split, about 0.9 s a step)")


def _add_rule_arg(p) -> None:
    from ..backends.token_rank import RULES
    p.add_argument("--token-rule", choices=RULES,
                   help="what ranks the visual tokens: in a llava, the prompt's last token in an early language "
                        "layer, tokens leaving after it (text, FastV-style: a llava's default), or the vision "
                        "tower's class token (cls: before a llava's language model; a CLIP tower's only rule)")


def _add_overwrite_arg(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder this command did not write (its own files are replaced, "
                        "other files are kept)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hipp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("eval", help="measure a teacher checkpoint or an exported model")
    e.add_argument("--model", required=True, help="model folder (teacher or exported)")
    e.add_argument("--data", help="comma-separated: shapes, fmnist, csv:FILE, folder:DIR (default: shapes,fmnist)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--allow-outside", action="store_true",
                   help="let a csv:FILE name images outside its own folder (absolute paths, '..', symlinks out)")
    e.set_defaults(func=_cmd_eval)
    pa = sub.add_parser("pareto", help="sweep preferences, measure every hard plan, draw the front")
    _add_controller_args(pa)
    pa.add_argument("--points", type=int, default=20, help="about this many preferences on a simplex grid")
    pa.add_argument("--out", required=True, help="output folder for CSV, JSON, PNG and markdown")
    _add_overwrite_arg(pa)
    pa.set_defaults(func=_cmd_pareto)
    b = sub.add_parser("bench", help="every baseline and the controller at every FLOPs budget")
    _add_controller_args(b)
    b.add_argument("--budgets", default="0.3,0.5,0.7", help="comma-separated FLOPs ratios in (0, 1]")
    b.add_argument("--methods", help="comma-separated baseline names (default: all)")
    b.add_argument("--visual-tokens", metavar="S",
                   help="also the joint weight + token plans (the bound search choosing among these token "
                        "shares, or 'search') and the tokens-only plans on the dense weights, for each rule the "
                        "model offers (llava, CLIP)")
    _add_rule_arg(b)
    b.add_argument("--out", required=True, help="output folder for bench.md / .json / .csv / .png")
    b.add_argument("--test-items", type=int, metavar="N",
                   help="measure on the first N test items of each dataset (default: the full test sets; "
                        "a LLaVA: N instructions of each kind, default 500; fewer is quicker and noisier, "
                        "and recorded in bench.json)")
    _add_overwrite_arg(b)
    _add_polish_arg(b, 0)  # off by default: on validation it raised utility for at most 2 of 5 seeds
    b.add_argument("--recover-steps", type=int, metavar="N",
                   help="also each planner's plan and the best training-free plan per budget, exported and "
                        "recovered from the base for N steps (hipp recover)")
    b.add_argument("--recover-config", help="YAML recovery config for those rows (its steps: --recover-steps)")
    b.add_argument("--reconstruct", type=int, metavar="N",
                   help="every row's model refitted in closed form on N calibration inputs before it is measured, "
                        "as hipp export --reconstruct N does: every method compared refitted alike")
    _add_search_args(b)
    b.set_defaults(func=_cmd_bench)
    c = sub.add_parser("convert", help="an open_clip model folder as a transformers CLIPModel folder")
    c.add_argument("--model", required=True, help="open_clip model folder (e.g. checkpoints/teacher-tiny)")
    c.add_argument("--out", required=True, help="new or empty output folder")
    _add_overwrite_arg(c)
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.set_defaults(func=_cmd_convert)
    t = sub.add_parser("train", help="train a controller (also under `accelerate launch -m hipp train`)")
    t.add_argument("--config", required=True, help="YAML training config")
    t.add_argument("--output", help="output folder (overrides the config)")
    t.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule still spans the config's)")
    t.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    _add_overwrite_arg(t)
    t.set_defaults(func=_cmd_train)
    q = sub.add_parser("query", help="the plan for a preference or a cost bound (--max-flops / --max-params)")
    _add_plan_args(q)
    q.set_defaults(func=_cmd_query)
    x = sub.add_parser("export", help="materialise a plan into a smaller model folder")
    _add_plan_args(x)
    x.add_argument("--out", required=True, help="output folder (new, empty or a previous export)")
    _add_overwrite_arg(x)
    x.add_argument("--onnx", action="store_true",
                   help="also write ONNX files, checked vs onnxruntime: a CLIP model's image / text encoders, "
                        "a LLaVA's image features (vision tower + projector; not its decoder)")
    x.add_argument("--compensate", action="store_true", help="FLAP-style bias compensation on calibration data")
    x.add_argument("--reconstruct", type=int, default=0, metavar="N",
                   help="refit the kept output projections by least squares to the base's outputs on N training "
                        "instructions (a LLaVA) or images and captions (CLIP); no gradient steps; 256 was measured")
    x.set_defaults(func=_cmd_export)
    pr = sub.add_parser("profile", help="time a model's blocks on this machine and fit its latency model")
    pr.add_argument("--model", required=True, help="model folder, open_clip name (random weights) or hub id")
    pr.add_argument("--out", required=True, help="the profile JSON file to write")
    pr.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    pr.add_argument("--batch", type=int, help="inputs per timed call (default 32; a LLaVA: 8)")
    pr.add_argument("--repeats", type=int, default=7, help="timed rounds per grid point (default 7)")
    pr.add_argument("--validation", type=int, default=8,
                    help="random plans timed whole to choose the model's form (default 8; 0: table)")
    pr.add_argument("--channel-group", type=int, default=8,
                    help="MLP channels per gate of the plans it will price (default 8, as the configs); the grid "
                         "and validation plans keep whole groups, the widths those plans take")
    pr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice), recorded")
    pr.add_argument("--json", action="store_true", help="print the profile's summary as one JSON object")
    _add_overwrite_arg(pr)
    pr.set_defaults(func=_cmd_profile)
    r = sub.add_parser("recover", help="distil an export back toward its base (also under accelerate launch)")
    r.add_argument("--model", required=True, help="an export folder (hipp export); its base must be loadable")
    r.add_argument("--config", help="YAML recovery config (default: hipp.recovery.RecoverConfig's values)")
    r.add_argument("--out", required=True, help="output folder: the recovered export, its log and state")
    r.add_argument("--resume", action="store_true", help="continue from the output folder's last state")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_overwrite_arg(r)
    r.set_defaults(func=_cmd_recover)
    return p


def run_guarded(fn, *args) -> int:
    """Run fn; turn bad input into one stderr line and exit status 2."""
    try:
        return fn(*args) or 0
    except HippError as e:
        print(f"hipp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hipp: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the user's environment (permissions, a full disk, a vanished file), not a bug
        where = f" ({e.filename})" if e.filename else ""
        print(f"hipp: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    def _run():
        args = build_parser().parse_args(argv)
        return args.func(args)
    return run_guarded(_run)


def entry() -> None:
    """The `hipp` command. After a Ctrl-C it leaves without the interpreter's shutdown: a Ctrl-C that
    lands inside torch's import leaves its extension half-initialised, and tearing that down can
    kill the process with the signal after our one line was printed. Files are atomic and locks
    are the kernel's, so skipping the shutdown loses nothing."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader has gone (a closed pipe): nothing is left to deliver
        pass
    if code == 130:
        os._exit(130)
    # The command has answered (and its output is out): a Ctrl-C during the shutdown leaves at once,
    # with the answer's status.
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    sys.exit(code)


if __name__ == "__main__":
    entry()
