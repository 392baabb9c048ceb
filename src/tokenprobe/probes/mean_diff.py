"""The mean-difference probe: the difference of the class means in the raw residual stream (the
"mass-mean" probe of Marks & Tegmark 2023, without their covariance correction), with a threshold on
the projection chosen for balanced accuracy and a slope that turns it into probabilities.

No optimiser and no penalty: the direction is two means, the threshold a sort, the slope a
one-dimensional logistic fit. It is the least flexible family, the baseline that asks whether a
probe needs to learn a direction at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.errors import TokenprobeError
from tokenprobe.probes.base import ProbeBase, ProbeMeta, check_shapes
from tokenprobe.probes.lbfgs import ROWS_IN_CACHE

TENSORS = ("mean_diff", "threshold", "slope")
SLOPE_L2 = 1e-4  # on the slope in units of the projection's standard deviation: finite when the classes separate
MIN_SLOPE = 1e-6  # the same units: where the fitted slope is not positive (no signal), probabilities stay ~0.5


@dataclass
class MeanDiffProbe(ProbeBase):
    """logit = slope * (x . mean_diff - threshold), for raw hidden states x of one layer.

    ``mean_diff`` is mu_pos - mu_neg of the training positions, in the residual stream's own
    coordinates; `threshold` is the cut on the projection ``x . mean_diff`` with the highest balanced
    accuracy on the training positions; `slope` > 0 scales the projection into logits (see
    `fit_mean_diff_probes`). So ``predict`` (probability >= 0.5) is exactly ``x . mean_diff >= threshold``.
    """

    mean_diff: torch.Tensor | None = None  # (hidden,) mu_pos - mu_neg
    threshold: torch.Tensor | None = None  # () on x . mean_diff
    slope: torch.Tensor | None = None  # () > 0, logits per unit of x . mean_diff
    meta: ProbeMeta | None = None  # set when the probe belongs to a run, and read from its file
    fit_info: dict[str, Any] = field(default_factory=dict)  # threshold, slope, how they were chosen
    kind: ClassVar[str] = "mean-diff"

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, groups: torch.Tensor | None = None, seed: int = 0,
            pos_weight: float = 1.0, **opts) -> MeanDiffProbe:
        """Fits on (n, hidden) hidden states and (n,) 0/1 labels; returns self (see fit_mean_diff_probes)."""
        opts.setdefault("device", x.device)
        fitted = fit_mean_diff_probes([x], y, groups=groups, seed=seed, pos_weight=pos_weight, progress=False,
                                      **opts)[0]
        self.mean_diff, self.threshold, self.slope = fitted.mean_diff, fitted.threshold, fitted.slope
        self.fit_info = fitted.fit_info
        return self

    def projection(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden . mean_diff`` in float32 for hidden states of shape (..., hidden), any float dtype.

        `out`, a float32 tensor shaped like `hidden` on its device, receives the float32 copy of a
        hidden state of another dtype (bfloat16) instead of a fresh temporary; unused for float32 input.
        """
        x = hidden
        if x.dtype != torch.float32:
            x = out.copy_(hidden) if out is not None else hidden.to(torch.float32)
        return x @ self.mean_diff.to(x.device)

    def decision_function(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, float32, shape (...): ``slope * (hidden . mean_diff - threshold)``; `out`: see `projection`."""
        projection = self.projection(hidden, out)
        return (projection - self.threshold.to(projection.device)) * self.slope.to(projection.device)

    def direction(self) -> torch.Tensor:
        """The probe's direction in the residual stream, ``slope * mean_diff``: the logit is ``x . direction``
        plus a constant, as for every family. It points along mu_pos - mu_neg (`mean_diff` itself)."""
        return self.mean_diff * self.slope

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().to("cpu", torch.float32).contiguous() for k in TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: ProbeMeta) -> MeanDiffProbe:
        check_shapes(tensors, ("mean_diff",), ("threshold", "slope"),
                     width=meta.model.hidden_size if meta is not None else 0)
        return cls(**{k: tensors[k] for k in TENSORS}, meta=meta, fit_info=dict(meta.fit))



def fit_mean_diff_probes(
    x: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    seed: int = 0,
    pos_weight: float = 1.0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    **opts,
) -> list[MeanDiffProbe]:
    """A mean-difference probe per layer: `x` is (layers, n, hidden) or a sequence of (n_all, hidden)
    (float32 or bfloat16, e.g. views of a larger array), `y` the (n,) 0/1 labels of the training rows.

    With `rows` (position indices), only those rows of each layer train, gathered one layer at a time
    (as `fit_linear_probes`). For each layer:

    - ``mean_diff`` = mean of the positive rows - mean of the negative rows, accumulated in float64
      block by block, stored in float32 (raw coordinates: no standardisation);
    - ``threshold``: the projections ``t = x . mean_diff`` (float32, as `decision_function` computes
      them) are sorted, and of every cut between two distinct values (and the two trivial cuts) the one
      with the highest balanced accuracy on the training rows is taken (the lowest such cut on ties), at
      the midpoint of its two neighbouring projections;
    - ``slope``: with the offset fixed by the threshold, a one-dimensional logistic regression of the
      labels on ``t - threshold`` (Newton's method in float64, rows weighted as the other families'
      losses: positives by `pos_weight`, normalised; a ridge of `SLOPE_L2` on the slope in units of
      the projection's standard deviation, so that separable classes give a finite slope), floored at
      `MIN_SLOPE` in those units where it is not positive. The probabilities are then calibrated along
      the direction, and ``predict_proba >= 0.5`` exactly where ``t >= threshold``.

    `groups` and `seed` are accepted for a signature shared with the other families and unused (nothing
    is chosen on rows set aside); `opts` (other families' settings, e.g. ``l2``) are ignored.
    `pos_weight` affects only the slope. Deterministic: the same inputs give the same probes, bit for bit.
    Both classes must occur among the training rows.
    """
    del groups, seed, opts  # see the docstring
    device = torch.device(device)
    layers = len(x)
    if not layers:
        return []
    n = len(rows) if rows is not None else x[0].shape[0]
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} training positions")
    positive = y.to(device) > 0.5
    positives = int(positive.sum())
    if positives == 0 or positives == n:
        raise TokenprobeError("a mean-difference probe needs both classes among its training positions "
                              f"(all {n:,} are {'positive' if positives else 'negative'}); use more data")
    # one column per class, each summing to 1: (x.T @ means)[:, 0] is mu_pos, [:, 1] mu_neg
    means = torch.stack([positive.to(torch.float64) / positives, (~positive).to(torch.float64) / (n - positives)], 1)
    labels = positive.cpu().numpy()
    weight = np.where(labels, float(pos_weight), 1.0)
    weight = weight / weight.sum()
    buffer = torch.empty(n, x[0].shape[-1], device=device)
    probes: list[MeanDiffProbe] = []
    with tqdm(total=layers, desc=f"Training {layers} mean-difference probe(s)", unit="probe",
              disable=not progress, dynamic_ncols=True) as bar:
        for layer_x in x:
            z = _gather(layer_x, rows, buffer)
            class_means = torch.zeros(z.shape[1], 2, dtype=torch.float64, device=device)
            for first in range(0, n, ROWS_IN_CACHE):  # float64 sums, a block at a time
                block = slice(first, first + ROWS_IN_CACHE)
                class_means += z[block].T.to(torch.float64) @ means[block]
            mean_diff = (class_means[:, 0] - class_means[:, 1]).to(torch.float32)
            projection = torch.mv(z, mean_diff).cpu().numpy()
            threshold, balanced = _best_threshold(projection, labels)
            slope = _fit_slope(projection, labels, weight, threshold)
            info = {"threshold": float(threshold), "slope": float(slope),
                    "threshold_method": f"highest balanced accuracy of x . mean_diff on {n:,} training positions",
                    "train_balanced_accuracy": float(balanced)}
            probes.append(MeanDiffProbe(mean_diff.cpu(), torch.tensor(threshold, dtype=torch.float32),
                                        torch.tensor(slope, dtype=torch.float32), fit_info=info))
            bar.update(1)
    return probes


def _gather(layer_x: torch.Tensor, rows: torch.Tensor | None, buffer: torch.Tensor) -> torch.Tensor:
    """The training rows of one layer as float32 in `buffer` (reused from layer to layer)."""
    if rows is not None:
        rows = rows.to(layer_x.device)
        if layer_x.device == buffer.device and layer_x.dtype == buffer.dtype:
            return torch.index_select(layer_x, 0, rows, out=buffer)
        return buffer.copy_(layer_x.index_select(0, rows))
    return buffer.copy_(layer_x) if layer_x.device != buffer.device or layer_x.dtype != buffer.dtype else layer_x


def _best_threshold(projection: np.ndarray, labels: np.ndarray) -> tuple[np.float32, float]:
    """The float32 threshold c with the highest balanced accuracy of ``projection >= c`` (the lowest such
    cut on ties), and that balanced accuracy."""
    order = np.argsort(projection, kind="stable")
    t = projection[order]
    positive = labels[order]
    n, positives = len(t), int(positive.sum())
    negatives = n - positives
    # cut k: rows 0..k-1 predicted negative, k..n-1 positive (k = 0: all positive, k = n: all negative)
    negatives_below = np.concatenate([[0], np.cumsum(~positive)])
    positives_above = positives - np.concatenate([[0], np.cumsum(positive)])
    balanced = 0.5 * (positives_above / positives + negatives_below / negatives)
    allowed = np.ones(n + 1, dtype=bool)
    allowed[1:n] = t[1:] > t[:-1]  # only between distinct projections
    k = int(np.argmax(np.where(allowed, balanced, -1.0)))
    if k == 0:
        threshold = t[0]
    elif k == n:
        threshold = np.nextafter(t[-1], np.float32(np.inf))
    else:
        low, high = t[k - 1], t[k]
        threshold = np.float32(0.5 * (np.float64(low) + np.float64(high)))
        if not low < threshold <= high:  # neighbouring float32 values: the cut sits on the higher one
            threshold = high
    return np.float32(threshold), float(balanced[k])


def _fit_slope(projection: np.ndarray, labels: np.ndarray, weight: np.ndarray, threshold: np.float32) -> float:
    """The slope a > 0 of the one-dimensional logistic model logit = a * (t - threshold) (see
    fit_mean_diff_probes), by safeguarded Newton steps in float64."""
    centred = projection.astype(np.float64) - np.float64(threshold)
    spread = float(np.sqrt(np.mean(centred ** 2)))
    if not spread > 0:
        return MIN_SLOPE
    u = centred / spread  # the slope in units of the projection's spread
    target = labels.astype(np.float64)

    def loss(a: float) -> float:
        s = a * u
        return float(weight @ (np.logaddexp(0.0, s) - target * s)) + 0.5 * SLOPE_L2 * a * a

    a, current = 0.0, loss(0.0)
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh(0.5 * a * u))  # sigmoid, without overflow
        gradient = float(weight @ ((p - target) * u)) + SLOPE_L2 * a
        curvature = float(weight @ (p * (1.0 - p) * u * u)) + SLOPE_L2
        step = -gradient / curvature
        while True:  # halve the step until the loss does not rise (the loss is convex in a)
            candidate = loss(a + step)
            if candidate <= current or abs(step) <= 1e-15 * max(1.0, abs(a)):
                break
            step *= 0.5
        if candidate > current:
            break
        a, current = a + step, candidate
        if abs(step) <= 1e-12 * max(1.0, abs(a)):
            break
    a = a if math.isfinite(a) and a > MIN_SLOPE else MIN_SLOPE
    return a / spread
