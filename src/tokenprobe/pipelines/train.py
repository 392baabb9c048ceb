"""`train`: prepare -> plan -> extract -> fit -> score -> record -> publish, one stage per function."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.analysis.families import FamilyEvaluation, score_families
from tokenprobe.analysis.metrics import BaselineResult, LayerResult
from tokenprobe.analysis.scoring import RunEvaluation, score_run
from tokenprobe.config import RunConfig, parse_layers, run_name, sweep_name, task_offset
from tokenprobe.data.labels import ControlTask
from tokenprobe.data.positions import PositionSet
from tokenprobe.data.prepare import Prepared, prepare
from tokenprobe.device import dtype_name
from tokenprobe.distributed import World, device_for, world_from_env
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.extract import ExtractionStats, check_bad_batches, extract, extract_positions
from tokenprobe.extract.plan import RunPlan
from tokenprobe.extract.sinks import ActivationSource, CheckpointSink, MemorySink
from tokenprobe.extract.peers import GRACE_S, STATUS_DIR, Peers, clear_statuses
from tokenprobe.extract.store import (DEFAULT_KEEP_BYTES, KeepSink, LayerViews, StoreSource, finish_store,
                                      keep_of_shards, move_store)
from tokenprobe.files import default_cache_dir, json_safe, write_json
from tokenprobe.models.loading import LoadedModel, load_model
from tokenprobe.pipelines.run_dir import RUN_RECORD, RunDir, default_out_dir
from tokenprobe.probes.base import ModelIdentity, Probe, ProbeMeta
from tokenprobe.probes.fitting import description_length, fit_control, fit_family
from tokenprobe.probes.linear import pos_weight_for
from tokenprobe.report.markdown import write_report
from tokenprobe.report.families import format_families_table
from tokenprobe.report.results import format_table, write_results
from tokenprobe.report.tracking import log_to_wandb
from tokenprobe.vocabulary import TRAIN, best_index

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    config: RunConfig
    record: dict[str, Any]
    layers: list[LayerResult]
    probes: dict[int, Probe]  # the primary family's (the first of --probe), by layer
    out_dir: Path | None
    baselines: list[BaselineResult] = field(default_factory=list)
    comparisons: dict[str, Any] = field(default_factory=dict)
    families: FamilyEvaluation | None = None  # every family side by side, with the control task
    family_probes: dict[str, dict[int, Probe]] = field(default_factory=dict)  # family -> layer -> probe

    @property
    def best(self) -> LayerResult:
        return self.layers[best_index([r.primary.balanced_accuracy for r in self.layers])]

    def table(self) -> str:
        ties = self.comparisons.get("balanced_accuracy", {}).get("indistinguishable_from_best")
        table = format_table(self.layers, self.baselines, ties)
        if self.families is not None:
            table += "\n\n" + format_families_table(json_safe(self.families.to_dict()))
        return table


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Fitted:
    """Every family's probes of every probed layer, and the same on the control task."""

    probes: dict[str, dict[int, Probe]]  # family -> layer -> probe; the first family is the primary one
    pos_weight: float
    control: dict[str, dict[int, Probe]] | None = None
    control_task: ControlTask | None = None
    control_labels: np.ndarray | None = None  # each position's control label
    mdl: dict[tuple[str, int], dict[str, Any]] | None = None

    @property
    def primary(self) -> dict[int, Probe]:
        return next(iter(self.probes.values()))


@dataclass
class ExtractionPlan:
    """What the forward pass computes: the layers (probed, plus the last one the baselines need), the
    batch size, and the checkpoint finished batches go to."""

    layers: list[int]
    baselines: tuple[str, ...]  # the kinds computed (model, lens, stats; see --baselines): empty for none
    batch_size: int
    checkpoint: CheckpointSink
    baselines_skipped: str | None = None  # why the baselines were asked for but do not apply


def train(
    config: RunConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    save: bool = True,
    progress: bool = True,
    world: World | None = None,
) -> RunResult | None:
    """Trains and evaluates one probe per requested layer from a single forward pass per batch.

    Pass `loaded` (from :func:`tokenprobe.load_model`) to reuse a model across calls. With
    ``save=True`` the probes and results go to `out_dir` (default ``runs/<sweep name>-<time>``),
    written to a staging folder first so an interrupted run leaves nothing half-written.

    Launched as several processes (torchrun, ``accelerate launch``: `world`, by default read from the
    environment) every rank runs its share of the forward pass's batches into the shared activation
    store; rank 0 then fits, scores and publishes, and returns the result; the other ranks return None.
    """
    config = config or RunConfig()
    config.validate()
    world = world if world is not None else world_from_env(config.device, config.device_map)
    if world.distributed and loaded is not None and world.gpu is not None and loaded.placement.input != \
            torch.device("cuda", world.gpu):
        raise TokenprobeError(f"rank {world.rank}'s model is on {loaded.placement.input}, not on its GPU cuda:{world.gpu}: "
                              f"load it with device=f\"cuda:{{LOCAL_RANK}}\" under a launcher, or let train load it")
    progress = progress and world.main  # the other ranks' logs hold their errors and warnings, not bars
    quiet = not progress
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    run_dir = RunDir(out_dir, overwrite) if save and world.main else None
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if world.distributed:
        say(f"Distributed: {world.size} processes ({world.backend}); rank r runs batches r, r+{world.size}, "
            f"r+{2 * world.size}, ...; rank 0 fits, scores and publishes" + (f"; the other ranks log to {world.log_dir}" if world.log_dir else ""), quiet)

    # Rank 0 first: it writes what the others then read from the cache (the model's ready copy, the chunks).
    loaded = world.first_then_others(lambda: load_stage(config, loaded, cache_dir, progress, partial=True,
                                                        device=device_for(world, config.device)))
    timings["load_model_s"] = time.perf_counter() - started
    layers = parse_layers(config.layers, loaded.num_layers)

    t = time.perf_counter()
    prepared = world.first_then_others(lambda: prepare(config, loaded, cache_dir, progress,
                                                       say=lambda m: say(m, quiet)))
    timings["chunks_s"] = time.perf_counter() - t
    counts = prepared.positions.counts()
    say("Positions: " + "; ".join(f"{k} {v['positions']:,} ({v['positive']:,} positive) from {v['chunks']:,} chunks"
                                  for k, v in counts.items()), quiet)
    say(f"Layers {','.join(map(str, layers))}: one forward pass per batch, stopping after layer {max(layers)}", quiet)

    planned = plan_stage(config, loaded, prepared, layers, cache_dir, timings, quiet, world)
    peers = start_peers(world, planned, prepared) if world.distributed else None
    source, stats = extract_stage(loaded, prepared, planned, progress, store=True, peers=peers)
    distributed = None
    if peers is not None:
        if not world.main:
            peers.finish(rank_record(world, stats))
            say(f"rank {world.rank}: {stats.batches} batches ({stats.resumed_batches} resumed), {stats.tokens:,} tokens "
                f"in {stats.seconds:.1f} s ({stats.tokens_per_second:,.0f} tokens/s); rank 0 fits and publishes")
            return None
        stats, distributed = merge_ranks(world, stats, peers)
        check_bad_batches(stats, loaded.dtype)  # most batches bad, across every rank's share
        if stats.bad_batches:
            log.warning(f"skipped {stats.bad_batches} of {stats.batches} batches with NaN/Inf hidden states")
        # Rank 0 fits alone now: with every core of its node, as one process would (the same figures).
        torch.set_num_threads(fit_threads())
        distributed["fit_threads"] = torch.get_num_threads()
    timings["forward_s"] = stats.seconds

    positions = prepared.positions
    tokens = prepared.chunks[positions.chunk, positions.position]
    fitted = fit_stage(config, positions, tokens, source, layers, loaded.placement.probes, progress, timings)
    probes, pos_weight = fitted.primary, fitted.pos_weight
    for family, by_layer in fitted.probes.items():
        summary = _fit_summary(config, family, list(by_layer.values()))
        if summary:
            say(summary, quiet)

    t = time.perf_counter()
    if config.bootstrap:
        say(("Baselines and " if planned.baselines else "") + f"95% intervals ({config.bootstrap} bootstrap "
            "resamples of held-out chunks)", quiet)
    elif planned.baselines:
        say("Baselines (no intervals: --bootstrap 0)", quiet)
    scored = score_run(loaded, prepared, source, probes, planned.baselines, config.bootstrap, config.seed)
    timings["baselines_intervals_s"] = time.perf_counter() - t
    if planned.baselines_skipped:
        scored.info["skipped"] = planned.baselines_skipped  # the record says why (report.md repeats it)
    families = None
    if len(fitted.probes) > 1 or fitted.control is not None or fitted.mdl is not None:
        t = time.perf_counter()
        families = score_families(prepared, source, fitted.probes, fitted.control, fitted.control_labels,
                                  fitted.control_task.record() if fitted.control_task else None,
                                  config.bootstrap, config.seed, fitted.mdl)
        timings["families_scoring_s"] = time.perf_counter() - t

    record = record_stage(config, loaded, prepared, layers, stats, pos_weight, timings, scored)
    if distributed is not None:
        record["distributed"] = distributed
    keep = save and keep_store(config, source, quiet)
    record["activations"] = {"kept": keep, "bytes": source.nbytes(), "layers": source.layers,
                             "path": ACTIVATIONS if keep else None}
    subject = ProbeSubject.of(loaded, prepared)
    results = layer_results(config, subject, record, probes, scored, save)
    others = family_files(config, subject, record, fitted, families, save)
    timings["total_s"] = time.perf_counter() - started

    if run_dir is not None:
        def write(staging: Path) -> None:
            write_run(staging, record, results, probes, others, scored, families)
            if distributed is not None and world.log_dir is not None and Path(world.log_dir).is_dir():
                shutil.copytree(world.log_dir, staging / "logs")  # the other ranks' logs
            # The ranks' status files (this run's, or an interrupted distributed run's a plain rerun finished)
            shutil.rmtree(planned.checkpoint.folder / STATUS_DIR, ignore_errors=True)
            if keep:  # last: a failure before this leaves the checkpoint where a rerun finds it
                finish_store(source, positions, tokens, layers, scored.baseline_scores, scored.info,
                             planned.checkpoint.ingredients)
                move_store(source, staging / ACTIVATIONS)

        out_dir = run_dir.publish(default_out_dir(config, loaded.name), write)
    planned.checkpoint.remove()  # only now: until the run is saved, a rerun can resume from it
    result = RunResult(config=config, record=record, layers=results, probes=probes,
                       out_dir=out_dir if save else None, baselines=scored.baselines, comparisons=scored.comparisons,
                       families=families, family_probes=fitted.probes)
    if config.wandb:
        log_to_wandb(result, say=say)  # shown even with --quiet: where the runs went matters
    return result


# -------------------------------------------------------------------------------------------- stages

ACTIVATIONS = "activations"  # the kept activation store, in the run folder


def keep_store(config: RunConfig, source: StoreSource, quiet: bool) -> bool:
    """Whether the store outlives the run (--keep-activations / --no-keep-activations, else under 2 GB),
    said in one line either way."""
    size = source.nbytes()
    keep = config.keep_activations if config.keep_activations is not None else size < DEFAULT_KEEP_BYTES
    why = "" if config.keep_activations is not None else (
        " (under 2 GB; --no-keep-activations drops them)" if keep else " (2 GB or more; --keep-activations keeps them)")
    if keep:
        say(f"Activations: {_size(size)} kept in the run folder ({ACTIVATIONS}/){why}; `tokenprobe fit RUN` "
            "retrains from them without the model", quiet)
    else:
        say(f"Activations: {_size(size)} not kept{why}", quiet)
    return keep


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 else f"{n / 1024**2:.0f} MB"


def load_stage(config: RunConfig, loaded: LoadedModel | None, cache_dir: Path, progress: bool,
               partial: bool = False, device: str | None = None) -> LoadedModel:
    """The model (loaded here unless given) and its checks. With `partial` (train) only the blocks the run
    needs are loaded: up to its deepest probed layer, unless a baseline needs the last one (see
    blocks_needed); the layers are checked against the model's depth before any weight is read."""
    quiet = not progress
    if loaded is None:
        say(f"Loading model {config.model} ...", quiet)
        loaded = load_model(config.model, config.dtype, device or config.device, cache_dir, progress=progress,
                            blocks=blocks_needed(config) if partial else None, device_map=config.device_map,
                            load_in=config.load_in)
        if loaded.partial:
            loaded.load_note = f"{loaded.load_note}: {_partial_reason(config, loaded.num_layers)}"
    say(f"Model {loaded.name}: {loaded.num_layers} layers, width {loaded.hidden_size}, {dtype_name(loaded.dtype)} on "
        f"{loaded.placement.input}", quiet)
    if loaded.partial:
        say(f"Loaded {loaded.load_note}", quiet)
    if loaded.dtype == torch.float16:
        log.warning("float16 overflows in some models (Gemma 3 among them); bad batches will be skipped")
    if loaded.max_positions and config.context_length > loaded.max_positions:
        raise TokenprobeError(
            f"--context-length {config.context_length} exceeds this model's limit of {loaded.max_positions} positions"
        )
    return loaded


def needs_last_layer(config: RunConfig) -> bool:
    """Whether a run's baselines need the model's last layer: the model's own prediction does, and it is
    computed only where the task is the next token (as plan_stage decides, from the config alone)."""
    return "model" in config.baseline_kinds() and task_offset(config.task) == 1 and config.span_labels is None


def blocks_needed(config: RunConfig) -> Callable[[int], int | None]:
    """For load_model: given the model's depth, how many blocks the run needs (None: all of them). Raises
    the --layers error for a layer beyond the model before any weight is loaded."""
    def needed(num_layers: int) -> int | None:
        layers = parse_layers(config.layers, num_layers)
        if needs_last_layer(config):
            return None
        return max(1, max(layers))  # layer L is the output of block L-1; layer 0 hooks block 0's input

    return needed


def _partial_reason(config: RunConfig, num_layers: int) -> str:
    """Why load_stage loaded only some blocks, for the status line and the run record."""
    deepest = max(parse_layers(config.layers, num_layers))
    kinds = config.baseline_kinds()
    without = ("--no-baselines" if not kinds else f"--baselines {config.baselines}" if "model" not in kinds else
               f"--task {config.task}" + (" and span labels" if config.span_labels else ""))
    return (f"the deepest probed layer is {deepest}" + (" (block 0 is loaded for its input)" if deepest == 0 else "")
            + f", and with {without} no baseline needs the model's own prediction from its last layer")


def plan_stage(config: RunConfig, loaded: LoadedModel, prepared: Prepared, layers: list[int], cache_dir: Path,
               timings: dict[str, float], quiet: bool, world: World | None = None) -> ExtractionPlan:
    """The layers to extract, the baselines computed, the batch size (``auto`` probed here), and the resume
    checkpoint. In a distributed run rank 0 decides the batch size and the others take it."""
    world = world or World()
    # The model's own prediction (a baseline) needs the last layer's residual even when it is not probed.
    # The baselines predict the next token: for other tasks they would answer another question.
    asked = config.baseline_kinds()
    baselines = asked if prepared.labeler.predicts_next_token else ()
    skipped = None
    if asked and not baselines:
        skipped = "they predict the next token, " + (
            "and --task current asks about this one" if prepared.target is not None and config.task == "current"
            else f"and this run asks: {prepared.labeler.question} ...?")
        say(f"Baselines skipped: {skipped}", quiet)
    extract_layers = sorted({*layers, loaded.num_layers}) if "model" in baselines else layers
    if extract_layers != layers:
        say(f"Baselines: also extracting layer {loaded.num_layers} for the model's own prediction", quiet)
    if max(extract_layers) > loaded.loaded_blocks:
        raise TokenprobeError(
            f"layer {max(extract_layers)} is needed but this model holds only blocks 0-{loaded.loaded_blocks - 1} of "
            f"{loaded.num_layers} ({loaded.load_note or 'loaded with blocks='}); load it whole, or probe no deeper"
            + ("" if "model" not in baselines else " and pass --baselines lens,stats"))
    positions = prepared.positions
    checkpoint = CheckpointSink.for_run(cache_dir, loaded, prepared.chunks, positions, extract_layers)
    keys = world.gather(checkpoint.folder.name)
    if any(key != keys[0] for key in keys):  # every rank raises, so none waits for another
        differ = [rank for rank, key in enumerate(keys) if key != keys[0]]
        raise TokenprobeError(
            f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} would compute other activations than "
            f"rank 0 (the model's weights or tokenizer, the dtype, the device type or the data differ; this rank's: "
            f"{json.dumps({k: v for k, v in checkpoint.ingredients.items() if k != 'layers'}, sort_keys=True)[:300]}); "
            "give every rank the same model files, corpus and --dtype")
    batch_size = config.batch_size
    if world.main:
        if batch_size == "auto" and checkpoint.resumable_batch_size():
            batch_size = checkpoint.resumable_batch_size()  # what the interrupted run chose, so its batches count
        if batch_size == "auto":
            from tokenprobe.extract.batch_size import choose_batch_size

            t = time.perf_counter()
            # A rank runs its share of the chunks, beside the other ranks of its node.
            share = -(-len(np.unique(positions.chunk)) // world.size)
            batch_size, why = choose_batch_size(loaded, prepared.chunks, share, extract_layers,
                                                processes=world.local_size)
            timings["batch_size_probe_s"] = time.perf_counter() - t
            say(f"--batch-size auto: {batch_size} ({why})", quiet)
        if checkpoint.completed(batch_size):
            say(f"Resuming: {checkpoint.completed(batch_size)} batches were already extracted by an "
                f"interrupted run ({checkpoint.folder})", quiet)
        if world.distributed:
            clear_statuses(checkpoint.folder)  # an earlier run's ranks, before this run's write theirs
    batch_size = world.broadcast(batch_size)
    return ExtractionPlan(layers=extract_layers, baselines=baselines, batch_size=batch_size,
                          checkpoint=checkpoint, baselines_skipped=skipped)


def extract_stage(loaded: LoadedModel, prepared: Prepared, planned: ExtractionPlan, progress: bool,
                  store: bool = False, peers: Peers | None = None) -> tuple[MemorySink | StoreSource, ExtractionStats]:
    """One forward pass per batch into the checkpoint (read back where a run was interrupted) and, unless
    `store`, into memory. With `store` the checkpoint's shards are the activation store and the source
    reads them one layer at a time (train); without it every layer stays in memory (scan, eval).

    With `peers` (a distributed run, `store` only) this rank runs its share; rank 0 waits for the others'
    and its source reads the union. A rank that fails says so to the others (its status file) first."""
    positions = prepared.positions
    plan = RunPlan.of(positions)
    try:
        if store:
            usable = KeepSink(len(positions))
            stats = extract(loaded, prepared.chunks, plan, positions.position, planned.layers,
                            planned.batch_size, [usable, planned.checkpoint], resume=planned.checkpoint,
                            progress=progress, peers=peers)
            keep = usable.keep
            if peers is not None and peers.world.main:  # every rank's batches: from the shards' headers
                keep = keep_of_shards(planned.checkpoint.folder, plan, stats.batch_size, len(positions))
            source = StoreSource(planned.checkpoint.folder, plan, stats.batch_size, planned.layers,
                                 len(positions), loaded.hidden_size, _stored_dtype(loaded.dtype), keep)
        else:
            source, stats = extract_positions(loaded, prepared.chunks, positions, planned.layers,
                                              planned.batch_size, planned.checkpoint, progress)
    except BaseException as exc:
        if peers is None:
            if isinstance(exc, TokenprobeError):
                planned.checkpoint.remove()  # a rerun would only meet the same error
            raise
        replacement = _rank_failed(peers, exc)  # the others hear of it; the shared store stays for a rerun
        if replacement is exc:
            raise
        raise replacement from None
    if stats.bad_batches and peers is None:  # a distributed run's rank 0 says it for every rank (train)
        log.warning(f"skipped {stats.bad_batches} of {stats.batches} batches with NaN/Inf hidden states")
    return source, stats


def start_peers(world: World, planned: ExtractionPlan, prepared: Prepared) -> Peers:
    """This rank's status file and heartbeat in the shared store; once every rank has one, rank 0 checks it
    sees them all (the store is where the ranks' activations meet)."""
    log = Path(world.log_dir) / f"rank{world.rank}.log" if world.log_dir and not world.main else None
    peers = Peers(planned.checkpoint.folder, world, RunPlan.of(prepared.positions), planned.batch_size, log).start()
    world.barrier()
    if world.main:
        peers.check_visible()
    return peers


def _rank_failed(peers: Peers, exc: BaseException) -> BaseException:
    """What a rank does when its share fails: tells the others through its status file; rank 0 turns a stop
    caused by another rank (the launcher's SIGTERM after that rank died) into an error naming it. The
    error (or exception) to raise is returned."""
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or the launcher stopping this rank after another failed
        statuses = peers.statuses()
        problem = peers.trouble(statuses)
        peers.fail("interrupted", status="stopped")
        if peers.world.main and problem is not None:
            return TokenprobeError(peers.stopped_because(problem, peers.resumable(statuses)))
        return exc
    if isinstance(exc, TokenprobeError):
        message = str(exc)
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"unexpected {type(exc).__name__}{': ' + first if first else ''}"
    # A rank's own error (out of memory, NaN, another rank's failure it stops for) would meet a rerun again, or
    # is already told; an unexpected one may not.
    peers.fail(message, resumable=not isinstance(exc, TokenprobeError))
    if not peers.world.main and "failed:" not in message:
        print(f"tokenprobe: error: {message}", file=sys.stderr, flush=True)  # in this rank's log, whatever follows
        time.sleep(GRACE_S)  # so rank 0 names this rank before the launcher stops everyone
    return exc


def rank_record(world: World, stats: ExtractionStats) -> dict[str, Any]:
    """What one rank's share did, for rank 0's run record."""
    seconds = stats.share_seconds or stats.seconds
    return {**stats.record(), "seconds": seconds, "threads": torch.get_num_threads(),
            "tokens_per_second": stats.tokens / seconds if seconds else float("nan")}


def merge_ranks(world: World, own: ExtractionStats, peers: Peers) -> tuple[ExtractionStats, dict[str, Any]]:
    """Rank 0's extraction figures for the whole run (every rank's batches and tokens; the rate over rank 0's
    wall time, from its first batch to the last rank's last), and the record's `distributed` block. A rank lost
    after its last batch (no figures of its own) is counted from the plan: its batches and their tokens."""
    total = ExtractionStats(batch_size=own.batch_size, seconds=own.seconds)
    ranks = []
    for rank in range(world.size):
        status = peers.final.get(rank, {})
        share = rank_record(world, own) if rank == world.rank else status.get("extraction") or peers.share_of(rank)
        for name in ("batches", "bad_batches", "resumed_batches", "tokens", "resumed_tokens"):
            setattr(total, name, getattr(total, name) + int(share.get(name, 0)))
        for layer, n in (share.get("bad_layers") or {}).items():
            total.bad_layers[int(layer)] = total.bad_layers.get(int(layer), 0) + int(n)
        ranks.append({"rank": rank, "host": status.get("host", platform.node()) if rank else platform.node(),
                      **{k: share.get(k) for k in ("batches", "resumed_batches", "tokens", "seconds",
                                                   "tokens_per_second", "threads")}})
    total.bad_layers = dict(sorted(total.bad_layers.items()))
    return total, {**world.record(), "ranks": ranks, "logs": "logs/" if world.log_dir else None}


def fit_threads() -> int:
    """One thread per physical core this process may use, as torch takes by default in one process (two
    hyperthreads of a core count once); every CPU it may use where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add(siblings)
    return max(1, len(cores))


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.float32


def fit_stage(config: RunConfig, positions: PositionSet, tokens: np.ndarray, source: ActivationSource,
              layers: list[int], device: torch.device, progress: bool, timings: dict[str, float]) -> Fitted:
    """Each family's probe of each probed layer (not the extra baseline layer) on the usable training
    positions; with the control task the same again on the control labels (`tokens`: the token at each
    position); with --mdl, each one's online-code description length."""
    train_rows = torch.from_numpy(np.flatnonzero(positions.mask(TRAIN) & source.keep))
    train_labels = torch.from_numpy(positions.label)[train_rows]
    groups = torch.from_numpy(positions.chunk)[train_rows]
    pos_weight = pos_weight_for(train_labels, config.pos_weight_cap)
    # Each probed layer, read when a fit reaches it: the training rows are gathered one layer at a time.
    views = LayerViews(source, layers)
    common = dict(rows=train_rows, groups=groups, seed=config.seed, config=config, device=device, progress=progress)
    t = time.perf_counter()
    probes = {family: dict(zip(layers, fit_family(family, views, train_labels, pos_weight=pos_weight, **common)))
              for family in config.probe_families()}
    timings["train_probes_s"] = time.perf_counter() - t
    fitted = Fitted(probes=probes, pos_weight=pos_weight)
    if config.control_task:
        t = time.perf_counter()
        rate = float(train_labels.float().mean())
        fitted.control_task = ControlTask(rate=rate, seed=config.seed)
        fitted.control_labels = fitted.control_task.labels_of(tokens)
        control_train = torch.from_numpy(fitted.control_labels)[train_rows]
        control_weight = pos_weight_for(control_train, config.pos_weight_cap)
        fitted.control = {family: dict(zip(layers, fit_control(family, views, control_train, list(by_layer.values()),
                                                                 pos_weight=control_weight, **common)))
                          for family, by_layer in probes.items()}
        timings["control_task_s"] = time.perf_counter() - t
    if config.mdl:
        t = time.perf_counter()
        fitted.mdl = {}
        with tqdm(total=len(layers) * len(probes), desc="Description length (online code)", unit="probe",
                  disable=not progress, dynamic_ncols=True) as bar:
            for layer, view in zip(layers, views):
                x = view[train_rows.to(view.device)].to(device, torch.float32)
                for family in probes:
                    fitted.mdl[(family, layer)] = description_length(family, x, train_labels, groups=groups,
                                                                     seed=config.seed, config=config)
                    bar.update(1)
                del x
        timings["mdl_s"] = time.perf_counter() - t
    return fitted


def record_stage(config: RunConfig, loaded: LoadedModel, prepared: Prepared, layers: list[int],
                 stats: ExtractionStats, pos_weight: float, timings: dict[str, float],
                 scored: RunEvaluation) -> dict[str, Any]:
    """The run record (run.json): what was asked, what was resolved, what it cost."""
    return {
        "config": config.to_dict(),
        "sweep_name": sweep_name(config, loaded.name),
        "model": {"name": loaded.name, "source": loaded.source, "weights_hash": loaded.weights_hash,
                  "tokenizer_hash": loaded.tokenizer_hash, "architecture": type(loaded.model).__name__,
                  "num_layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
                  "loaded_blocks": loaded.loaded_blocks, **({"loaded": loaded.load_note} if loaded.partial else {}),
                  # of what was loaded (fewer blocks when only early layers are probed)
                  "parameters": sum(p.numel() for p in loaded.model.parameters()),
                  "parameter_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters())},
        "layers": layers,
        "dtype": dtype_name(loaded.dtype),
        "device": str(loaded.placement.input),
        "target": target_record(prepared),
        "corpus": prepared.corpus_record(),
        "positions": prepared.positions.counts(),
        "pos_weight": pos_weight,
        "extraction": stats.record(),
        "timings": timings,
        "baselines": scored.info,
        "intervals": {"level": 0.95, "resamples": config.bootstrap, "unit": "held-out chunks"},
        "versions": {"tokenprobe": _version(), "torch": torch.__version__, "transformers": _transformers_version(),
                     "python": platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class ProbeSubject:
    """What a run's probes are about, as their files name it: the model (display name and identity) and
    the target (name and token ids)."""

    model_name: str
    model: ModelIdentity
    target: str
    target_ids: list[int]

    @classmethod
    def of(cls, loaded: LoadedModel, prepared: Prepared) -> ProbeSubject:
        return cls(loaded.name, ModelIdentity.of(loaded), target_name(prepared), target_ids(prepared))


def layer_results(config: RunConfig, subject: ProbeSubject, record: dict[str, Any], probes: dict[int, Probe],
                  scored: RunEvaluation, save: bool, describe: bool = True) -> list[LayerResult]:
    """Each layer's results, and (with `describe`) each probe's metadata (which refers to the run record);
    `tokenprobe eval` keeps the saved probes' own metadata."""
    results = []
    for layer, probe in probes.items():
        metrics = scored.probe_metrics(layer)
        name = run_name(config, layer, subject.model_name)
        if describe:
            probe.meta = ProbeMeta(
                kind=probe.kind, layer=layer, task=config.task, target=subject.target,
                target_ids=subject.target_ids, model=subject.model,
                context_length=config.context_length, dtype=record["dtype"], run_name=name,
                tokenprobe_version=_version(), fit=probe.fit_info, metrics={k: m.to_dict() for k, m in metrics.items()},
                config=record["config"], corpus={k: record["corpus"][k] for k in ("name", "sha256")},
                sweep_name=record["sweep_name"], created=record["created"])
        results.append(LayerResult(layer=layer, run_name=name, probe_file=f"probes/layer{layer:02d}.safetensors"
                                   if save else None, metrics=metrics, l2=probe.fit_info.get("l2"),
                                   **scored.layer_fields(layer)))
    return results


def write_run(staging: Path, record: dict[str, Any], results: list[LayerResult], probes: dict[int, Probe],
              others: dict[str, Probe], scored: RunEvaluation, families: FamilyEvaluation | None) -> None:
    """A trained run into its staging folder: every probe file (the primary family's by layer, the others by
    file name), then its figures (write_outputs)."""
    (staging / "probes").mkdir()
    for r in results:
        probes[r.layer].save(staging / r.probe_file)
    for file, probe in others.items():
        probe.save(staging / file)
    write_outputs(staging, record, results, scored, families)


def write_outputs(staging: Path, record: dict[str, Any], results: list[LayerResult], scored: RunEvaluation,
                  families: FamilyEvaluation | None, extra: dict[str, Any] | None = None) -> None:
    """A run's figures into its staging folder: results.json/.csv (with the comparisons, the families and
    `extra`), report.md and plot.png drawn from them, and the run record (run.json), last."""
    blocks: dict[str, Any] = {"comparisons": scored.comparisons}
    if families is not None:
        blocks["families"] = families.to_dict()
    write_results(staging, record, results, scored.baselines, {**blocks, **(extra or {})})
    write_report(staging)
    write_json(staging / RUN_RECORD, record)


def target_name(prepared: Prepared) -> str:
    """What the probes predict, in a probe file's `target`: the token (" the"), the set ("' the' | ' The'"),
    or the span labels ("regex:\\d+", "spans:names.jsonl")."""
    if prepared.target is None:
        return prepared.labeler.spec.split(" ")[-1]
    return prepared.target.targets[0].text if len(prepared.target.targets) == 1 else prepared.target.text


def target_ids(prepared: Prepared) -> list[int]:
    return list(prepared.target.token_ids) if prepared.target is not None else []


def target_record(prepared: Prepared) -> dict[str, Any]:
    """The run record's `target`: one token as {text, token_id, token}; a set adds every id and token;
    span labels say where the labels come from and how many tokens they mark."""
    if prepared.target is None:
        base = getattr(prepared.labeler, "base", prepared.labeler)
        return {"text": target_name(prepared), "labels": base.record(), "question": prepared.labeler.question}
    first = prepared.target.targets[0]
    out = {"text": target_name(prepared), "token_id": first.token_id, "token": first.token}
    if len(prepared.target.targets) > 1:
        out.update(token_ids=[t.token_id for t in prepared.target.targets],
                   tokens=[t.token for t in prepared.target.targets])
    return out


def family_files(config: RunConfig, subject: ProbeSubject, record: dict[str, Any], fitted: Fitted,
                 families: FamilyEvaluation | None, save: bool) -> dict[str, Probe]:
    """The other families' probes with their metadata, by file (``probes/<family>-layerNN.safetensors``);
    their results in `families` point to those files. Control-task probes are not kept."""
    files: dict[str, Probe] = {}
    primary = next(iter(fitted.probes))
    for family, by_layer in fitted.probes.items():
        for layer, probe in by_layer.items():
            if family == primary:
                file = f"probes/layer{layer:02d}.safetensors"
            else:
                file = f"probes/{family}-layer{layer:02d}.safetensors"
                metrics = families.of(family, layer).metrics if families is not None else {}
                probe.meta = ProbeMeta(
                    kind=probe.kind, layer=layer, task=config.task, target=subject.target,
                    target_ids=subject.target_ids, model=subject.model,
                    context_length=config.context_length, dtype=record["dtype"],
                    run_name=run_name(config, layer, subject.model_name).replace("probe-", f"probe-{family}-", 1),
                    tokenprobe_version=_version(), fit=probe.fit_info,
                    metrics={k: m.to_dict() for k, m in metrics.items()}, config=record["config"],
                    corpus={k: record["corpus"][k] for k in ("name", "sha256")}, sweep_name=record["sweep_name"],
                    created=record["created"])
                files[file] = probe
            if families is not None and save:
                families.of(family, layer).probe_file = file
    return files


def _fit_summary(config: RunConfig, family: str, probes: list[Probe]) -> str | None:
    """One status line on how a family's probes were fitted (its penalties, kept dimensions, epochs)."""
    info = [p.fit_info for p in probes]
    if family == "linear":
        return (f"L2 penalty {'chosen per layer on a fifth of the training chunks: ' if config.l2 == 'auto' else ''}"
                f"{_span([i['l2'] for i in info])} ({info[0]['l2_method']})")
    if family == "sparse":
        return (f"Sparse probes: L1 penalty {_span([i['l1'] for i in info])}, keeping "
                f"{_span([i['kept'] for i in info])} of {probes[0].weight.shape[-1]} dimensions")
    if family == "mlp":
        return (f"MLP probes (width {config.mlp_width}): best epoch {_span([i['best_epoch'] for i in info])}; "
                f"{info[0]['stopping']}")
    return None


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g} to {high:g} (median {float(np.median(values)):g})"


def _version() -> str:
    from tokenprobe import __version__

    return __version__


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
