"""Binary classification metrics of one scorer on one set of positions, and a layer's results.

They are computed exactly from integer counts (see :func:`tokenprobe.analysis.bootstrap.binary_metrics`), by
the same code that computes every bootstrap resample, and checked against scikit-learn in the tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenprobe.vocabulary import PRIMARY_SET

Intervals = dict[str, tuple[float, float]]  # metric -> (low, high), 95% bootstrap over held-out chunks


@dataclass(frozen=True)
class BinaryMetrics:
    """Metrics of one probe on one set of positions; `to_dict` feeds JSON, CSV and tracking alike."""

    n: int
    positives: int
    negatives: int
    balanced_accuracy: float
    accuracy: float
    auroc: float  # NaN when only one class is present
    tp: int
    fp: int
    tn: int
    fn: int
    threshold: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, tn: int, fn: int, auroc: float, threshold: float) -> BinaryMetrics:
        """From the confusion matrix and the AUROC; balanced accuracy and AUROC are NaN without both classes."""
        positives, negatives = tp + fn, tn + fp
        both = positives > 0 and negatives > 0
        return cls(
            n=positives + negatives, positives=positives, negatives=negatives,
            balanced_accuracy=0.5 * (tp / positives + tn / negatives) if both else float("nan"),
            accuracy=(tp + tn) / (positives + negatives) if positives + negatives else float("nan"),
            auroc=float(auroc) if both else float("nan"),
            tp=tp, fp=fp, tn=tn, fn=fn, threshold=float(threshold),
        )

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def flat_metrics(metrics: BinaryMetrics, intervals: Intervals, prefix: str = "") -> dict[str, Any]:
    """The metrics as one flat dict, each interval as ``<metric>_low`` and ``<metric>_high``, every key
    prefixed with `prefix`: the one shape results.json, results.csv and WandB all use."""
    out: dict[str, Any] = {f"{prefix}{k}": v for k, v in metrics.to_dict().items()}
    for name, (low, high) in intervals.items():
        out[f"{prefix}{name}_low"], out[f"{prefix}{name}_high"] = low, high
    return out


@dataclass(frozen=True)
class LayerResult:
    layer: int
    run_name: str
    probe_file: str | None
    metrics: dict[str, BinaryMetrics]  # keyed by REPORTED_SETS
    intervals: dict[str, Intervals] = field(default_factory=dict)  # set -> metric -> (low, high)
    logit_lens: dict[str, BinaryMetrics] = field(default_factory=dict)  # set -> metrics of this layer's logit lens
    logit_lens_intervals: dict[str, Intervals] = field(default_factory=dict)
    auroc_fraction_of_model: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # set -> (value, low, high)
    l2: float | None = None  # the probe's L2 penalty (chosen per layer with --l2 auto)

    @property
    def primary(self) -> BinaryMetrics:
        return self.metrics[PRIMARY_SET]

    def to_dict(self) -> dict[str, Any]:
        """Flat primary metrics (held-out, balanced) with their intervals, plus every set in full."""
        out = {
            "layer": self.layer,
            "run_name": self.run_name,
            "probe_file": self.probe_file,
            "l2": self.l2,
            **flat_metrics(self.primary, self.intervals.get(PRIMARY_SET, {})),
            "sets": {name: flat_metrics(m, self.intervals.get(name, {})) for name, m in self.metrics.items()},
        }
        if self.logit_lens:
            out["logit_lens"] = {name: flat_metrics(m, self.logit_lens_intervals.get(name, {}))
                                 for name, m in self.logit_lens.items()}
        if self.auroc_fraction_of_model:
            out["auroc_fraction_of_model"] = {name: {"value": v, "low": lo, "high": hi}
                                              for name, (v, lo, hi) in self.auroc_fraction_of_model.items()}
        return out


@dataclass(frozen=True)
class BaselineResult:
    """A run-level baseline (the model's own prediction, token statistics, majority class)."""

    name: str
    description: str
    metrics: dict[str, BinaryMetrics]  # set -> metrics
    intervals: dict[str, Intervals] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description,
                "sets": {name: flat_metrics(m, self.intervals.get(name, {})) for name, m in self.metrics.items()}}
