"""Binary classification metrics, computed with scikit-learn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


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

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> BinaryMetrics:
    # imported here: sklearn costs ~1 s of startup, which need not come before the forward pass
    from sklearn.metrics import confusion_matrix, roc_auc_score

    labels = np.asarray(labels).astype(bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities >= threshold
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[False, True]).ravel()
    both = 0 < labels.sum() < len(labels)
    return BinaryMetrics(
        n=int(len(labels)),
        positives=int(labels.sum()),
        negatives=int((~labels).sum()),
        # sklearn's balanced_accuracy_score, from the confusion matrix already computed
        balanced_accuracy=float(0.5 * (tp / (tp + fn) + tn / (tn + fp))) if both else float("nan"),
        accuracy=float((predicted == labels).mean()) if len(labels) else float("nan"),
        auroc=float(roc_auc_score(labels, probabilities)) if both else float("nan"),
        tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn),
        threshold=float(threshold),
    )
