"""`train`: corpus -> chunks -> labels -> positions -> one forward pass -> probes -> results."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenprobe.activations import extract
from tokenprobe.chunks import load_chunks
from tokenprobe.config import RunConfig, parse_layers, run_name, sweep_name
from tokenprobe.corpus import load_corpus
from tokenprobe.errors import TokenprobeError
from tokenprobe.evaluation import evaluate_run
from tokenprobe.files import default_cache_dir, write_json
from tokenprobe.labels import cached_target, task_labels
from tokenprobe.locks import RunLock
from tokenprobe.models import LoadedModel, load_model
from tokenprobe.positions import sample_positions, split_chunks
from tokenprobe.probes import LinearProbe, fit_linear_probes, pos_weight_for
from tokenprobe.report import write_report
from tokenprobe.resume import ExtractionCheckpoint
from tokenprobe.results import BaselineResult, LayerResult, format_table, write_results
from tokenprobe.tracking import log_to_wandb


@dataclass
class RunResult:
    config: RunConfig
    record: dict[str, Any]
    layers: list[LayerResult]
    probes: dict[int, LinearProbe]
    out_dir: Path | None
    baselines: list[BaselineResult] = field(default_factory=list)
    comparisons: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> LayerResult:
        return max(self.layers, key=lambda r: np.nan_to_num(r.primary.balanced_accuracy, nan=-1.0))

    def table(self) -> str:
        ties = self.comparisons.get("balanced_accuracy", {}).get("indistinguishable_from_best")
        return format_table(self.layers, self.baselines, ties)


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses a folder holding another run (unless overwrite) or anything that is not a run."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise TokenprobeError(f"--out {out_dir} exists and is not a folder; choose another --out")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / "run.json").exists():
        raise TokenprobeError(f"--out {out_dir} is a non-empty folder that is not a tokenprobe run; choose another --out")
    if not overwrite:
        raise TokenprobeError(f"--out {out_dir} holds another run; pass --overwrite to replace it, or choose another --out")


def default_out_dir(config: RunConfig, model_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{sweep_name(config, model_name)}-{stamp}"


def _publish(staging: Path, out_dir: Path) -> None:
    """Moves a finished staging folder into place, replacing an old run only at the last moment."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train(
    config: RunConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    save: bool = True,
    progress: bool = True,
) -> RunResult:
    """Trains and evaluates one probe per requested layer from a single forward pass per batch.

    Pass `loaded` (from :func:`tokenprobe.load_model`) to reuse a model across calls. With
    ``save=True`` the probes and results go to `out_dir` (default ``runs/<sweep name>-<time>``),
    written to a staging folder first so an interrupted run leaves nothing half-written.
    """
    config = config or RunConfig()
    config.validate()
    quiet = not progress
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    lock: RunLock | None = None
    if save and out_dir is not None:
        out_dir = Path(out_dir)
        check_out_dir(out_dir, overwrite)
        # Held until the run is published; released by the kernel if the process dies first.
        lock = RunLock(out_dir).acquire()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if loaded is None:
        say(f"Loading model {config.model} ...", quiet)
        loaded = load_model(config.model, config.dtype, config.device, cache_dir, progress=progress)
    timings["load_model_s"] = time.perf_counter() - started
    dtype_name = str(loaded.dtype).replace("torch.", "")
    say(f"Model {loaded.name}: {loaded.num_layers} layers, width {loaded.hidden_size}, {dtype_name} on "
        f"{loaded.device}", quiet)
    if loaded.dtype == torch.float16:
        say("warning: float16 overflows in some models (Gemma 3 among them); bad batches will be skipped", quiet)

    target = cached_target(loaded, config.target, config.target_id, cache_dir)
    say(target.describe(), quiet)
    layers = parse_layers(config.layers, loaded.num_layers)
    if loaded.max_positions and config.context_length > loaded.max_positions:
        raise TokenprobeError(
            f"--context-length {config.context_length} exceeds this model's limit of {loaded.max_positions} positions"
        )

    t = time.perf_counter()
    corpus = load_corpus(config.corpus, config.text_field, config.corpus_config, config.corpus_split)
    chunks, bos_id, from_cache = load_chunks(corpus, lambda: loaded.tokenizer, loaded.tokenizer_hash,
                                             config.context_length, cache_dir, progress)
    timings["chunks_s"] = time.perf_counter() - t
    say(f"Corpus {corpus.name}: {len(corpus.documents):,} documents, {len(chunks):,} chunks of "
        f"{config.context_length} tokens{' (cached)' if from_cache else ''}", quiet)

    max_chunks = config.max_tokens // config.context_length if config.max_tokens else None
    split = split_chunks(len(chunks), config.eval_fraction, config.seed, max_chunks)
    labels, valid = task_labels(chunks, target.token_id, config.task, has_bos=bos_id is not None)
    positions = sample_positions(labels, valid, split, config.train_positions, config.eval_positions,
                                 config.balance, config.seed)
    counts = positions.counts()
    say("Positions: " + "; ".join(f"{k} {v['positions']:,} ({v['positive']:,} positive) from {v['chunks']:,} chunks"
                                  for k, v in counts.items()), quiet)
    say(f"Layers {','.join(map(str, layers))}: one forward pass per batch, stopping after layer {max(layers)}", quiet)

    # The model's own prediction (a baseline) needs the last layer's residual even when it is not probed.
    # The baselines predict the next token: for --task current they would answer another question.
    baselines = config.baselines and config.task == "next"
    if config.baselines and not baselines:
        say("Baselines skipped: they predict the next token, and --task current asks about this one", quiet)
    extract_layers = sorted({*layers, loaded.num_layers}) if baselines else layers
    if extract_layers != layers:
        say(f"Baselines: also extracting layer {loaded.num_layers} for the model's own prediction", quiet)
    checkpoint = ExtractionCheckpoint.for_run(cache_dir, loaded, chunks, positions, extract_layers)
    batch_size = config.batch_size
    if batch_size == "auto" and checkpoint.resumable_batch_size():
        batch_size = checkpoint.resumable_batch_size()  # what the interrupted run chose, so its batches count
    if batch_size == "auto":
        from tokenprobe.batching import choose_batch_size

        t = time.perf_counter()
        batch_size, why = choose_batch_size(loaded, chunks, len(np.unique(positions.chunk)), extract_layers)
        timings["batch_size_probe_s"] = time.perf_counter() - t
        say(f"--batch-size auto: {batch_size} ({why})", quiet)
    if checkpoint.completed(batch_size):
        say(f"Resuming: {checkpoint.completed(batch_size)} batches were already extracted by an "
            f"interrupted run ({checkpoint.folder})", quiet)
    try:
        acts = extract(loaded, chunks, positions, extract_layers, batch_size, progress, checkpoint=checkpoint)
    except TokenprobeError:
        checkpoint.remove()  # a rerun would only meet the same error
        raise
    timings["forward_s"] = acts.seconds
    if acts.bad_batches:
        say(f"warning: skipped {acts.bad_batches} of {acts.batches} batches with NaN/Inf hidden states", quiet)

    t = time.perf_counter()
    train_rows = torch.from_numpy(np.flatnonzero(positions.mask("train") & acts.keep))
    train_labels = torch.from_numpy(positions.label)[train_rows]
    probed = torch.tensor([acts.layers.index(layer) for layer in layers])  # not the extra baseline layer
    pos_weight = pos_weight_for(train_labels, config.pos_weight_cap)
    # Views of each probed layer: the training rows are gathered one layer at a time inside the fit.
    probes = fit_linear_probes([acts.values[i] for i in probed.tolist()], train_labels, rows=train_rows,
                               l2=config.l2, pos_weight=pos_weight, max_iter=config.max_iter,
                               device=loaded.device, progress=progress,
                               groups=torch.from_numpy(positions.chunk)[train_rows], seed=config.seed)
    timings["train_probes_s"] = time.perf_counter() - t
    penalties = [probe.metadata["l2"] for probe in probes]
    say(f"L2 penalty {'chosen per layer on a fifth of the training chunks: ' if config.l2 == 'auto' else ''}"
        f"{_span(penalties)} ({probes[0].metadata['l2_method']})", quiet)

    t = time.perf_counter()
    if baselines or config.bootstrap:
        say(("Baselines and " if baselines else "") + f"95% intervals ({config.bootstrap} bootstrap resamples "
            "of held-out chunks)", quiet)
    scored = evaluate_run(loaded, chunks, labels, valid, split.train, positions, acts.keep, acts.values,
                          acts.layers, layers, probes, target.token_id, baselines, config.bootstrap,
                          config.seed)
    timings["baselines_intervals_s"] = time.perf_counter() - t

    record = {
        "config": config.to_dict(),
        "sweep_name": sweep_name(config, loaded.name),
        "model": {"name": loaded.name, "source": loaded.source, "weights_hash": loaded.weights_hash,
                  "tokenizer_hash": loaded.tokenizer_hash, "architecture": type(loaded.model).__name__,
                  "num_layers": loaded.num_layers, "hidden_size": loaded.hidden_size},
        "layers": layers,
        "dtype": dtype_name,
        "device": str(loaded.device),
        "target": {"text": target.text, "token_id": target.token_id, "token": target.token},
        "corpus": {"name": corpus.name, "sha256": corpus.sha256, "documents": len(corpus.documents),
                   "chunks": len(chunks), "train_chunks": len(split.train), "eval_chunks": len(split.eval),
                   "chunks_from_cache": from_cache},
        "positions": counts,
        "pos_weight": pos_weight,
        "extraction": {"batches": acts.batches, "bad_batches": acts.bad_batches,
                       "resumed_batches": acts.resumed_batches, "batch_size": acts.batch_size,
                       "bad_layers": acts.bad_layers, "tokens": acts.tokens,
                       "tokens_per_second": acts.tokens_per_second},
        "timings": timings,
        "baselines": scored.info,
        "intervals": {"level": 0.95, "resamples": config.bootstrap, "unit": "held-out chunks"},
        "versions": {"tokenprobe": _version(), "torch": torch.__version__, "transformers": _transformers_version(),
                     "python": platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    results: list[LayerResult] = []
    by_layer: dict[int, LinearProbe] = {}
    for i, (layer, probe) in enumerate(zip(layers, probes)):
        metrics = scored.probe_metrics(layer)
        name = run_name(config, layer, loaded.name)
        probe.metadata = {
            **probe.metadata,  # the L2 penalty and how it was chosen
            "layer": layer, "task": config.task, "target": target.text, "target_ids": [target.token_id],
            "model": loaded.name, "model_source": loaded.source, "weights_hash": loaded.weights_hash,
            "tokenizer_hash": loaded.tokenizer_hash, "hidden_size": loaded.hidden_size,
            "context_length": config.context_length, "dtype": dtype_name, "run_name": name,
            "tokenprobe_version": _version(),
            "metrics": {k: m.to_dict() for k, m in metrics.items()},
            "run": record,
        }
        by_layer[layer] = probe
        results.append(LayerResult(layer=layer, run_name=name, probe_file=f"probes/layer{layer:02d}.safetensors"
                                   if save else None, metrics=metrics, l2=probe.metadata["l2"],
                                   **scored.layer_fields(layer)))
    timings["total_s"] = time.perf_counter() - started

    if save:
        out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config, loaded.name)
        check_out_dir(out_dir, overwrite)
        if lock is None:
            lock = RunLock(out_dir).acquire()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / "probes").mkdir(parents=True)
            for r in results:
                by_layer[r.layer].save(staging / r.probe_file)
            write_results(staging, record, results, scored.baselines, {"comparisons": scored.comparisons})
            write_report(staging)
            write_json(staging / "run.json", record)
            _publish(staging, out_dir)
        except OSError as exc:
            raise TokenprobeError(f"cannot write the run to {out_dir}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            lock.release()
    checkpoint.remove()  # only now: until the run is saved, a rerun can resume from it
    result = RunResult(config=config, record=record, layers=results, probes=by_layer,
                       out_dir=out_dir if save else None, baselines=scored.baselines, comparisons=scored.comparisons)
    if config.wandb:
        log_to_wandb(result, say=say)  # shown even with --quiet: where the runs went matters
    return result


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g} to {high:g} (median {float(np.median(values)):g})"


def _version() -> str:
    from tokenprobe import __version__

    return __version__


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
