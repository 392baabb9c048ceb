"""Benchmark: a tokenprobe layer sweep against the bare forward pass and the usual ways of probing.

Every configuration sees the same tokens: tokenprobe's own chunking, split and balanced position
sampling decide which chunks run and which positions are kept, and all four configurations reuse them.

1. bare forward   the decoder stack up to the deepest layer: no hooks, no final unembedding (the floor),
                  over the full chunks; and over tokenprobe's own batches (each chunk cut after its last
                  sampled position, as tokenprobe runs it), so its overhead on the tokens it runs shows too
   paired         tokenprobe's own forward pass (hooks on every layer, sampled positions gathered, NaN/Inf
                  checked) and the bare stack, batch by batch in turns, alternating which goes first: their
                  ratio is free of the machine's drift, and with tokenprobe's breakdown it estimates
                  tokenprobe / bare forward at any size
2. tokenprobe     ``train(layers="all")`` end to end as the command line runs it: positions, one forward
                  pass, all probes, metrics, baselines, the run folder written (probes, results, report,
                  plot); once with ``--batch-size auto``, and on request with ``--no-baselines``
3. usual recipe   AutoModelForCausalLM with output_hidden_states=True (full logits, as people write it),
                  the same positions gathered, sklearn StandardScaler + LogisticRegression per layer
4. seed's way     the ``auto`` layers, each with a fresh float32 torch probe trained with Adam for a few
                  epochs, the model's full forward pass recomputed for every batch of every epoch
                  (model loaded once)

Wall times are medians over repeats in this process (the model is loaded once): ``--repeats`` for the
configurations the targets name (bare, tokenprobe, recipe), ``--extra-repeats`` for the others. The
configurations take turns within each repeat, and every ratio is the median of the ratios within a
repeat, so a machine that drifts slower or faster between repeats (these do, by 15%) moves both sides
of a ratio together. Peak resident memory is measured per configuration in fresh subprocesses (VmHWM,
median of ``--memory-repeats``) at ``--memory-batch`` chunks per forward pass. The startup check times
a second ``tokenprobe train`` from launch to its first forward pass, beside the floor no run can beat:
a bare Python importing torch and the model's transformers code.

    python benchmarks/sweep.py                  # defaults: 7,168 tokens, about 14 minutes on 2 CPU cores (float32)
    python benchmarks/sweep.py --large          # 204,800 tokens
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ("bare", "bare_cut", "paired", "tokenprobe", "probes_only", "recipe", "auto", "seed")
TARGETED = ("bare", "paired", "tokenprobe", "recipe")  # what issue 6's targets rest on: --repeats each
LABELS = {
    "bare": "bare forward (stack, no lm_head)",
    "bare_cut": "bare forward, tokenprobe's cut batches",
    "paired": "hooked forward, paired with bare per batch",
    "tokenprobe": "tokenprobe --layers all",
    "probes_only": "tokenprobe --layers all --no-baselines",
    "recipe": "usual recipe (hidden_states+sklearn)",
    "auto": "tokenprobe --layers all --batch-size auto",
    "seed": "seed's way (auto layers)",
}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/sweep.py",
        description="Time a tokenprobe --layers all sweep against the bare forward pass, the usual "
        "output_hidden_states + scikit-learn recipe and the seed's per-layer retraining, on the same tokens.",
    )
    p.add_argument("--model", default="gemma-3-270m", help="as tokenprobe --model (default: %(default)s)")
    p.add_argument("--corpus", default="wiki-summaries", help="as tokenprobe --corpus (default: %(default)s)")
    p.add_argument("--context-length", type=positive, default=256, help="tokens per chunk (default: %(default)s)")
    p.add_argument("--tokens", type=positive, default=7_168,
                   help="corpus tokens to use (tokenprobe --max-tokens); every chunk of them holds sampled "
                        "positions, so this is the token count each forward pass runs (default: %(default)s)")
    p.add_argument("--large", action="store_true", help="shorthand for --tokens 204800 (about 30x the default)")
    p.add_argument("--paired-batches", type=positive, default=4,
                   help="batches of tokenprobe's own run timed in the paired configuration, each through the bare "
                        "stack and through tokenprobe's hooked forward in turn (default: %(default)s)")
    p.add_argument("--main-job", action="store_true",
                   help="instead of --tokens, the positions of the README's main job, `tokenprobe train --layers all` "
                        "(20,000 training and 6,000 held-out positions from the whole corpus: 273k tokens on the "
                        "default corpus); with --skip recipe,seed,bare_cut,probes_only,auto --repeats 1 --no-memory "
                        "--no-startup it compares the main job with the bare forward pass")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model dtype for every configuration; auto as in tokenprobe: bfloat16 on CUDA and on CPUs "
                        "with native bfloat16, else float32 (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where every configuration runs; auto: CUDA when available. On CUDA every timer waits for "
                        "the device, and peak memory is the device's (default: %(default)s)")
    p.add_argument("--batch-size", type=positive, default=16, help="chunks per forward pass (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of bare, paired, tokenprobe and recipe, the configurations the targets rest on "
                        "(default: %(default)s)")
    p.add_argument("--extra-repeats", type=int, default=1,
                   help="timed runs of bare_cut, probes_only and auto, which explain the figures (default: %(default)s)")
    p.add_argument("--seed-repeats", type=int, default=1,
                   help="timed runs of the seed's way, the slowest by far (default: %(default)s)")
    p.add_argument("--seed-epochs", type=positive, default=1,
                   help="epochs per layer in the seed's way; each costs one forward pass over the training chunks "
                        "per layer (default: %(default)s)")
    p.add_argument("--seed-lr", type=float, default=1e-2, help="Adam learning rate in the seed's way (default: %(default)s)")
    p.add_argument("--skip", default="bare_cut,probes_only",
                   help="comma-separated configurations to skip, of " + ",".join(CONFIGS) + "; the default skips the "
                        "two that only explain tokenprobe's time (its own breakdown says the same), and --skip '' runs "
                        "every one (default: %(default)s)")
    p.add_argument("--memory-batch", type=positive, default=48,
                   help="chunks per forward pass when measuring peak memory (default: %(default)s)")
    p.add_argument("--memory-batches", type=positive, default=1,
                   help="forward passes per memory measurement; the first batch is the largest (default: %(default)s)")
    p.add_argument("--memory-repeats", type=positive, default=1,
                   help="fresh processes per configuration for peak memory; the median is reported (default: %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses and the startup check")
    p.add_argument("--no-startup", action="store_true",
                   help="skip timing a second `tokenprobe train` from launch to its first forward pass")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.add_argument("--out", type=Path, default=None,
                   help="keep the run folder of tokenprobe's last timed run here (results, report, probes)")
    p.add_argument("--cache-dir", type=Path, default=None, help="tokenprobe cache (default: $TOKENPROBE_CACHE or ~/.cache/tokenprobe)")
    p.add_argument("--child", choices=CONFIGS + ("load",), help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    unknown = {x.strip() for x in args.skip.split(",") if x.strip()} - set(CONFIGS)
    if unknown:
        p.error(f"--skip: no configuration named {', '.join(sorted(unknown))}; choose from {','.join(CONFIGS)}")
    if args.large:
        args.tokens = 204_800
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here; use --device cpu, or a CUDA build of torch on a GPU machine")
    return args


# ------------------------------------------------------------------------------------------ the data


@dataclass
class Setup:
    loaded: object
    config: object  # tokenprobe RunConfig that tokenprobe's own run uses
    chunks: object  # np.ndarray (n_chunks, ctx)
    positions: object  # PositionSet
    wanted: object  # np.ndarray of chunk ids that hold a sampled position, sorted
    load_s: float
    cache_dir: Path
    paired_batches: int


def setup(args: argparse.Namespace, batch_size: int) -> Setup:
    """The model (once) and tokenprobe's own chunks, split and balanced positions."""
    import numpy as np

    from tokenprobe.config import RunConfig
    from tokenprobe.data.prepare import prepare
    from tokenprobe.files import default_cache_dir
    from tokenprobe.models.loading import load_model

    cache_dir = args.cache_dir or default_cache_dir()
    # Ask for more training positions than the token budget holds: every positive is used, balanced
    # per chunk. Held out: as a default run samples them (about 25 natural-ratio positions per held-out
    # chunk, 6,000 of 273k tokens), so the baselines' full-vocabulary softmax covers the same share.
    held_out_chunks = max(1, round(args.tokens // args.context_length * RunConfig.eval_fraction))
    # --main-job: the positions of `tokenprobe train --layers all`, drawn from the whole corpus
    sized = {} if args.main_job else {"max_tokens": args.tokens, "train_positions": args.tokens,
                                      "eval_positions": max(100, 25 * held_out_chunks)}
    config = RunConfig(model=args.model, corpus=args.corpus, context_length=args.context_length, layers="all",
                       dtype=args.dtype, device=args.device, batch_size=batch_size, **sized)
    t = time.perf_counter()
    loaded = load_model(config.model, config.dtype, config.device, cache_dir)
    load_s = time.perf_counter() - t
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only N positive positions exist": intended, we take them all
        prepared = prepare(config, loaded, Path(cache_dir), progress=False)  # tokenprobe's own data path
    positions = prepared.positions
    return Setup(loaded, config, prepared.chunks, positions, np.unique(positions.chunk), load_s, Path(cache_dir),
                 args.paired_batches)


def batches(s: Setup, batch_size: int, chunk_ids=None):
    """(input_ids, rows, cols, index) per batch: index points into s.positions."""
    import numpy as np
    import torch

    ids = s.wanted if chunk_ids is None else chunk_ids
    pos = s.positions
    for b in range(0, len(ids), batch_size):
        batch = ids[b : b + batch_size]
        rows, index = [], []
        for r, c in enumerate(batch):
            hit = np.flatnonzero(pos.chunk == c)
            index.append(hit)
            rows.append(np.full(len(hit), r))
        index = np.concatenate(index)
        dev = s.loaded.placement.input
        yield (torch.from_numpy(s.chunks[batch]).to(dev), torch.from_numpy(np.concatenate(rows)).to(dev),
               torch.from_numpy(pos.position[index]).to(dev), index)


def now(s: Setup) -> float:
    """time.perf_counter() once the device has done the work queued on it (CUDA runs asynchronously)."""
    if s.loaded.placement.input.type == "cuda":
        import torch

        torch.cuda.synchronize(s.loaded.placement.input)
    return time.perf_counter()


# ---------------------------------------------------------------------------------- configurations


def cut_batches(s: Setup, batch_size: int):
    """(input_ids, rows, cols) of tokenprobe's own batches on the model's device: chunks longest first,
    each batch cut after its last sampled position (tokenprobe.extract.plan.RunPlan)."""
    import torch

    from tokenprobe.extract.plan import RunPlan

    plan = RunPlan.of(s.positions)
    dev = s.loaded.placement.input
    for b in range(0, len(plan.chunks), batch_size):
        batch = plan.batch(b, batch_size)
        yield (torch.from_numpy(s.chunks[batch.chunks, : batch.length]).to(dev), torch.from_numpy(batch.rows).to(dev),
               torch.from_numpy(s.positions.position[batch.index]).to(dev))


def run_bare(s: Setup, batch_size: int, max_batches: int | None = None, cut: bool = False) -> dict:
    """The decoder stack up to the deepest layer (all of it for --layers all): no hooks, no lm_head.

    Over the full chunks, or with `cut` over exactly the batches tokenprobe runs.
    """
    import torch

    model = s.loaded.model
    base = getattr(model, model.base_model_prefix)  # e.g. Gemma3TextModel: embeddings, blocks, final norm
    inputs = (b[0] for b in (cut_batches(s, batch_size) if cut else batches(s, batch_size)))
    tokens = 0
    t = now(s)
    with torch.inference_mode():
        for i, input_ids in enumerate(inputs):
            if max_batches is not None and i >= max_batches:
                break
            base(input_ids=input_ids, use_cache=False)
            tokens += input_ids.numel()
    return {"seconds": now(s) - t, "tokens": tokens}


def run_bare_cut(s: Setup, batch_size: int) -> dict:
    return run_bare(s, batch_size, cut=True)


def run_paired(s: Setup, batch_size: int) -> dict:
    """tokenprobe's hooked forward and the bare stack on the same batch, one right after the other
    (which goes first alternates), for the first `--paired-batches` batches of tokenprobe's own run."""
    import itertools

    import torch

    from tokenprobe.extract.capture import LayerCapture

    model = s.loaded.model
    base = getattr(model, model.base_model_prefix)
    capture = LayerCapture(s.loaded, list(range(s.loaded.num_layers + 1)))
    seconds = {"bare": 0.0, "hooked": 0.0}
    tokens = 0
    with torch.inference_mode():
        for i, (input_ids, rows, cols) in enumerate(itertools.islice(cut_batches(s, batch_size), s.paired_batches)):
            for name in ("bare", "hooked") if i % 2 == 0 else ("hooked", "bare"):
                t = now(s)
                if name == "bare":
                    base(input_ids=input_ids, use_cache=False)
                else:
                    with capture:
                        capture.run(model, input_ids, rows, cols)
                seconds[name] += now(s) - t
            tokens += input_ids.numel()
    return {"seconds": seconds["hooked"], "bare_seconds": seconds["bare"], "tokens": tokens,
            "ratio": seconds["hooked"] / seconds["bare"]}


def run_probes_only(s: Setup, batch_size: int, max_batches: int | None = None) -> dict:
    """tokenprobe --no-baselines: the probes and their bootstrap intervals, without the model's own
    full-vocabulary prediction and the logit lens."""
    return run_tokenprobe(s, batch_size, max_batches, baselines=False)


def run_auto(s: Setup, batch_size: int) -> dict:
    """tokenprobe with --batch-size auto (a throughput probe on the CPU, free memory on CUDA)."""
    return run_tokenprobe(s, "auto")


def run_tokenprobe(s: Setup, batch_size: int | str, max_batches: int | None = None, baselines: bool = True,
                   keep: Path | None = None) -> dict:
    import dataclasses
    import shutil

    from tokenprobe.pipelines.train import train

    config = dataclasses.replace(s.config, batch_size=batch_size, baselines=baselines)
    if max_batches is not None:
        config.max_tokens = min(config.max_tokens or math.inf, max_batches * batch_size * config.context_length)
    import warnings

    out = Path(tempfile.mkdtemp(prefix="tokenprobe-bench-"))
    t = now(s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only N positive positions exist": intended, as in setup()
        # As the command line runs it: probes, results, report and plot written to a run folder.
        result = train(config, loaded=s.loaded, cache_dir=s.cache_dir, out_dir=out / "run", progress=False)
    seconds = now(s) - t
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(out / "run", keep)
    shutil.rmtree(out, ignore_errors=True)
    ev = {r.layer: r.metrics["eval"] for r in result.layers}
    return {"seconds": seconds, "tokens": result.record["extraction"]["tokens"],
            "forward_s": result.record["timings"]["forward_s"],
            "train_probes_s": result.record["timings"]["train_probes_s"],
            "timings": result.record["timings"],
            "batch_size": result.record["extraction"]["batch_size"],
            "eval": {layer: _ba(m.tp, m.fp, m.tn, m.fn) for layer, m in ev.items()}}


def run_recipe(s: Setup, batch_size: int, max_batches: int | None = None) -> dict:
    """output_hidden_states=True over the same chunks, same positions, sklearn LR per layer."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tokenprobe.vocabulary import SUBSETS

    pos = s.positions
    n_layers = s.loaded.num_layers + 1
    feats = np.zeros((n_layers, len(pos), s.loaded.hidden_size), dtype=np.float32)
    tokens = 0
    t = now(s)
    with torch.inference_mode():
        for i, (input_ids, rows, cols, index) in enumerate(batches(s, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            out = s.loaded.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
            for layer, h in enumerate(out.hidden_states):
                feats[layer, index] = h[rows, cols].float().cpu().numpy()
            tokens += input_ids.numel()
            del out
    forward_s = now(s) - t
    if max_batches is not None:
        return {"seconds": forward_s, "tokens": tokens}
    train = pos.subset == SUBSETS.index("train")
    ev = pos.subset == SUBSETS.index("eval")
    scores = {}
    for layer in range(n_layers):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        clf.fit(feats[layer, train], pos.label[train])
        scores[layer] = _ba_from(pos.label[ev], clf.predict(feats[layer, ev]))
    return {"seconds": time.perf_counter() - t, "tokens": tokens, "forward_s": forward_s, "eval": scores}


def run_seed(s: Setup, batch_size: int, epochs: int, lr: float) -> dict:
    """Per `auto` layer: a fresh probe, Adam, the full forward pass redone for every batch of every epoch."""
    import numpy as np
    import torch

    from tokenprobe.config import parse_layers
    from tokenprobe.vocabulary import SUBSETS

    pos = s.positions
    layers = parse_layers("auto", s.loaded.num_layers)
    train_chunks = np.unique(pos.chunk[pos.subset == SUBSETS.index("train")])
    eval_mask = pos.subset == SUBSETS.index("eval")
    eval_chunks = np.unique(pos.chunk[eval_mask])
    model = s.loaded.model
    rng = np.random.default_rng(0)
    tokens = 0
    scores = {}
    dev = s.loaded.placement.input
    t = now(s)

    def hidden_at(layer, input_ids, rows, cols):
        nonlocal tokens
        with torch.inference_mode():
            out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        tokens += input_ids.numel()
        return out.hidden_states[layer][rows, cols].float().clone()

    for layer in layers:
        torch.manual_seed(layer)
        probe = torch.nn.Linear(s.loaded.hidden_size, 1).to(dev)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        mean = std = None
        for _ in range(epochs):
            for input_ids, rows, cols, index in batches(s, batch_size, rng.permutation(train_chunks)):
                keep = pos.subset[index] == SUBSETS.index("train")
                x = hidden_at(layer, input_ids, rows, cols)[torch.from_numpy(keep).to(dev)]
                y = torch.from_numpy(pos.label[index][keep]).float().to(dev)
                if mean is None:  # standardise with the first batch's statistics
                    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(probe((x - mean) / std).squeeze(-1), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        predicted, truth = [], []
        for input_ids, rows, cols, index in batches(s, batch_size, eval_chunks):
            keep = pos.subset[index] == SUBSETS.index("eval")
            x = hidden_at(layer, input_ids, rows, cols)[torch.from_numpy(keep).to(dev)]
            with torch.no_grad():
                predicted.append((probe((x - mean) / std).squeeze(-1) > 0).cpu().numpy())
            truth.append(pos.label[index][keep])
        scores[layer] = _ba_from(np.concatenate(truth), np.concatenate(predicted))
    return {"seconds": now(s) - t, "tokens": tokens, "eval": scores, "layers": layers}


# --------------------------------------------------------------------------------------- statistics


def _ba(tp, fp, tn, fn) -> tuple[float, float]:
    """Balanced accuracy and its standard error (binomial, the two class recalls independent)."""
    tpr = tp / max(1, tp + fn)
    tnr = tn / max(1, tn + fp)
    se = 0.5 * math.sqrt(tpr * (1 - tpr) / max(1, tp + fn) + tnr * (1 - tnr) / max(1, tn + fp))
    return (tpr + tnr) / 2, se


def _ba_from(truth, predicted) -> tuple[float, float]:
    import numpy as np

    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    return _ba(int((truth & predicted).sum()), int((~truth & predicted).sum()),
               int((~truth & ~predicted).sum()), int((truth & ~predicted).sum()))


# ------------------------------------------------------------------------------------- peak memory


def peak_rss_kib() -> int:
    """This process's own peak resident memory (KiB): VmHWM, the high-water mark of its address space.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's RSS at fork into the child's maxrss at
    exec, so a child of a benchmark holding 3.5 GB reports at least 3.5 GB whatever it does.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child_main(args: argparse.Namespace) -> None:
    """One configuration in a fresh process; prints its peak resident memory as JSON."""
    s = setup(args, args.memory_batch)
    after_load = peak_rss_kib()
    result = {}
    if args.child == "bare":
        result = run_bare(s, args.memory_batch, args.memory_batches)
    elif args.child == "tokenprobe":
        result = run_tokenprobe(s, args.memory_batch, args.memory_batches)
    elif args.child == "recipe":
        result = run_recipe(s, args.memory_batch, args.memory_batches)
    peak = peak_rss_kib()
    figures = {"config": args.child, "peak_rss_gb": peak / 2**20, "after_load_rss_gb": after_load / 2**20,
               "tokens": result.get("tokens", 0)}
    if s.loaded.placement.input.type == "cuda":  # the memory that limits the batch there is the device's
        import torch

        figures["peak_cuda_gb"] = torch.cuda.max_memory_allocated(s.loaded.placement.input) / 2**30
    print(json.dumps(figures))


def measure_memory(args: argparse.Namespace) -> dict:
    """Each configuration in fresh processes, `--memory-repeats` times: the median peak, and the range.

    glibc's allocator keeps freed blocks or returns them depending on the order of allocations,
    so one process can peak 0.3 GB above the next for the same work: one measurement is not enough.
    """
    out = {}
    for name in ("load", "bare", "tokenprobe", "recipe"):
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--corpus", args.corpus,
               "--context-length", str(args.context_length), "--dtype", args.dtype, "--device", args.device,
               "--tokens", str(max(args.tokens, args.memory_batch * args.memory_batches * args.context_length)),
               "--memory-batch", str(args.memory_batch), "--memory-batches", str(args.memory_batches)]
        if args.cache_dir:
            cmd += ["--cache-dir", str(args.cache_dir)]
        peaks, last = [], {}
        for _ in range(1 if name == "load" else args.memory_repeats):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = {"error": f"exit {proc.returncode} (killed for memory?): {proc.stderr.strip()[-300:]}"}
                break
            last = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks.append(last["peak_rss_gb"])
        if peaks and "error" not in last:
            last = {**last, "peak_rss_gb": median(peaks), "peaks_gb": peaks}
        out[name] = last
        print(f"  peak memory {name:<10} {_mem(out[name])}", flush=True)
    return out


def _mem(m: dict) -> str:
    if "error" in m:
        return m["error"]
    spread = m.get("peaks_gb", [])
    runs = (f", median of {len(spread)}: {min(spread):.2f} to {max(spread):.2f}") if len(spread) > 1 else ""
    cuda = f"{m['peak_cuda_gb']:.2f} GiB peak CUDA memory, " if "peak_cuda_gb" in m else ""
    return f"{cuda}{m['peak_rss_gb']:.2f} GiB peak RSS ({m['tokens']:,} tokens{runs})"


# ------------------------------------------------------------------------------------------- startup


def time_to_marker(cmd: list[str], marker: bytes) -> float:
    """Seconds from launching `cmd` until `marker` appears on its stdout or stderr; the process is then
    stopped (its own exit, which unloads torch, is not part of any start)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.STDOUT, stdout=subprocess.PIPE)
    seen = threading.Event()
    seen_at = [float("nan")]

    def watch():
        buf = b""
        while True:
            ch = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(1)
            if not ch:
                return
            buf += ch
            if not seen.is_set() and marker in buf:
                seen_at[0] = time.perf_counter() - started
                seen.set()
            buf = buf[-64:]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    seen.wait(600)
    proc.terminate()
    proc.wait()
    watcher.join(5)
    return seen_at[0]


def import_floor_once(model_module: str) -> float:
    """Seconds for a bare Python to import torch and the model's transformers code: the part of any
    startup that tokenprobe cannot shorten."""
    code = (f"import torch, transformers; from transformers import AutoModelForCausalLM; import {model_module}; "
            "print('imported', flush=True); import time; time.sleep(60)")
    return time_to_marker([sys.executable, "-c", code], b"imported")


def startup_once(args: argparse.Namespace) -> float:
    """Seconds from launching `tokenprobe train` (model and chunks cached) to its 'Forward pass' bar."""
    exe = Path(sys.executable).with_name("tokenprobe")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(exe), "train", "--model", args.model, "--corpus", args.corpus, "--max-tokens",
               str(16 * args.context_length), "--context-length", str(args.context_length), "--layers", "all",
               "--dtype", args.dtype, "--device", args.device, "--out", str(Path(tmp) / "run")]
        if args.cache_dir:
            cmd += ["--cache-dir", str(args.cache_dir)]
        return time_to_marker(cmd, b"Forward pass")


def measure_startup(args: argparse.Namespace, model_module: str, repeats: int = 3) -> tuple[list[float], list[float]]:
    """(startup seconds, import floor seconds), measured in turns so that both see the same machine.

    Each startup run is stopped at its first forward pass, so it leaves its extraction checkpoint (kept
    for a resume) in the cache: the folders it made are removed, and no run resumes from another.
    """
    import shutil

    from tokenprobe.files import default_cache_dir

    extraction = Path(args.cache_dir or default_cache_dir()) / "extraction"
    existing = set(extraction.iterdir()) if extraction.is_dir() else set()
    starts, floors = [], []
    for _ in range(repeats):
        starts.append(startup_once(args))
        for folder in (set(extraction.iterdir()) if extraction.is_dir() else set()) - existing:
            shutil.rmtree(folder, ignore_errors=True)
        floors.append(import_floor_once(model_module))
        print(f"  launch -> first forward pass: {starts[-1]:.2f} s; python importing torch and {model_module}: "
              f"{floors[-1]:.2f} s", flush=True)
    return starts, floors


# ---------------------------------------------------------------------------------------------- main


def median(values):
    return statistics.median(values) if values else float("nan")


def paired_ratios(a: list[dict], b: list[dict]) -> list[float]:
    """a's time over b's within each repeat both ran in (a single run of either pairs with every run of
    the other): the machine's drift between repeats cancels out of each ratio."""
    if len(a) == 1 or len(b) == 1:
        return [x["seconds"] / y["seconds"] for x in a for y in b]
    return [x["seconds"] / y["seconds"] for x, y in zip(a, b)]


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return (f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, {mem:.0f} GB RAM{gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    began = time.perf_counter()
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {machine()}", flush=True)
    report["machine"] = machine()

    if not args.memory_only:
        s = setup(args, args.batch_size)
        n_tok = len(s.wanted) * args.context_length
        counts = s.positions.counts()
        print(f"model {s.loaded.name}: {s.loaded.num_layers} layers, {str(s.loaded.dtype).replace('torch.', '')} "
              f"on {s.loaded.placement.input} (loaded in {s.load_s:.1f} s); {len(s.wanted)} chunks x {args.context_length} "
              f"= {n_tok:,} tokens per forward pass; batch {args.batch_size}", flush=True)
        print("positions: " + "; ".join(f"{k} {v['positions']:,} ({v['positive']:,} positive)" for k, v in counts.items()))
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        timed = (("bare", run_bare), ("bare_cut", run_bare_cut), ("paired", run_paired), ("tokenprobe", run_tokenprobe),
                 ("probes_only", run_probes_only), ("recipe", run_recipe), ("auto", run_auto))
        for rep in range(max(args.repeats, args.extra_repeats)):
            for name, fn in timed:
                if name in skip or rep >= (args.repeats if name in TARGETED else args.extra_repeats):
                    continue
                r = fn(s, args.batch_size, keep=args.out) if name == "tokenprobe" and args.out else fn(s, args.batch_size)
                runs[name].append(r)
                picked = f"  (picked batch {r['batch_size']})" if name == "auto" else ""
                print(f"  repeat {rep + 1} {name:<12} {r['seconds']:7.1f} s  {r['tokens']:>9,} tokens run{picked}",
                      flush=True)
        if "seed" not in skip:
            for rep in range(args.seed_repeats):
                r = run_seed(s, args.batch_size, args.seed_epochs, args.seed_lr)
                runs["seed"].append(r)
                print(f"  repeat {rep + 1} seed         {r['seconds']:7.1f} s  {r['tokens']:>9,} tokens run "
                      f"({args.seed_epochs} epoch(s) x {len(r['layers'])} layers, and each layer's evaluation)",
                      flush=True)
        report["model_module"] = type(s.loaded.model).__module__
        del s
        summarise(args, runs, n_tok, report)

    if not args.no_memory:
        print(f"\npeak memory, each configuration in a fresh process, batch {args.memory_batch} x ctx {args.context_length}, "
              f"{args.memory_batches} forward passes:", flush=True)
        mem = measure_memory(args)
        report["memory"] = mem
        tp, rc = mem.get("tokenprobe", {}), mem.get("recipe", {})
        key = "peak_cuda_gb" if "peak_cuda_gb" in tp else "peak_rss_gb"
        if key in tp and key in rc:
            where = "CUDA" if key == "peak_cuda_gb" else "resident"
            print(f"  tokenprobe / recipe peak {where} memory: {tp[key] / rc[key]:.2f} (target <= 0.20)")
    if not args.no_startup:
        print("\nsecond `tokenprobe train` from launch to its first forward pass (the first run warms the caches):")
        report["startup_s"], report["import_floor_s"] = measure_startup(
            args, report.get("model_module", "transformers.modeling_utils"))
        start, floor = median(report["startup_s"]), median(report["import_floor_s"])
        # Each start is measured beside its own floor, so the median of the differences is free of drift.
        own = median([a - b for a, b in zip(report["startup_s"], report["import_floor_s"])])
        report["startup_own_s"] = own
        print(f"  medians: {start:.2f} s to the first forward pass (target <= 5 s); {floor:.2f} s of any start is "
              f"importing torch and transformers' model code; tokenprobe's own share (median of the paired "
              f"differences) is about {own:.1f} s")
    report["benchmark_s"] = time.perf_counter() - began
    print(f"\nbenchmark wall time: {report['benchmark_s'] / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def summarise(args, runs, n_tok, report) -> None:
    med = {name: median([r["seconds"] for r in rs]) for name, rs in runs.items()}
    report["median_s"] = med
    report["runs"] = runs
    print(f"\nmedians over {args.repeats} repeat(s) (bare_cut, probes_only, auto: {args.extra_repeats}; seed: "
          f"{args.seed_repeats}); "
          f"the sweep's chunks hold {n_tok:,} tokens:")
    print(f"  {'configuration':<42} {'wall s':>8} {'tokens run':>11} {'sweep tok/s':>12}")
    for name in CONFIGS:
        if runs[name]:
            # tokens/s over the tokens the sweep covers, so every row compares the same work; the paired
            # configuration covers only its first --paired-batches batches, so its rate is over those
            covered = runs[name][0]["tokens"] if name == "paired" else n_tok
            print(f"  {LABELS[name]:<42} {med[name]:8.1f} {runs[name][0]['tokens']:>11,} {covered / med[name]:12.0f}")
    if runs["tokenprobe"]:
        tp = runs["tokenprobe"]
        keys = [k for k in tp[0]["timings"] if k not in ("total_s", "load_model_s")]
        print("  tokenprobe breakdown (median s): " + ", ".join(
            f"{k.removesuffix('_s')} {median([r['timings'][k] for r in tp]):.1f}" for k in keys))
        print(f"  tokenprobe runs {tp[0]['tokens'] / n_tok:.1%} of the chunks' tokens: each chunk stops after its "
              "last sampled position")
    if runs["paired"]:
        paired = median([r["ratio"] for r in runs["paired"]])
        report["paired_forward_ratio"] = paired
        print(f"  tokenprobe's forward pass / the bare stack, batch by batch in turns: {paired:.3f} "
              f"({runs['paired'][0]['tokens']:,} tokens each)")
    if runs["paired"] and runs["tokenprobe"]:
        tp = runs["tokenprobe"]
        forward, total = median([r["forward_s"] for r in tp]), median([r["seconds"] for r in tp])
        share = tp[0]["tokens"] / n_tok
        estimate = total / forward * paired * share
        report["estimated_tokenprobe_over_bare"] = estimate
        print(f"  so tokenprobe / bare forward, free of drift: {total:.1f} / {forward:.1f} s of its run is its forward "
              f"pass, x {paired:.3f}, x {share:.3f} of the chunks' tokens run = {estimate:.2f}")
    if runs["auto"]:
        print("  --batch-size auto picked " + ", ".join(str(r["batch_size"]) for r in runs["auto"])
              + f" (the other rows use {args.batch_size})")
    if runs["recipe"]:
        print(f"  recipe breakdown (median): forward {median([r['forward_s'] for r in runs['recipe']]):.1f} s, "
              f"sklearn {median([r['seconds'] - r['forward_s'] for r in runs['recipe']]):.1f} s")
    ratios = {}
    for label, a, b, target in (("tokenprobe / bare forward", "tokenprobe", "bare", "<= 1.15"),
                                ("tokenprobe / bare forward, cut batches", "tokenprobe", "bare_cut", ""),
                                ("--no-baselines / bare forward", "probes_only", "bare", ""),
                                ("--batch-size auto / batch " + str(args.batch_size), "auto", "tokenprobe", ""),
                                ("recipe / tokenprobe", "recipe", "tokenprobe", ">= 3"),
                                ("recipe / --no-baselines", "recipe", "probes_only", ""),
                                ("seed / tokenprobe", "seed", "tokenprobe", "")):
        if runs[a] and runs[b]:
            within = paired_ratios(runs[a], runs[b])
            ratios[label] = median(within)
            spread = f"  (repeats: {', '.join(f'{r:.2f}' for r in within)})" if len(within) > 1 else ""
            print(f"  {label:<40} {ratios[label]:6.2f}" + (f"  target {target}" if target else "") + spread)
    report["ratios"] = ratios
    if runs["tokenprobe"]:
        tp_eval = runs["tokenprobe"][0]["eval"]
        print("\nbalanced accuracy on the held-out balanced positions (+- 95% interval); differences vs tokenprobe:")
        print(f"  {'layer':>5} {'tokenprobe':>15} {'recipe':>15} {'diff':>15} {'seed':>15} {'diff':>15}")
        for layer, (ba, se) in sorted(tp_eval.items()):
            row = f"  {layer:>5} {ba:8.3f}+-{1.96 * se:.3f}"
            for name in ("recipe", "seed"):
                other = runs[name][0]["eval"].get(layer) if runs[name] else None
                if other is None:
                    row += f" {'':>15} {'':>15}"
                else:
                    d_se = 1.96 * math.sqrt(se**2 + other[1] ** 2)
                    row += f" {other[0]:8.3f}+-{1.96 * other[1]:.3f} {other[0] - ba:+8.3f}+-{d_se:.3f}"
            print(row)


def run(argv: list[str] | None = None) -> int:
    """main(), with tokenprobe's own errors (a model or corpus that is not there, ...) as one line and
    exit code 2, as the command line gives them."""
    from tokenprobe.errors import TokenprobeError

    try:
        return main(argv)
    except TokenprobeError as exc:
        print(f"benchmarks/sweep.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
