"""Every probe and every baseline scored on the same held-out positions, with intervals and comparisons.

The output is what results.json, the terminal table, the report and the WandB runs all show: per
layer the probe's metrics and the logit lens with 95% intervals, the probe's AUROC as a fraction of
the model's own, the run-level baselines, and paired bootstrap tests of the differences between
layers and between the best layer and each baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenprobe.baselines import DESCRIPTIONS, MAJORITY, MODEL, TOKEN_STATS, compute_baselines, logit_lens_name
from tokenprobe.metrics import BinaryMetrics
from tokenprobe.results import BaselineResult, Intervals
from tokenprobe.uncertainty import Evaluation, Scorer, evaluate, pairwise_differences

SETS = ("eval", "eval_natural", "train")
HELD_OUT = ("eval", "eval_natural")
COMPARED_METRICS = ("balanced_accuracy", "auroc")


def probe_name(layer: int) -> str:
    return f"probe/{layer}"


@dataclass
class RunEvaluation:
    evaluation: Evaluation
    layers: list[int]
    baselines: list[BaselineResult]
    comparisons: dict[str, Any]
    info: dict[str, Any]

    def probe_metrics(self, layer: int) -> dict[str, BinaryMetrics]:
        metrics = self.evaluation.metrics[probe_name(layer)]
        return {s: metrics[s] for s in SETS if s in metrics}

    def layer_fields(self, layer: int) -> dict[str, Any]:
        """Keyword arguments for LayerResult beyond the probe's own metrics."""
        ev, probe, lens = self.evaluation, probe_name(layer), logit_lens_name(layer)
        out: dict[str, Any] = {"intervals": {s: ev.intervals(probe, s) for s in SETS if s in ev.metrics[probe]}}
        if lens in ev.metrics:
            out["logit_lens"] = {s: m for s, m in ev.metrics[lens].items() if s in HELD_OUT}
            out["logit_lens_intervals"] = {s: ev.intervals(lens, s) for s in out["logit_lens"]}
        if MODEL in ev.metrics:
            out["auroc_fraction_of_model"] = {s: ev.ratio(probe, MODEL, s) for s in HELD_OUT
                                              if s in ev.metrics[MODEL] and s in ev.metrics[probe]}
        return out


def _summary(ev: Evaluation, layers: list[int], baselines_on: bool) -> dict[str, Any]:
    names = [probe_name(layer) for layer in layers]
    out: dict[str, Any] = {"set": "eval", "level": 0.95, "resamples": ev.resamples,
                           "unit": "held-out chunks", "chunks": ev.chunks.get("eval")}
    for metric in COMPARED_METRICS:
        values = [getattr(ev.metrics[n]["eval"], metric) for n in names]
        best = int(np.nanargmax(values)) if np.isfinite(values).any() else 0
        pairs = pairwise_differences(ev, names, "eval", metric) if ev.resamples else []
        ties = [layers[i] for i in range(len(layers)) if i != best and ev.resamples
                and not ev.difference(names[i], names[best], "eval", metric).significant]
        entry: dict[str, Any] = {
            "best_layer": layers[best],
            "indistinguishable_from_best": ties,
            "pairs": [{**d.to_dict(), "a": int(d.a.split("/")[1]), "b": int(d.b.split("/")[1])} for d in pairs],
        }
        if baselines_on and ev.resamples:
            vs = {}
            for other in (MODEL, TOKEN_STATS, logit_lens_name(layers[best]), MAJORITY):
                if other in ev.metrics and "eval" in ev.metrics[other]:
                    vs[other.split("/")[0]] = ev.difference(names[best], other, "eval", metric).to_dict()
            entry["best_minus_baselines"] = vs
            entry["layer_minus_baselines"] = {
                layer: {other.split("/")[0]: ev.difference(name, other, "eval", metric).to_dict()
                        for other in (MODEL, TOKEN_STATS, logit_lens_name(layer))
                        if other in ev.metrics and "eval" in ev.metrics[other]}
                for layer, name in zip(layers, names)
            }
        out[metric] = entry
    return out


def evaluate_run(
    loaded,
    chunks: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    train_chunks: np.ndarray,
    positions,
    usable: np.ndarray,
    values: torch.Tensor,
    value_layers: list[int],
    layers: list[int],
    probes: list,
    target_id: int,
    baselines: bool = True,
    resamples: int = 1000,
    seed: int = 0,
) -> RunEvaluation:
    """Scores every probe (threshold 0.5) and, with `baselines`, every baseline at all positions, then
    evaluates them on each set with `resamples` chunk-bootstrap resamples.

    `values` is (len(value_layers), positions, hidden); with baselines it must include the last layer.
    """
    slot = {layer: i for i, layer in enumerate(value_layers)}
    scorers: dict[str, Scorer] = {}
    rows = np.flatnonzero(usable)
    every = len(rows) == values.shape[1]  # then no row needs to be gathered
    index = torch.from_numpy(rows)
    # One scratch buffer for all layers: the standardised rows (or the gathered ones, standardised in place)
    scratch = torch.empty(len(rows), values.shape[-1], dtype=torch.float32, device=values.device)
    for layer, probe in zip(layers, probes):
        scores = np.full(len(positions), np.nan)
        with torch.inference_mode():
            x = values[slot[layer]]
            if not every and x.dtype == torch.float32:
                x = torch.index_select(x, 0, index.to(x.device), out=scratch)
            elif not every:
                x = x[index.to(x.device)]
            scores[rows] = probe.predict_proba(x, out=scratch).double().cpu().numpy()
        scorers[probe_name(layer)] = Scorer(scores=scores, threshold=0.5)
    info: dict[str, Any] = {}
    if baselines:
        hidden = {layer: values[slot[layer]] for layer in {*layers, loaded.num_layers}}
        made = compute_baselines(loaded, chunks, labels, valid, train_chunks, positions, usable, hidden, layers,
                                 target_id, seed)
        scorers.update(made.scorers)
        info = {**made.info, "thresholds": {name: s.threshold for name, s in made.scorers.items()}}
    sets = {s: np.flatnonzero(positions.mask(s) & usable) for s in SETS}
    only = {name: HELD_OUT for name in scorers if not name.startswith("probe/")}
    ev = evaluate(scorers, positions.label, positions.chunk, sets, resamples, seed, only)
    run_baselines = []
    for name in (MODEL, TOKEN_STATS, MAJORITY):
        if name in ev.metrics:
            held = {s: m for s, m in ev.metrics[name].items() if s in HELD_OUT}
            intervals: dict[str, Intervals] = {s: ev.intervals(name, s) for s in held}
            run_baselines.append(BaselineResult(name, DESCRIPTIONS[name], held, intervals))
    return RunEvaluation(evaluation=ev, layers=layers, baselines=run_baselines,
                         comparisons=_summary(ev, layers, baselines), info=info)
