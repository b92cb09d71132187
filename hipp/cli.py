"""`hipp` command line. Bad input: one line on stderr, exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import HippError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block too: keep it to one line
        raise HippError(f"{self.prog}: {message}")


def _cmd_eval(args) -> int:
    from .checkpoint import get_tokenizer, load_model, preprocess_cfg
    from .evaluate import DATASETS, check_datasets, report

    datasets = DATASETS if args.data is None else tuple(d.strip() for d in args.data.split(","))
    check_datasets(datasets)  # before loading anything
    model = load_model(args.model)
    rep = report(model, get_tokenizer(args.model), preprocess_cfg(model), datasets)
    if args.json:
        print(json.dumps(rep))
    else:
        for k, v in rep["metrics"].items():
            print(f"{k:28s} {v:.4f}")
        print(f"{'params':28s} {rep['params']:,}")
        for t, f in rep["flops"].items():
            print(f"{'flops/' + t:28s} {f / 1e6:.2f} M")
        for t in ("image", "text"):
            print(f"{'latency_ms/' + t:28s} {rep['latency_ms'][t]:.3f} (batch {rep['latency_ms']['batch']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hipp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    e = sub.add_parser("eval", help="measure a teacher checkpoint or an exported model")
    e.add_argument("--model", required=True, help="model folder (teacher or exported)")
    e.add_argument("--data", help="comma-separated: shapes, fmnist, csv:FILE, folder:DIR (default: shapes,fmnist)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(func=_cmd_eval)
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


def main(argv=None) -> int:
    def _run():
        args = build_parser().parse_args(argv)
        return args.func(args)
    return run_guarded(_run)


if __name__ == "__main__":
    sys.exit(main())
