"""Selectivity and family comparisons on a synthetic problem whose answers are known exactly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenprobe.analysis.families import score_families
from tokenprobe.data.positions import PositionSet
from tokenprobe.vocabulary import SUBSETS


class Reads:
    """A stand-in probe whose probability is one column of the hidden state."""

    fit_info: dict = {}

    def __init__(self, column: int | None):
        self.column = column

    def predict_proba(self, x, out=None):
        return x[:, self.column].float() if self.column is not None else torch.full((len(x),), 0.25)


def test_selectivity_is_task_minus_control_exactly():
    rng = np.random.default_rng(0)
    n, chunks = 4000, 200
    chunk = np.sort(rng.integers(0, chunks, n))
    subset = np.where(chunk < 120, SUBSETS.index("train"), SUBSETS.index("eval")).astype(np.int8)
    label = rng.random(n) < 0.5
    control = rng.random(n) < 0.5
    positions = PositionSet(chunk=chunk, position=np.zeros(n, np.int64), label=label, subset=subset)
    # column 0 is the task label, column 1 the control label
    values = torch.from_numpy(np.stack([label, control], axis=1).astype(np.float32))
    source = SimpleNamespace(keep=np.ones(n, bool), layer=lambda layer: values)
    fitted = {"linear": {3: Reads(0)}, "mlp": {3: Reads(0)}}
    control_fitted = {"linear": {3: Reads(1)},  # reads the control labels perfectly: selectivity 0
                      "mlp": {3: Reads(None)}}  # cannot: control balanced accuracy 0.5, selectivity 0.5
    result = score_families(SimpleNamespace(positions=positions), source, fitted, control_fitted, control,
                            {"rate": 0.5}, resamples=200, seed=0)
    linear, mlp = result.of("linear", 3), result.of("mlp", 3)
    assert linear.primary.balanced_accuracy == 1.0 and mlp.primary.balanced_accuracy == 1.0
    assert linear.control.balanced_accuracy == 1.0 and mlp.control.balanced_accuracy == 0.5
    assert linear.selectivity["balanced_accuracy"]["difference"] == 0.0
    assert mlp.selectivity["balanced_accuracy"] == {"difference": 0.5, "low": 0.5, "high": 0.5, "significant": True}
    assert mlp.minus_primary["balanced_accuracy"]["difference"] == 0.0
    assert not mlp.minus_primary["balanced_accuracy"]["significant"]
    gap = mlp.selectivity_minus_primary["balanced_accuracy"]
    assert gap["difference"] == pytest.approx(0.5) and gap["significant"]
    assert mlp.control.n == (subset == SUBSETS.index("eval")).sum()
