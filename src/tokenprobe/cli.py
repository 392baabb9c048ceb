"""The `tokenprobe` command line: `train`, `fit`, `scan`, `eval`, `ablate`, `inspect`, `report` and `viz`."""

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
    from tokenprobe.distributed import world_from_env

    world = world_from_env(config.device, config.device_map)  # several processes under torchrun / accelerate launch
    try:
        if world.distributed:
            from tokenprobe.files import default_cache_dir

            world.log_dir = (args.cache_dir or default_cache_dir()) / "logs" / world.run_id
            if not world.main:
                _output_to(world.log_dir / f"rank{world.rank}.log", world.rank)
        result = train(config, out_dir=args.out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                       progress=not args.quiet, world=world)
    except KeyboardInterrupt:
        if not (world.distributed and world.main):
            raise
        raise TokenprobeError(  # before or after the forward pass: the peers' status files do not say why
            "stopped by the launcher, which ends every rank when one of them fails (or on Ctrl-C): the other ranks' "
            f"logs are in {world.log_dir}") from None
    finally:
        world.close()
    if result is None:  # a rank other than 0: its share is in the store, rank 0 publishes
        return 0
    if world.log_dir is not None:
        import shutil

        shutil.rmtree(world.log_dir, ignore_errors=True)  # copied into the run (logs/)
        try:
            world.log_dir.parent.rmdir()  # <cache>/logs, when no other run's logs are there
        except OSError:
            pass
    return _print_run(result)


_CONSOLE: tuple[int, int] | None = None  # a rank whose output goes to a log: (its rank, the launcher's stderr)


def _output_to(path: Path, rank: int) -> None:
    """This process's stdout and stderr (Python's and the libraries' own) into a log file, from now on; its final
    error line still goes to the launcher's console too (see main)."""
    global _CONSOLE
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _CONSOLE = (rank, os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _error(line: str) -> None:
    """The one error line: on stderr, and for a rank that logs to a file, on the launcher's console as well."""
    print(line, file=sys.stderr, flush=True)
    if _CONSOLE is not None:
        rank, console = _CONSOLE
        try:
            os.write(console, f"{line.replace('tokenprobe:', f'tokenprobe (rank {rank}):', 1)}\n".encode())
        except OSError:
            pass


def _print_run(result) -> int:
    """A train or fit run's table, its best layer and where it was written."""
    print(result.table())
    best = result.best
    print(f"\nbest layer {best.layer}: balanced accuracy {best.primary.balanced_accuracy:.3f}, "
          f"AUROC {best.primary.auroc:.3f} on {best.primary.n:,} held-out positions")
    print(f"run written to {result.out_dir}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from tokenprobe.pipelines.fit import FIT_OPTIONS, fit_run

    options = {name: getattr(args, name) for name in FIT_OPTIONS if getattr(args, name, None) is not None}
    for name, value in options.items():
        if isinstance(value, list) and len(value) == 1:
            options[name] = value[0]
    result = fit_run(args.run_dir, options, out_dir=args.out, overwrite=args.overwrite, progress=not args.quiet)
    return _print_run(result)


def _cmd_scan(args: argparse.Namespace) -> int:
    from tokenprobe.pipelines.scan import ScanOptions, scan

    if not args.debug:
        _quiet_transformers()
    chosen = args.targets_file is not None or args.target_ids
    if chosen and args.top is not None:
        raise TokenprobeError("give --top N (the most frequent tokens) or --targets-file / --target-ids, not both")
    options = ScanOptions(top=None if chosen else (100 if args.top is None else args.top), targets_file=args.targets_file,
                          target_ids=args.target_ids, positives=args.positives)
    config = config_from_args(args)
    result = scan(config, options, out_dir=args.out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(result.table())
    print(f"\nscan written to {result.out_dir} (report.md, scan-heatmap.png, scan.csv, scan.json)")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from tokenprobe.pipelines.ablate import AblateOptions, ablate

    if not args.debug:
        _quiet_transformers()
    options = AblateOptions(layers=args.layers, family=args.probe, max_tokens=args.max_tokens, random=args.random,
                            mode=args.mode, steer=args.steer, kl_positions=args.kl_positions,
                            batch_size=args.batch_size, resamples=args.bootstrap, seed=args.seed)
    result = ablate(args.run_dir, options, cache_dir=args.cache_dir, device=args.device, progress=not args.quiet)
    for entry in result.data["layers"]:
        effect, band = entry["probe"]["log_ratio"], entry["random_band"]
        verdict = {"lowers": "lowers P(target) beyond random", "raises": "raises P(target) beyond random"}.get(
            entry.get("direction_of_effect") or "", "within the random directions")
        print(f"layer {entry['layer']:>3}: change in log P(target) {effect['mean']:+.3f}"
              + (f" [{effect['low']:+.3f}, {effect['high']:+.3f}]" if effect.get("low") is not None else "")
              + f"; random {band['min']:+.3f} to {band['max']:+.3f}; KL elsewhere {entry['probe']['kl']['mean']:.4f}"
              f" -> {verdict}")
    print(f"\nwritten to {result.path} (and ablation.png, report.md beside it)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tokenprobe.pipelines.evaluate import evaluate_run

    if not args.debug:
        _quiet_transformers()
    result = evaluate_run(args.probes, args.corpus, text_field=args.text_field, corpus_config=args.corpus_config,
                          corpus_split=args.corpus_split, max_tokens=args.max_tokens, bootstrap=args.bootstrap,
                          device=args.device, out_dir=args.out, cache_dir=args.cache_dir, overwrite=args.overwrite,
                          progress=not args.quiet)
    print(result.table())
    print()
    print(result.transfer_table())
    print(f"\neval written to {result.out_dir}")
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
                       device=args.device, cache_dir=args.cache_dir, progress=not args.quiet, family=args.family,
                       target=args.target)
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


def _cache_and_quiet(parser: argparse.ArgumentParser) -> None:
    """--cache-dir and --quiet, as every command that loads a model takes them."""
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache for converted models and tokenized chunks (default: $TOKENPROBE_CACHE or "
                             "~/.cache/tokenprobe)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


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
    _cache_and_quiet(train)
    train.set_defaults(func=_cmd_train)

    import dataclasses

    from tokenprobe.config import RunConfig
    from tokenprobe.pipelines.fit import FIT_OPTIONS

    fit = sub.add_parser(
        "fit", parents=[debug], help="retrain and rescore a run's probes from its kept activations, without the model",
        description="Reads the activations a `tokenprobe train` run kept (RUN/activations/), fits the probes again "
                    "with the options given here (the others are the run's), scores them against the baselines the "
                    "run computed, and writes a new run folder. With no option it reproduces the run exactly.")
    fit.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder of `tokenprobe train` with activations/")
    add_config_arguments(fit, exclude=tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in FIT_OPTIONS),
                         unset="the run's", helps={"layers": "a subset of the run's probed layers",
                                                   "device": "where the probes are fitted (auto: a GPU if there is one)"})
    fit.add_argument("--out", type=Path, default=None, help="run folder (default: RUN-fit-<time> beside RUN)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    fit.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    fit.set_defaults(func=_cmd_fit)

    from tokenprobe.pipelines.scan import SCAN_DEFAULTS, SCAN_IGNORED

    scan = sub.add_parser(
        "scan", parents=[debug], help="train a probe for each of many target tokens at every layer, from one forward pass",
        description="Trains one linear probe per target token (by default the 100 most frequent tokens of the "
                    "training chunks) at each requested layer from ONE extraction, scores each as `train` does, and "
                    "writes a ranking (report.md), a heatmap (targets x layers), scan.csv and scan.json.")
    scan.add_argument("--top", type=int, default=None, metavar="N",
                      help="scan the N most frequent tokens of the training chunks (default: 100)")
    scan.add_argument("--targets-file", default=None, metavar="FILE",
                      help="scan the tokens of this file, one token string per line (leading spaces count; \\n "
                           "names a newline)")
    scan.add_argument("--target-ids", type=int, nargs="+", default=None, metavar="ID", help="scan these token ids")
    scan.add_argument("--positives", type=int, default=500,
                      help="positive training positions per target at most (held-out: a quarter of it) (default: 500)")
    add_config_arguments(scan, exclude=SCAN_IGNORED, defaults=SCAN_DEFAULTS, helps={
        "train_positions": "positions of the natural-ratio training sample every target shares (each target's "
                           "negatives are drawn from it)",
        "eval_positions": "positions of the natural-ratio held-out sample every target shares",
        "l2": "L2 penalty on the probe weights (standardised inputs), or auto: per target, the penalty with the "
              "lowest log-loss on a fifth of its training chunks set aside, chosen at the middle layer"})
    scan.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<scan name>-<time>)")
    scan.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    _cache_and_quiet(scan)
    scan.set_defaults(func=_cmd_scan)

    ablate = sub.add_parser(
        "ablate", parents=[debug], help="does the model use the probe's direction? remove it and measure P(target)",
        description="For each probed layer, runs the model on held-out chunks with the probe's direction removed "
                    "from the residual stream at that layer (every position), and measures the change in the "
                    "model's own P(target) where the target comes next, against random directions, and the KL "
                    "divergence elsewhere. Writes ablation.json, ablation.png and a report.md section into the run.")
    ablate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder of `tokenprobe train --task next`")
    ablate.add_argument("--layers", default=None, help="a subset of the run's probed layers, e.g. 6,12 (default: all)")
    ablate.add_argument("--probe", default=None, metavar="FAMILY",
                        help="the probe family whose direction is removed: linear, mean-diff or sparse "
                             "(default: the run's primary one)")
    ablate.add_argument("--max-tokens", type=int, default=4096,
                        help="held-out tokens to run the model on, in whole chunks (default: 4096)")
    ablate.add_argument("--random", type=int, default=20, help="random directions per layer, the baseline (default: 20)")
    ablate.add_argument("--mode", choices=("project", "mean"), default="project",
                        help="project: remove the component; mean: set it to its training mean (default: project)")
    ablate.add_argument("--steer", type=float, default=None, metavar="ALPHA",
                        help="also ADD ALPHA times the direction (in units of its clean spread) and measure P(target)")
    ablate.add_argument("--kl-positions", type=int, default=128,
                        help="positions (not followed by the target) where the KL divergence is measured (default: 128)")
    ablate.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass (default: 8)")
    ablate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of chunks (default: 1000; 0: none)")
    ablate.add_argument("--seed", type=int, default=0, help="seed of the random directions and the KL positions")
    ablate.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where the model runs (default: the run's)")
    _cache_and_quiet(ablate)
    ablate.set_defaults(func=_cmd_ablate)

    evaluate = sub.add_parser(
        "eval", parents=[debug], help="evaluate a run's saved probes on another corpus, refitting nothing",
        description="Runs the model of a `tokenprobe train` run over another corpus, with the run's own settings "
                    "and held-out sampling, and scores every saved probe (every layer, every family) there, as "
                    "train scores them (baselines, intervals, layer comparisons). Writes run.json, results.json, "
                    "report.md (in-corpus and out-of-corpus figures side by side) and plot.png.")
    evaluate.add_argument("probes", nargs="+", metavar="RUN_OR_PROBES",
                          help="a run folder from `tokenprobe train`, or probe files (.safetensors) of one run")
    evaluate.add_argument("--corpus", required=True,
                          help="the corpus to evaluate on: a .txt/.jsonl/.json/.parquet file or a folder of them, a "
                               "saved `datasets` folder, or a Hugging Face dataset name")
    evaluate.add_argument("--text-field", default="text",
                          help="field holding the text in .jsonl/.json/.parquet/dataset corpora (default: 'text')")
    evaluate.add_argument("--corpus-config", default=None, help="Hugging Face dataset config name")
    evaluate.add_argument("--corpus-split", default="train", help="Hugging Face dataset split (default: 'train')")
    evaluate.add_argument("--max-tokens", type=int, default=None,
                          help="use at most this many corpus tokens (default: the run's own setting)")
    evaluate.add_argument("--bootstrap", type=int, default=None,
                          help="bootstrap resamples of held-out chunks for the 95%% intervals, 0: none "
                               "(default: the run's)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                          help="where the model runs (default: the run's)")
    evaluate.add_argument("--out", type=Path, default=None,
                          help="output folder (default: runs/eval-<run folder>-on-<corpus>-<time>)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing eval in --out")
    _cache_and_quiet(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    inspect = sub.add_parser("inspect", parents=[debug], help="print a probe file's metadata and metrics")
    inspect.add_argument("probe", nargs="+", help="probe file(s) (.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    inspect.set_defaults(func=_cmd_inspect)

    report = sub.add_parser("report", parents=[debug], help="rebuild report.md and plot.png from run folder(s)",
                            description="Rebuilds the sweep report (report.md) and plot (plot.png) from the "
                                        "results.json of one run folder (with its ablation section after "
                                        "`tokenprobe ablate`), or draws several runs and evals in one plot (with "
                                        "a transfer matrix across corpora, and relative depth across models of "
                                        "different depths). A scan folder is rebuilt on its own (report.md, "
                                        "scan-heatmap.png, scan.csv).")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folder(s) of `tokenprobe train` or `eval`, or one of `tokenprobe scan`")
    report.add_argument("--out", type=Path, default=None,
                        help="folder for report.md and plot.png (default: the run folder for one run, "
                             "./tokenprobe-report for several)")
    report.set_defaults(func=_cmd_report)

    viz = sub.add_parser("viz", parents=[debug], help="write an interactive HTML page: every layer's probe on every token of a text",
                         description="Runs the model named in the probe files once over a text and writes one "
                                     "self-contained HTML page with every probe's probability for every token. "
                                     "A scan folder (from `tokenprobe scan`) gives one page of all its targets, "
                                     "with a selector to switch target.")
    viz.add_argument("probes", nargs="+", metavar="RUN_DIR_OR_PROBE_FILE",
                     help="a run folder from `tokenprobe train` and/or probe files (.safetensors) of one run, "
                          "or a scan folder from `tokenprobe scan` (on its own)")
    source = viz.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to show")
    source.add_argument("--file", type=Path, help="a UTF-8 text file to show")
    source.add_argument("--corpus-sample", type=int, metavar="N",
                        help="show N held-out chunks of the run's own corpus")
    viz.add_argument("--out", type=Path, default=None,
                     help="the page to write (default: viz.html in the run folder, else ./tokenprobe-viz.html)")
    viz.add_argument("--family", default=None,
                     help="the probe family to show when a run has several (default: the run's primary one)")
    viz.add_argument("--target", default=None, metavar="TEXT",
                     help="with a scan folder: the target shown first, by its text (leading spaces count, e.g. "
                          "' the') or token id (default: the scan's first)")
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
        if args.func is not _cmd_train:
            from tokenprobe.distributed import refuse_distributed

            refuse_distributed(f"`tokenprobe {args.command}`")
        return args.func(args)
    except TokenprobeError as exc:
        if args.debug:
            traceback.print_exc()
        _error(f"tokenprobe: error: {exc}")
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
        _error(f"tokenprobe: error: unexpected {type(exc).__name__}{': ' + first if first else ''} "
               "(rerun with --debug for the traceback, and please report it)")
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
