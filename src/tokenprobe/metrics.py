"""Binary classification metrics of one scorer on one set of positions.

They are computed exactly from integer counts (see :func:`tokenprobe.uncertainty.binary_metrics`), by
the same code that computes every bootstrap resample, and checked against scikit-learn in the tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
