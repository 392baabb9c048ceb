"""Every probe and every baseline scored on the same held-out positions, with intervals and comparisons.

The output is what results.json, the terminal table, the report and the WandB runs all show: per
layer the probe's metrics and the logit lens with 95% intervals, the probe's AUROC as a fraction of
the model's own, the run-level baselines, and paired bootstrap tests of the differences between
layers and between the best layer and each baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenprobe.analysis.baselines import DESCRIPTIONS, BaselineSet, baseline_kinds, compute_baselines
from tokenprobe.analysis.bootstrap import Evaluation, Scorer, evaluate, pairwise_differences
from tokenprobe.analysis.metrics import BaselineResult, BinaryMetrics, Intervals
from tokenprobe.data.prepare import Prepared
from tokenprobe.extract.sinks import ActivationSource
from tokenprobe.models.loading import LoadedModel
from tokenprobe.vocabulary import (
    COMPARED_METRICS,
    HELD_OUT,
    MAJORITY,
    MODEL,
    PRIMARY_SET,
    REPORTED_SETS,
    RUN_BASELINES,
    TOKEN_STATS,
    ScorerKey,
    baseline_key,
    best_index,
    lens_key,
    probe_key,
)


@dataclass
class RunEvaluation:
    evaluation: Evaluation
    layers: list[int]
    baselines: list[BaselineResult]
    comparisons: dict[str, Any]
    info: dict[str, Any]
    # Each baseline's scores over all positions and its threshold, by str(key): kept in the activation store
    baseline_scores: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)

    def probe_metrics(self, layer: int) -> dict[str, BinaryMetrics]:
        metrics = self.evaluation.metrics[probe_key(layer)]
        return {s: metrics[s] for s in REPORTED_SETS if s in metrics}

    def layer_fields(self, layer: int) -> dict[str, Any]:
        """Keyword arguments for LayerResult beyond the probe's own metrics."""
        ev, probe, lens, model = self.evaluation, probe_key(layer), lens_key(layer), baseline_key(MODEL)
        out: dict[str, Any] = {"intervals": {s: ev.intervals(probe, s) for s in REPORTED_SETS if s in ev.metrics[probe]}}
        if lens in ev.metrics:
            out["logit_lens"] = {s: m for s, m in ev.metrics[lens].items() if s in HELD_OUT}
            out["logit_lens_intervals"] = {s: ev.intervals(lens, s) for s in out["logit_lens"]}
        if model in ev.metrics:
            out["auroc_fraction_of_model"] = {s: ev.ratio(probe, model, s) for s in HELD_OUT
                                              if s in ev.metrics[model] and s in ev.metrics[probe]}
        return out


def _summary(ev: Evaluation, layers: list[int], baselines_on: bool) -> dict[str, Any]:
    keys = [probe_key(layer) for layer in layers]
    out: dict[str, Any] = {"set": PRIMARY_SET, "level": 0.95, "resamples": ev.resamples,
                           "unit": "held-out chunks", "chunks": ev.chunks.get(PRIMARY_SET)}
    for metric in COMPARED_METRICS:
        best = best_index([getattr(ev.metrics[k][PRIMARY_SET], metric) for k in keys])
        pairs = pairwise_differences(ev, keys, PRIMARY_SET, metric) if ev.resamples else []
        ties = [layers[i] for i in range(len(layers)) if i != best and ev.resamples
                and not ev.difference(keys[i], keys[best], PRIMARY_SET, metric).significant]
        entry: dict[str, Any] = {
            "best_layer": layers[best],
            "indistinguishable_from_best": ties,
            "pairs": [{**d.to_dict(), "a": d.a.layer, "b": d.b.layer} for d in pairs],
        }
        if baselines_on and ev.resamples:
            def versus(key: ScorerKey, others: list[ScorerKey]) -> dict[str, Any]:
                return {other.label: ev.difference(key, other, PRIMARY_SET, metric).to_dict() for other in others
                        if other in ev.metrics and PRIMARY_SET in ev.metrics[other]}

            run_level = [baseline_key(MODEL), baseline_key(TOKEN_STATS)]
            entry["best_minus_baselines"] = versus(keys[best], [*run_level, lens_key(layers[best]),
                                                                 baseline_key(MAJORITY)])
            entry["layer_minus_baselines"] = {layer: versus(key, [*run_level, lens_key(layer)])
                                              for layer, key in zip(layers, keys)}
        out[metric] = entry
    return out


def score_probes(probes: dict[int, Any], source: ActivationSource, n_positions: int,
                 key: Callable[[int], ScorerKey] = probe_key) -> dict[ScorerKey, Scorer]:
    """Every probe's probability at every usable position (NaN elsewhere), threshold 0.5; each under
    `key(layer)`."""
    scorers: dict[ScorerKey, Scorer] = {}
    rows = np.flatnonzero(source.keep)
    every = len(rows) == n_positions  # then no row needs to be gathered
    index = torch.from_numpy(rows)
    scratch = None  # one buffer for all layers: the standardised rows (or the gathered ones, standardised in place)
    for layer, probe in probes.items():
        scores = np.full(n_positions, np.nan)
        with torch.inference_mode():
            x = source.layer(layer)
            if scratch is None:
                scratch = torch.empty(len(rows), x.shape[-1], dtype=torch.float32, device=x.device)
            if not every and x.dtype == torch.float32:
                x = torch.index_select(x, 0, index.to(x.device), out=scratch)
            elif not every:
                x = x[index.to(x.device)]
            scores[rows] = probe.predict_proba(x, out=scratch).double().cpu().numpy()
        scorers[key(layer)] = Scorer(scores=scores, threshold=0.5)
    return scorers


def score_run(loaded: LoadedModel, prepared: Prepared, source: ActivationSource, probes: dict[int, Any],
              baselines: bool | Collection[str] = True, resamples: int = 1000, seed: int = 0,
              sets: tuple[str, ...] = REPORTED_SETS, made: BaselineSet | None = None,
              **baseline_options: Any) -> RunEvaluation:
    """Scores every probe and, with `baselines` (True: all; or the kinds ``--baselines`` names), every
    baseline at all positions, then evaluates them on
    each of `sets` with `resamples` chunk-bootstrap resamples. With baselines `source` must hold the last layer
    (or `baseline_options` give `model_probability`: see compute_baselines), unless `made` gives the
    baselines already scored (`tokenprobe fit` reads them from the activation store; then `loaded` is
    not used and `prepared` needs only its `positions`)."""
    positions, usable, layers = prepared.positions, source.keep, list(probes)
    scorers = score_probes(probes, source, len(positions))
    info: dict[str, Any] = {}
    if baselines:
        made = made or compute_baselines(loaded, prepared, source, layers, seed, kinds=baseline_kinds(baselines),
                                         **baseline_options)
        scorers.update(made.scorers)
        info = {**made.info, "thresholds": {key: s.threshold for key, s in made.scorers.items()}}
    sets = {s: np.flatnonzero(positions.mask(s) & usable) for s in sets}
    only = {key: HELD_OUT for key in scorers if key.kind != "probe"}
    ev = evaluate(scorers, positions.label, positions.chunk, sets, resamples, seed, only)
    run_baselines = []
    for name in RUN_BASELINES:
        key = baseline_key(name)
        if key in ev.metrics:
            held = {s: m for s, m in ev.metrics[key].items() if s in HELD_OUT}
            intervals: dict[str, Intervals] = {s: ev.intervals(key, s) for s in held}
            run_baselines.append(BaselineResult(name, DESCRIPTIONS[name], held, intervals))
    kept = {str(key): (s.scores, s.threshold) for key, s in made.scorers.items()} if baselines else {}
    return RunEvaluation(evaluation=ev, layers=layers, baselines=run_baselines,
                         comparisons=_summary(ev, layers, bool(baselines)), info=info, baseline_scores=kept)
