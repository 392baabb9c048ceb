"""The `tokenprobe` command line: `train`, `inspect` and `viz`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

from tokenprobe.config import add_config_arguments, config_from_args
from tokenprobe.errors import TokenprobeError


def _quiet_transformers() -> None:
    """transformers' own warnings and bars are not for our users (``--debug`` shows them)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _cmd_train(args: argparse.Namespace) -> int:
    from tokenprobe.pipelines.train import train

    if not args.debug:
        _quiet_transformers()

    config = config_from_args(args)
    result = train(config, out_dir=args.out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                   progress=not args.quiet)
    print(result.table())
    best = result.best
    print(f"\nbest layer {best.layer}: balanced accuracy {best.primary.balanced_accuracy:.3f}, "
          f"AUROC {best.primary.auroc:.3f} on {best.primary.n:,} held-out positions")
    print(f"run written to {result.out_dir}")
    return 0


# Per family, the fit details `inspect` shows (every one is in `inspect --json`).
FIT_SHOWN = {"linear": ("l2", "l2_method"), "sparse": ("l1", "l1_method", "kept"),
             "mlp": ("width", "best_epoch", "validation_balanced_accuracy"), "mean-diff": ("threshold", "slope")}


def _cmd_inspect(args: argparse.Namespace) -> int:
    from tokenprobe.probes.base import ProbeMeta, read_header

    for path in args.probe:
        header = read_header(Path(path))
        if args.json:
            print(json.dumps(header, indent=2))
            continue
        meta = ProbeMeta.from_dict(header)
        flat = meta.to_dict()
        print(f"{path}")
        for key in ("run_name", "kind", "layer", "task", "target", "target_ids", "model", "model_source",
                    "weights_hash", "tokenizer_hash", "hidden_size", "context_length", "dtype",
                    "tokenprobe_version"):
            value = flat.get(key)
            print(f"  {key:<18} {repr(value) if key == 'target' else value}")  # ' the': the space shows
        for key in FIT_SHOWN.get(meta.kind, ()):  # how this family's probe was fitted (all of it: --json)
            if key in meta.fit:
                print(f"  {key:<18} {meta.fit[key]}")
        print(f"  {'corpus':<18} {meta.corpus.get('name')} (sha256 {str(meta.corpus.get('sha256'))[:16]}...)")
        print(f"  {'created':<18} {meta.created}")
        print(f"  {'metrics':<18} {'set':<13} {'bal.acc':>7} {'acc':>6} {'AUROC':>6} {'TP':>6} {'FP':>6} "
              f"{'TN':>6} {'FN':>6} {'n':>7}")
        for name, m in meta.metrics.items():
            def f(v):
                return "n/a" if v is None else f"{v:.3f}"
            print(f"  {'':<18} {name:<13} {f(m['balanced_accuracy']):>7} {f(m['accuracy']):>6} {f(m['auroc']):>6} "
                  f"{m['tp']:>6} {m['fp']:>6} {m['tn']:>6} {m['fn']:>6} {m['n']:>7}")
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from tokenprobe.viz.explore import visualize

    if not args.debug:
        _quiet_transformers()

    result = visualize(args.probes, text=args.text, file=args.file, corpus_sample=args.corpus_sample, out=args.out,
                       device=args.device, cache_dir=args.cache_dir, progress=not args.quiet, family=args.family)
    print(result.path)
    if args.open:
        import webbrowser

        if not webbrowser.open(result.path.resolve().as_uri()):
            print(f"tokenprobe: no browser found to open the page; open {result.path.resolve()} yourself",
                  file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tokenprobe.report.markdown import build_report

    report, plot = build_report(args.run_dirs, args.out)
    print(f"report written to {report}\nplot written to {plot}")
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
    # --debug is also accepted after the subcommand (where error messages suggest appending it); SUPPRESS
    # keeps a subcommand that was not given it from resetting the top-level flag.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")

    train = sub.add_parser("train", parents=[debug], help="train probes at the requested layers and evaluate them")
    add_config_arguments(train)
    train.add_argument("--out", type=Path, default=None,
                       help="run folder (default: runs/<sweep name>-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--cache-dir", type=Path, default=None,
                       help="cache for converted models and tokenized chunks (default: $TOKENPROBE_CACHE or "
                            "~/.cache/tokenprobe)")
    train.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    train.set_defaults(func=_cmd_train)

    inspect = sub.add_parser("inspect", parents=[debug], help="print a probe file's metadata and metrics")
    inspect.add_argument("probe", nargs="+", help="probe file(s) (.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    inspect.set_defaults(func=_cmd_inspect)

    report = sub.add_parser("report", parents=[debug], help="rebuild report.md and plot.png from run folder(s)",
                            description="Rebuilds the sweep report (report.md) and plot (plot.png) from the "
                                        "results.json of one run folder, or draws several runs in one plot.")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) from `tokenprobe train`")
    report.add_argument("--out", type=Path, default=None,
                        help="folder for report.md and plot.png (default: the run folder for one run, "
                             "./tokenprobe-report for several)")
    report.set_defaults(func=_cmd_report)

    viz = sub.add_parser("viz", parents=[debug], help="write an interactive HTML page: every layer's probe on every token of a text",
                         description="Runs the model named in the probe files once over a text and writes one "
                                     "self-contained HTML page with every probe's probability for every token.")
    viz.add_argument("probes", nargs="+", metavar="RUN_DIR_OR_PROBE_FILE",
                     help="a run folder from `tokenprobe train` and/or probe files (.safetensors) of one run")
    source = viz.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to show")
    source.add_argument("--file", type=Path, help="a UTF-8 text file to show")
    source.add_argument("--corpus-sample", type=int, metavar="N",
                        help="show N held-out chunks of the run's own corpus")
    viz.add_argument("--out", type=Path, default=None,
                     help="the page to write (default: viz.html in the run folder, else ./tokenprobe-viz.html)")
    viz.add_argument("--family", default=None,
                     help="the probe family to show when a run has several (default: the run's primary one)")
    viz.add_argument("--open", action="store_true", help="open the page in the default browser")
    viz.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    viz.add_argument("--cache-dir", type=Path, default=None,
                     help="cache for converted models and tokenized chunks (default: $TOKENPROBE_CACHE or "
                          "~/.cache/tokenprobe)")
    viz.add_argument("--quiet", action="store_true", help="no status lines")
    viz.set_defaults(func=_cmd_viz)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


class _LogLines(logging.Handler):
    """`warning: ...` lines on stderr, written around any progress bar on screen (tqdm.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname.lower()}: {record.getMessage()}"
            if "tqdm" in sys.modules:  # a bar may be on screen: print above it, not through it
                sys.modules["tqdm"].tqdm.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _show_library_log(debug: bool) -> logging.Handler:
    """tokenprobe's own log (warnings; with --debug, everything) as `warning: ...` lines on stderr."""
    handler = _LogLines()
    logger = logging.getLogger("tokenprobe")
    handler.restore = (logger.level, logger.propagate)  # for main() to put back: a library caller's setup stays
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False
    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _interrupt_on_sigterm()
    handler = _show_library_log(args.debug)
    try:
        return args.func(args)
    except TokenprobeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"tokenprobe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("tokenprobe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: still one line unless --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"tokenprobe: error: unexpected {type(exc).__name__}{': ' + first if first else ''} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    finally:
        logger = logging.getLogger("tokenprobe")
        logger.removeHandler(handler)
        level, logger.propagate = handler.restore
        logger.setLevel(level)


def _interrupt_on_sigterm() -> None:
    """`kill` then cleans up like Ctrl-C: staging folders removed, finished batches kept."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a library)
        pass


if __name__ == "__main__":
    sys.exit(main())
