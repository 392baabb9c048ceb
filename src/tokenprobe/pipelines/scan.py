"""`scan`: one linear probe per target token at every requested layer, from ONE forward pass.

prepare chunks -> choose targets -> sample the shared pool and each target's positions -> extract the
pool once -> per target: fit and score exactly as `train` does on that target's positions (the same
functions, on a view of the pool's rows) -> scan.json, scan.csv, heatmap, report.md, probe files.

The only departures from `train`, both for cost: ``--l2 auto`` chooses one penalty per target (at the
middle probed layer, as `train` chooses it there, then used at every layer), and the model's own
probability, which needs a softmax over the whole vocabulary, is computed once per position for every
target at once, its threshold chosen on at most `THRESHOLD_POSITIONS` training positions per target.
With a fixed ``--l2``, a target's probes and figures are those of ``train --target`` on its positions.
"""

from __future__ import annotations

import datetime
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.analysis.baselines import model_rows
from tokenprobe.analysis.scoring import RunEvaluation, score_run
from tokenprobe.config import RunConfig, data_label, parse_layers, slug, task_label
from tokenprobe.data.labels import Target, TargetSet, TokenLabeler, parse_task
from tokenprobe.data.positions import MIN_POSITIVES
from tokenprobe.data.prepare import Prepared, prepare_chunks
from tokenprobe.data.scan import (ScanPositions, TargetPositions, future_tokens, read_targets_file, resolve_scan_targets,
                                  sample_scan_positions, top_tokens)
from tokenprobe.device import dtype_name
from tokenprobe.distributed import refuse_distributed
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.sinks import ActivationSource
from tokenprobe.files import default_cache_dir, write_json
from tokenprobe.models.loading import LoadedModel
from tokenprobe.models.surgery import Unembedding
from tokenprobe.pipelines.run_dir import RUN_RECORD, RunDir
from tokenprobe.pipelines.train import extract_stage, load_stage, plan_stage, say
from tokenprobe.probes.base import ModelIdentity, ProbeMeta
from tokenprobe.probes.linear import LinearProbe, fit_linear_probes, pos_weight_for
from tokenprobe.vocabulary import EVAL, MODEL, TOKEN_STATS, TRAIN, baseline_key, lens_key, probe_key

log = logging.getLogger(__name__)

SCAN_RESULTS = "scan.json"
THRESHOLD_POSITIONS = 32  # training positions per target where the model's full softmax picks its threshold
SCAN_DEFAULTS = {"train_positions": 10_000, "eval_positions": 1_500}  # the shared natural samples


@dataclass
class ScanOptions:
    """What `scan` adds to a run's options: which targets, and how many positives each gets."""

    top: int | None = 100  # the most frequent tokens of the training chunks (unless texts or ids are given)
    targets_file: str | None = None
    target_ids: list[int] | None = None
    positives: int = 500  # training positives per target at most; held-out ones a quarter of that

    def validate(self) -> None:
        if self.top is not None and self.top < 1:
            raise TokenprobeError(f"--top must be at least 1, got {self.top}")
        if self.positives < MIN_POSITIVES[TRAIN]:
            raise TokenprobeError(f"--positives must be at least {MIN_POSITIVES[TRAIN]}, got {self.positives}")
        if self.targets_file is not None:
            read_targets_file(Path(self.targets_file))

    def texts(self) -> list[str]:
        return read_targets_file(Path(self.targets_file)) if self.targets_file is not None else []

    def chosen_by_frequency(self) -> bool:
        return self.targets_file is None and not self.target_ids

    def to_dict(self) -> dict[str, Any]:
        return {"top": self.top if self.chosen_by_frequency() else None, "targets_file": self.targets_file,
                "scan_target_ids": self.target_ids, "positives": self.positives}


@dataclass
class ScanResult:
    record: dict[str, Any]
    scan: dict[str, Any]  # what scan.json holds
    probes: dict[int, dict[int, LinearProbe]]  # token id -> layer -> probe
    out_dir: Path | None

    def table(self, rows: int = 10) -> str:
        """The most and least predictable targets (best-layer balanced accuracy), as text."""
        from tokenprobe.report.scan import ranking

        ranked = ranking(self.scan)
        lines = [f"{'#':>3}  {'target':<16} {'freq':>6}  {'best':>4}  {'bal.acc':>7}  {'AUROC':>6}  {'of model':>8}"]

        def line(i: int, t: dict[str, Any]) -> str:
            best = t["best"]
            frac = best.get("auroc_fraction_of_model")
            return (f"{i:>3}  {repr(t['text'])[:16]:<16} {100 * t['frequency']:>5.2f}%  {t['best_layer']:>4}  "
                    f"{best['balanced_accuracy']:>7.3f}  {best['auroc']:>6.3f}  "
                    f"{'n/a' if frac is None else f'{frac:.3f}':>8}")
        shown = list(enumerate(ranked, 1))
        if len(shown) > 2 * rows:
            shown = shown[:rows] + [None] + shown[-rows:]
        lines += ["  ..." if item is None else line(*item) for item in shown]
        return "\n".join(lines)


class RowView:
    """An ActivationSource of some rows of another (a target's positions in the scan's pool), each
    layer gathered once on first use."""

    def __init__(self, source: ActivationSource, rows: np.ndarray):
        self.source, self.rows = source, torch.from_numpy(rows)
        self.layers = list(source.layers)
        self.keep = source.keep[rows]
        self._gathered: dict[int, torch.Tensor] = {}

    def layer(self, layer: int) -> torch.Tensor:
        if layer not in self._gathered:
            x = self.source.layer(layer)
            self._gathered[layer] = x.index_select(0, self.rows.to(x.device))
        return self._gathered[layer]


def scan_name(config: RunConfig, options: ScanOptions, model_name: str, count: int) -> str:
    what = f"top{options.top}" if options.chosen_by_frequency() else f"{count}targets"
    return f"scan-{what}-ctx{config.context_length}-{data_label(config)}-{task_label(config)}-{slug(model_name)}"


def check_scan_config(config: RunConfig, options: ScanOptions) -> None:
    """Errors that need no model, found before it loads."""
    refuse_distributed("`scan`")
    config.validate()
    options.validate()
    parse_task(config.task)  # span labels are not a scan's business: a token task only


def scan(
    config: RunConfig | None = None,
    options: ScanOptions | None = None,
    *,
    out_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    save: bool = True,
    progress: bool = True,
) -> ScanResult:
    """Probes for many target tokens at every requested layer from one forward pass (see the module)."""
    config = config or RunConfig()
    options = options or ScanOptions()
    check_scan_config(config, options)
    quiet = not progress
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    run_dir = RunDir(out_dir, overwrite) if save else None
    timings: dict[str, float] = {}
    started = time.perf_counter()

    loaded = load_stage(config, loaded, cache_dir, progress)
    timings["load_model_s"] = time.perf_counter() - started
    layers = parse_layers(config.layers, loaded.num_layers)

    t = time.perf_counter()
    targets, positions, pool = positions_stage(config, options, loaded, cache_dir, progress)
    timings["positions_s"] = time.perf_counter() - t
    say(f"Layers {','.join(map(str, layers))}: one forward pass per batch, stopping after layer {max(layers)}", quiet)
    planned = plan_stage(config, loaded, pool, layers, cache_dir, timings, quiet)
    source, stats = extract_stage(loaded, pool, planned, progress)
    timings["forward_s"] = stats.seconds

    probability = None
    if "model" in planned.baselines:
        t = time.perf_counter()
        probability = OwnProbability.compute(loaded, pool, source, targets, positions, config.seed, progress)
        timings["model_probability_s"] = time.perf_counter() - t

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = scan_record(config, options, loaded, pool, layers, stats, timings, positions, targets, created)
    t = time.perf_counter()
    entries, probes = targets_stage(config, loaded, record, pool, source, targets, positions, layers,
                                    planned.baselines, probability, timings, progress)
    timings["fit_and_score_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    results = {"kind": "scan", "config": record["config"], "model": record["model"], "task": config.task,
               "question": pool.labeler.question, "layers": layers, "dtype": record["dtype"],
               "baselines": "model" in planned.baselines, "intervals": record["intervals"], "positions": record["positions"],
               "timings": timings, "targets": entries}
    if not planned.baselines and config.baseline_kinds():
        results["baselines_skipped"] = planned.baselines_skipped

    if run_dir is not None:
        from tokenprobe.report.scan import write_scan_outputs

        def write(staging: Path) -> None:
            (staging / "probes").mkdir()
            for target in targets:
                if target.token_id in probes:
                    folder = staging / "probes" / probe_folder(target)
                    folder.mkdir()
                    for layer, probe in probes[target.token_id].items():
                        probe.save(folder / f"layer{layer:02d}.safetensors")
            write_json(staging / SCAN_RESULTS, results)
            write_scan_outputs(staging, results)
            write_json(staging / RUN_RECORD, record)

        out_dir = run_dir.publish(Path("runs") / f"{record['sweep_name']}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
                                  write)
    planned.checkpoint.remove()
    return ScanResult(record=record, scan=results, probes=probes, out_dir=out_dir if save else None)


# ---------------------------------------------------------------------------------------------- stages


def positions_stage(config: RunConfig, options: ScanOptions, loaded: LoadedModel, cache_dir: Path,
                    progress: bool) -> tuple[list[Target], ScanPositions, Prepared]:
    """The targets, every target's positions, and the pool: the chunks and split (as `train`'s) with the
    union of every target's positions, a Prepared that extraction reads (its labeler only tells
    plan_stage the task; each target's own labels come from target_view)."""
    quiet = not progress
    prepared = prepare_chunks(config, loaded, cache_dir, progress)
    say(f"Corpus {prepared.corpus.name}: {len(prepared.corpus.documents):,} documents, {len(prepared.chunks):,} "
        f"chunks of {config.context_length} tokens {prepared.bos_note()}"
        f"{' (cached)' if prepared.chunks_from_cache else ''}", quiet)
    _, offset = parse_task(config.task)
    ahead, valid = future_tokens(prepared.chunks, offset, prepared.bos_id is not None)
    targets = choose_targets(options, loaded, ahead, prepared)
    say(f"Targets: {describe_targets(targets, options)}", quiet)
    positions = sample_scan_positions(ahead, valid, [t.token_id for t in targets], prepared.split,
                                      config.train_positions, config.eval_positions, options.positives, config.seed)
    failed = [(t, p.error) for t, p in zip(targets, positions.targets) if p.error]
    if len(failed) == len(targets):
        raise TokenprobeError(f"no target can be scanned: {failed[0][0].text!r} is {failed[0][1]}; use a larger "
                              "corpus (--max-tokens) or more frequent targets")
    for target, error in failed:
        log.warning(f"target {target.text!r} skipped: {error}")
    say(f"Positions: {len(positions.pool):,} in the pool (natural samples of {positions.natural[TRAIN]:,} training "
        f"and {positions.natural[EVAL]:,} held-out positions shared by every target, plus each target's "
        f"positives: at most {options.positives:,} training and {max(MIN_POSITIVES[EVAL], options.positives // 4):,} "
        f"held-out) from {len(np.unique(positions.pool.chunk)):,} chunks", quiet)
    pool = Prepared(config=config, corpus=prepared.corpus, chunks=prepared.chunks, bos_id=prepared.bos_id,
                    chunks_from_cache=prepared.chunks_from_cache, split=prepared.split,
                    labeler=TokenLabeler(tuple(t.token_id for t in targets), offset), valid=valid,
                    positions=positions.pool)
    return targets, positions, pool


def targets_stage(config: RunConfig, loaded: LoadedModel, record: dict[str, Any], pool: Prepared,
                  source: ActivationSource, targets: list[Target], positions: ScanPositions, layers: list[int],
                  baselines: tuple[str, ...], probability: OwnProbability | None, timings: dict[str, float],
                  progress: bool, workers: int | None = None) -> tuple[list[dict[str, Any]], dict[int, dict[int, LinearProbe]]]:
    """Each target fitted and scored on its positions: its scan.json entry, and its probes (with metadata).

    Targets are independent, and one target's work is many small operations that one core runs about as
    fast as two: on the CPU, `workers` targets (default: one per core torch uses) run at once, each on one
    thread, which takes about 0.6 of the time of one at a time on two threads. Each target's results do not
    depend on the others or on the order they finish in (beyond float rounding of the thread count: every
    operation of a target runs on one thread)."""
    threads = torch.get_num_threads()
    if workers is None:
        workers = threads if str(loaded.placement.probes).startswith("cpu") else 1
    workers = max(1, min(workers, len(targets)))

    def run(item: tuple[Target, TargetPositions]) -> TargetRun | None:
        target, where = item
        if where.error is not None:
            return None
        return target_run(config, loaded, pool, source, target, where, layers, baselines, probability)

    entries, probes = [], {}
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with tqdm(total=len(targets), desc=f"Fitting and scoring {len(targets)} targets", unit="target",
                  disable=not progress, dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenprobe-scan") as pool_of_threads:
            for index, (target, where, one) in enumerate(zip(targets, positions.targets,
                                                              pool_of_threads.map(run, zip(targets, positions.targets)))):
                entry = {"rank": index + 1, "text": target.text, "token_id": target.token_id, "token": target.token,
                         "frequency": where.frequency, "positions": where.counts(), "error": where.error}
                if one is not None:
                    for part, seconds in one.seconds.items():
                        timings[f"{part}_summed_s"] = timings.get(f"{part}_summed_s", 0.0) + seconds
                    entry.update(one.entry())
                    entry["probe_dir"] = f"probes/{probe_folder(target)}"
                    probes[target.token_id] = one.probes
                    for layer, probe in one.probes.items():
                        probe.meta = probe_meta(config, loaded, record, target, layer, probe, one.scored,
                                                record["created"])
                entries.append(entry)
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
    return entries, probes


# ------------------------------------------------------------------------------------------- targets


def choose_targets(options: ScanOptions, loaded: LoadedModel, ahead: np.ndarray, prepared: Prepared) -> list[Target]:
    tokenizer = loaded.tokenizer
    if not options.chosen_by_frequency():
        return resolve_scan_targets(tokenizer, options.texts(), options.target_ids or [])
    ids = top_tokens(ahead, prepared.split.train, options.top)
    if not ids:
        raise TokenprobeError("the training chunks hold no usable position; use a larger corpus or a larger "
                              "--context-length")
    return [frequent_target(tokenizer, i) for i in ids]


def frequent_target(tokenizer, token_id: int) -> Target:
    """A token found by frequency, named by what it decodes to; a byte of a multi-byte character (which
    decodes alone to U+FFFD, the same for every such byte) by the tokenizer's own spelling instead."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    text = tokenizer.decode([token_id])
    return Target(token if "\ufffd" in text else text, token_id, token)


def describe_targets(targets: list[Target], options: ScanOptions) -> str:
    shown = ", ".join(repr(t.text) for t in targets[:8]) + (", ..." if len(targets) > 8 else "")
    how = f"the {len(targets)} most frequent tokens of the training chunks" if options.chosen_by_frequency() \
        else f"{len(targets)} token{'s' if len(targets) != 1 else ''}"
    return f"{how}: {shown}"


def probe_folder(target: Target) -> str:
    return f"t{target.token_id:06d}"


# ------------------------------------------------------------------------------- the model's own view


@dataclass
class OwnProbability:
    """The model's own probability of every target at every pool row any target's baseline needs: one
    full-vocabulary softmax per row for all targets (Unembedding.each_probability)."""

    rows: np.ndarray  # sorted pool rows
    values: np.ndarray  # (rows, targets)
    column: dict[int, int]  # token id -> column

    @classmethod
    def compute(cls, loaded: LoadedModel, pool: Prepared, source: ActivationSource, targets: list[Target],
                positions: ScanPositions, seed: int, progress: bool) -> OwnProbability:
        needed = []
        for target, where in zip(targets, positions.targets):
            if where.error is None:
                # the rows train's baseline would use: they need the target's positions, not its labels
                rows, _, first = model_rows(where.position_set(pool.positions), source.keep[where.rows], seed,
                                            THRESHOLD_POSITIONS)
                needed.append(where.rows[rows[first]])
        rows = np.unique(np.concatenate(needed)) if needed else np.zeros(0, np.int64)
        ids = [t.token_id for t in targets]
        unembed = Unembedding.of(loaded.model)
        last = source.layer(loaded.num_layers)
        values, step = [], 512
        with tqdm(total=len(rows), desc="Model's own probabilities (full softmax)", unit="pos",
                  disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(rows), step):
                part = torch.from_numpy(rows[start:start + step])
                values.append(unembed.each_probability(last.index_select(0, part.to(last.device)), ids))
                bar.update(len(part))
        return cls(rows=rows, values=np.concatenate(values) if values else np.zeros((0, len(ids))),
                   column={t: j for j, t in enumerate(ids)})

    def of(self, token_id: int, pool_rows: np.ndarray):
        """model_probability for one target: its probabilities at a target's rows (given as pool rows)."""
        column = self.column[token_id]

        def probability(local_rows: np.ndarray) -> np.ndarray:
            return self.values[np.searchsorted(self.rows, pool_rows[local_rows]), column]
        return probability


# ---------------------------------------------------------------------------------------- one target


def target_view(pool: Prepared, target: Target, where: TargetPositions) -> Prepared:
    """The target's positions as an ordinary run's Prepared (labels and positions its own)."""
    labeler = TokenLabeler((target.token_id,), pool.labeler.offset)
    labels, valid = labeler.labels(pool.chunks, has_bos=pool.bos_id is not None)
    return Prepared(config=pool.config, corpus=pool.corpus, chunks=pool.chunks, bos_id=pool.bos_id,
                    chunks_from_cache=pool.chunks_from_cache, split=pool.split, target=TargetSet((target,)),
                    labeler=labeler, labels=labels, valid=valid, positions=where.position_set(pool.positions))


@dataclass
class TargetRun:
    layers: list[int]
    probes: dict[int, LinearProbe]
    scored: RunEvaluation
    baselines: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        """The target's figures in scan.json (see report/scan.py for the schema)."""
        ev, summary = self.scored.evaluation, self.scored.comparisons

        def figures(key, with_fraction: bool = False) -> dict[str, Any] | None:
            metrics = ev.metrics.get(key, {}).get(EVAL)
            if metrics is None:
                return None
            intervals = ev.intervals(key, EVAL)
            out = {"balanced_accuracy": metrics.balanced_accuracy,
                   "balanced_accuracy_ci": list(intervals.get("balanced_accuracy", (None, None))),
                   "auroc": metrics.auroc, "auroc_ci": list(intervals.get("auroc", (None, None)))}
            if with_fraction:
                model = baseline_key(MODEL)
                fraction = ev.ratio(key, model, EVAL) if model in ev.metrics else (None, None, None)
                out["auroc_fraction_of_model"] = fraction[0]
                out["auroc_fraction_of_model_ci"] = [fraction[1], fraction[2]]
            return out

        rows = []
        for layer in self.layers:
            row = {"layer": layer, **figures(probe_key(layer), with_fraction=True),
                   "l2": self.probes[layer].fit_info.get("l2")}
            lens = ev.metrics.get(lens_key(layer), {}).get(EVAL)
            row["logit_lens_auroc"] = lens.auroc if lens is not None else None
            rows.append(row)
        best = summary["balanced_accuracy"]["best_layer"]
        ties = sorted(summary["balanced_accuracy"]["indistinguishable_from_best"])
        gap = None
        if baseline_key(MODEL) in ev.metrics:
            d = ev.difference(baseline_key(MODEL), probe_key(best), EVAL, "auroc")
            gap = {"auroc": d.difference, "low": d.low, "high": d.high}
        return {"layers": rows, "model": figures(baseline_key(MODEL)), "token_stats": figures(baseline_key(TOKEN_STATS)),
                "best_layer": best, "first_layer_like_best": min([best, *ties]),
                "indistinguishable_from_best": ties, "best": figures(probe_key(best), with_fraction=True),
                "gap_to_model": gap}


def target_run(config: RunConfig, loaded: LoadedModel, pool: Prepared, source: ActivationSource, target: Target,
               where: TargetPositions, layers: list[int], baselines: tuple[str, ...],
               probability: OwnProbability | None) -> TargetRun:
    """One target's probes (fitted as `train` fits them, see fit_target) and figures (score_run itself)."""
    view = target_view(pool, target, where)
    rows = RowView(source, where.rows)
    t = time.perf_counter()
    probes = fit_target(config, loaded, view, rows, layers)
    fitted = time.perf_counter()
    options: dict[str, Any] = {}
    if baselines and probability is not None:
        options = {"model_probability": probability.of(target.token_id, where.rows),
                   "threshold_positions": THRESHOLD_POSITIONS}
    # Held-out figures only: a scan reports no training-set figures, and they cost as much again.
    scored = score_run(loaded, view, rows, probes, baselines, config.bootstrap, config.seed, sets=(EVAL,), **options)
    return TargetRun(layers=layers, probes=probes, scored=scored, baselines=bool(baselines),
                     seconds={"fit": fitted - t, "score": time.perf_counter() - fitted})


def fit_target(config: RunConfig, loaded: LoadedModel, view: Prepared, source: ActivationSource,
               layers: list[int]) -> dict[int, LinearProbe]:
    """`train`'s linear probes on the target's training rows; with ``--l2 auto`` the penalty is chosen
    once, at the middle probed layer (as train's chooser does there), and used at every layer."""
    positions = view.positions
    train_rows = torch.from_numpy(np.flatnonzero(positions.mask(TRAIN) & source.keep))
    y = torch.from_numpy(positions.label)[train_rows]
    groups = torch.from_numpy(positions.chunk)[train_rows]
    common = dict(rows=train_rows, groups=groups, seed=config.seed, pos_weight=pos_weight_for(y, config.pos_weight_cap),
                  max_iter=config.max_iter, device=loaded.placement.probes, progress=False)
    views = [source.layer(layer) for layer in layers]
    if config.l2 != "auto":
        return dict(zip(layers, fit_linear_probes(views, y, l2=config.l2, **common)))
    middle = layers[len(layers) // 2]
    chosen = fit_linear_probes([source.layer(middle)], y, l2="auto", **common)[0].fit_info
    probes = fit_linear_probes(views, y, l2=chosen["l2"], **common)
    info = {"l2": chosen["l2"], "l2_method": f"chosen at layer {middle} for every layer: {chosen['l2_method']}",
            "l2_layer": middle}
    if "l2_path" in chosen:
        info["l2_path"] = chosen["l2_path"]
    for probe in probes:
        probe.fit_info = dict(info)
    return dict(zip(layers, probes))


# ------------------------------------------------------------------------------------------- records


def scan_record(config: RunConfig, options: ScanOptions, loaded: LoadedModel, prepared: Prepared, layers: list[int],
                stats, timings: dict[str, float], positions: ScanPositions, targets: list[Target],
                created: str) -> dict[str, Any]:
    from tokenprobe.pipelines.train import _transformers_version, _version

    import platform

    settings = {k: v for k, v in config.to_dict().items() if k not in SCAN_IGNORED}
    return {
        "kind": "scan",
        "config": {**settings, **options.to_dict()},
        "sweep_name": scan_name(config, options, loaded.name, len(targets)),
        "model": {"name": loaded.name, "source": loaded.source, "weights_hash": loaded.weights_hash,
                  "tokenizer_hash": loaded.tokenizer_hash, "architecture": type(loaded.model).__name__,
                  "num_layers": loaded.num_layers, "hidden_size": loaded.hidden_size},
        "layers": layers,
        "dtype": dtype_name(loaded.dtype),
        "device": str(loaded.placement.input),
        "targets": [{"text": t.text, "token_id": t.token_id, "token": t.token} for t in targets],
        "corpus": prepared.corpus_record(),
        "positions": {"pool": len(positions.pool), "train_natural": positions.natural[TRAIN],
                      "eval_natural": positions.natural[EVAL], "chunks": int(len(np.unique(positions.pool.chunk))),
                      "tokens": stats.tokens + stats.resumed_tokens},
        "extraction": stats.record(),
        "timings": timings,
        "intervals": {"level": 0.95, "resamples": config.bootstrap, "unit": "held-out chunks"},
        "versions": {"tokenprobe": _version(), "torch": torch.__version__, "transformers": _transformers_version(),
                     "python": platform.python_version()},
        "created": created,
    }


# RunConfig fields a scan does not use (its targets come from ScanOptions; one linear probe per target)
SCAN_IGNORED = ("target", "target_id", "labels", "label_regex", "probe", "mlp_width", "control", "mdl", "balance",
                "wandb", "wandb_project")


def probe_meta(config: RunConfig, loaded: LoadedModel, record: dict[str, Any], target: Target, layer: int,
               probe: LinearProbe, scored: RunEvaluation, created: str) -> ProbeMeta:
    metrics = scored.probe_metrics(layer)
    return ProbeMeta(
        kind=probe.kind, layer=layer, task=config.task, target=target.text, target_ids=[target.token_id],
        model=ModelIdentity.of(loaded), context_length=config.context_length, dtype=record["dtype"],
        run_name=f"probe-layer{layer}-t{target.token_id}-{record['sweep_name'].removeprefix('scan-')}",
        tokenprobe_version=record["versions"]["tokenprobe"], fit=probe.fit_info,
        metrics={k: m.to_dict() for k, m in metrics.items()}, config=record["config"],
        corpus={k: record["corpus"][k] for k in ("name", "sha256")}, sweep_name=record["sweep_name"],
        created=created, run_record="../../" + RUN_RECORD)
