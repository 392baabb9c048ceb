"""The `tokenprobe` command line: `train` and `inspect`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from tokenprobe.config import add_config_arguments, config_from_args
from tokenprobe.errors import TokenprobeError


def _cmd_train(args: argparse.Namespace) -> int:
    from tokenprobe.train import train

    config = config_from_args(args)
    result = train(config, out_dir=args.out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                   progress=not args.quiet)
    print(result.table())
    best = result.best
    print(f"\nbest layer {best.layer}: balanced accuracy {best.primary.balanced_accuracy:.3f}, "
          f"AUROC {best.primary.auroc:.3f} on {best.primary.n:,} held-out positions")
    print(f"run written to {result.out_dir}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from tokenprobe.probes import read_probe_metadata

    for path in args.probe:
        meta = read_probe_metadata(Path(path))
        if args.json:
            print(json.dumps(meta, indent=2))
            continue
        run = meta.get("run", {})
        print(f"{path}")
        for key in ("run_name", "layer", "task", "target", "target_ids", "model", "model_source", "weights_hash",
                    "tokenizer_hash", "hidden_size", "context_length", "dtype", "tokenprobe_version"):
            print(f"  {key:<18} {meta.get(key)}")
        corpus = run.get("corpus", {})
        print(f"  {'corpus':<18} {corpus.get('name')} (sha256 {str(corpus.get('sha256'))[:16]}...)")
        print(f"  {'created':<18} {run.get('created')}")
        print(f"  {'metrics':<18} {'set':<13} {'bal.acc':>7} {'acc':>6} {'AUROC':>6} {'TP':>6} {'FP':>6} "
              f"{'TN':>6} {'FN':>6} {'n':>7}")
        for name, m in meta.get("metrics", {}).items():
            def f(v):
                return "n/a" if v is None else f"{v:.3f}"
            print(f"  {'':<18} {name:<13} {f(m['balanced_accuracy']):>7} {f(m['accuracy']):>6} {f(m['auroc']):>6} "
                  f"{m['tp']:>6} {m['fp']:>6} {m['tn']:>6} {m['fn']:>6} {m['n']:>7}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tokenprobe import __version__

    parser = argparse.ArgumentParser(
        prog="tokenprobe",
        description="Train, evaluate and explore probes on the hidden states of causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"tokenprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train probes at the requested layers and evaluate them")
    add_config_arguments(train)
    train.add_argument("--out", type=Path, default=None,
                       help="run folder (default: runs/<sweep name>-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--cache-dir", type=Path, default=None,
                       help="cache for converted models and tokenized chunks (default: $TOKENPROBE_CACHE or "
                            "~/.cache/tokenprobe)")
    train.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    train.set_defaults(func=_cmd_train)

    inspect = sub.add_parser("inspect", help="print a probe file's metadata and metrics")
    inspect.add_argument("probe", nargs="+", help="probe file(s) (.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except TokenprobeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"tokenprobe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
