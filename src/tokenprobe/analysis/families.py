"""Probe families side by side, each also on a control task: does capacity help, or does it memorise?

Every family's probe of every layer is scored on the same held-out positions with the same chunk
resamples as the run's primary probes, so all differences are paired: a family against the primary
family at the same layer, and each probe against its own control-task twin (selectivity, Hewitt &
Liang 2019: task balanced accuracy minus control balanced accuracy, on the same held-out positions
relabelled by the control task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenprobe.analysis.bootstrap import Evaluation, evaluate, interval
from tokenprobe.analysis.metrics import BinaryMetrics, Intervals, flat_metrics
from tokenprobe.analysis.scoring import score_probes
from tokenprobe.data.prepare import Prepared
from tokenprobe.extract.sinks import ActivationSource
from tokenprobe.vocabulary import COMPARED_METRICS, PRIMARY_SET, REPORTED_SETS, ScorerKey

CONTROL_SETS = (PRIMARY_SET,)  # where control probes are scored (held-out, balanced for the task)


def family_key(family: str, layer: int) -> ScorerKey:
    return ScorerKey(f"probe:{family}", layer)


def _selectivity_gap(task: Evaluation, control: Evaluation, key: ScorerKey, primary: ScorerKey,
                     metric: str) -> dict[str, Any]:
    """(this family's task - control) minus (the primary family's task - control), paired."""
    def samples(ev: Evaluation, k: ScorerKey):
        return ev.samples.get(k, {}).get(PRIMARY_SET, {}).get(metric)

    def point(ev: Evaluation, k: ScorerKey) -> float:
        return getattr(ev.metrics[k][PRIMARY_SET], metric)

    value = (point(task, key) - point(control, key)) - (point(task, primary) - point(control, primary))
    parts = [samples(task, key), samples(control, key), samples(task, primary), samples(control, primary)]
    low, high = (interval(parts[0] - parts[1] - parts[2] + parts[3]) if all(p is not None for p in parts)
                 else (float("nan"), float("nan")))
    return {"difference": float(value), "low": low, "high": high, "significant": bool(low > 0 or high < 0)}


def paired_difference(a: Evaluation, key_a: ScorerKey, b: Evaluation, key_b: ScorerKey, subset: str,
                      metric: str) -> dict[str, Any]:
    """a minus b on one metric with the 95% interval of the paired bootstrap differences. The two
    evaluations must share their resamples (the same positions' chunks, seed and count)."""
    point = getattr(a.metrics[key_a][subset], metric) - getattr(b.metrics[key_b][subset], metric)
    da = a.samples.get(key_a, {}).get(subset, {}).get(metric)
    db = b.samples.get(key_b, {}).get(subset, {}).get(metric)
    low, high = interval(da - db) if da is not None and db is not None else (float("nan"), float("nan"))
    return {"difference": float(point), "low": low, "high": high, "significant": bool(low > 0 or high < 0)}


@dataclass
class FamilyLayer:
    """One family's probe at one layer: task metrics, control metrics, selectivity and comparisons."""

    family: str
    layer: int
    metrics: dict[str, BinaryMetrics]  # set -> metrics on the task
    intervals: dict[str, Intervals] = field(default_factory=dict)
    control: BinaryMetrics | None = None  # on the held-out balanced set, relabelled by the control task
    control_intervals: Intervals = field(default_factory=dict)
    selectivity: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> paired task - control
    minus_primary: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> paired this - primary family
    selectivity_minus_primary: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> paired
    fit: dict[str, Any] = field(default_factory=dict)
    mdl: dict[str, Any] | None = None
    probe_file: str | None = None

    @property
    def primary(self) -> BinaryMetrics:
        return self.metrics[PRIMARY_SET]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "family": self.family, "layer": self.layer, "probe_file": self.probe_file,
            **flat_metrics(self.primary, self.intervals.get(PRIMARY_SET, {})),
            "sets": {name: flat_metrics(m, self.intervals.get(name, {})) for name, m in self.metrics.items()},
            "fit": self.fit,
        }
        if self.control is not None:
            out["control"] = flat_metrics(self.control, self.control_intervals)
            out["selectivity"] = self.selectivity
        if self.minus_primary:
            out["minus_primary"] = self.minus_primary
        if self.selectivity_minus_primary:
            out["selectivity_minus_primary"] = self.selectivity_minus_primary
        if self.mdl is not None:
            out["mdl"] = self.mdl
        return out


@dataclass
class FamilyEvaluation:
    primary: str
    families: list[str]
    layers: list[FamilyLayer]  # by layer, then family in --probe order
    control: dict[str, Any] | None  # the control task's record, or None without one

    def of(self, family: str, layer: int) -> FamilyLayer:
        return next(r for r in self.layers if r.family == family and r.layer == layer)

    def to_dict(self) -> dict[str, Any]:
        return {"primary": self.primary, "families": self.families, "control_task": self.control,
                "set": PRIMARY_SET, "layers": [r.to_dict() for r in self.layers]}


def _scorers(fitted: dict[str, dict[int, Any]], source: ActivationSource, n: int):
    """Every family's scorer of every layer, keyed family by family; computed layer by layer, so a source
    that reads layers from disk (the activation store) reads each once."""
    made = {}
    for layer in sorted({layer for probes in fitted.values() for layer in probes}):
        for family, probes in fitted.items():
            if layer in probes:
                made.update(score_probes({layer: probes[layer]}, source, n,
                                         key=lambda layer, f=family: family_key(f, layer)))
    return {family_key(family, layer): made[family_key(family, layer)]
            for family, probes in fitted.items() for layer in probes}


def score_families(prepared: Prepared, source: ActivationSource, fitted: dict[str, dict[int, Any]],
                   control_fitted: dict[str, dict[int, Any]] | None, control_labels: np.ndarray | None,
                   control_record: dict[str, Any] | None, resamples: int, seed: int,
                   mdl: dict[tuple[str, int], dict[str, Any]] | None = None,
                   sets: tuple[str, ...] = REPORTED_SETS) -> FamilyEvaluation:
    """Every family's probes on the task (each of `sets`, by default every reported set) and, given
    control probes and each position's control label, on the control task; `fitted` maps family ->
    layer -> probe, its first family being the primary one."""
    positions, usable = prepared.positions, source.keep
    families = list(fitted)
    primary = families[0]
    sets = {s: np.flatnonzero(positions.mask(s) & usable) for s in sets}
    task = evaluate(_scorers(fitted, source, len(positions)), positions.label, positions.chunk, sets, resamples, seed)
    control = None
    if control_fitted is not None:
        control = evaluate(_scorers(control_fitted, source, len(positions)), control_labels, positions.chunk,
                           {s: sets[s] for s in CONTROL_SETS}, resamples, seed)
    rows = []
    for layer in fitted[primary]:
        for family in families:
            key = family_key(family, layer)
            probe = fitted[family][layer]
            result = FamilyLayer(family=family, layer=layer, metrics=dict(task.metrics[key]),
                                 intervals={s: task.intervals(key, s) for s in task.metrics[key]},
                                 fit=dict(getattr(probe, "fit_info", {}) or {}),
                                 mdl=(mdl or {}).get((family, layer)))
            if family != primary:
                result.minus_primary = {m: paired_difference(task, key, task, family_key(primary, layer),
                                                             PRIMARY_SET, m)
                                        for m in COMPARED_METRICS}
            if control is not None and key in control.metrics:
                result.control = control.metrics[key][PRIMARY_SET]
                result.control_intervals = control.intervals(key, PRIMARY_SET)
                result.selectivity = {m: paired_difference(task, key, control, key, PRIMARY_SET, m)
                                      for m in COMPARED_METRICS}
                if family != primary and family_key(primary, layer) in control.metrics:
                    result.selectivity_minus_primary = {
                        m: _selectivity_gap(task, control, key, family_key(primary, layer), m)
                        for m in COMPARED_METRICS}
            rows.append(result)
    return FamilyEvaluation(primary=primary, families=families, layers=rows, control=control_record)
