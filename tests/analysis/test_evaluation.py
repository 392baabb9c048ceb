"""score_run: the probes' scores (from one scratch buffer, gathered or not) are predict_proba's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from types import SimpleNamespace

import tokenprobe.analysis.scoring as evaluation
from tokenprobe.data.positions import PositionSet
from tokenprobe.extract.sinks import MemorySink
from tokenprobe.probes.linear import LinearProbe
from tokenprobe.vocabulary import SUBSETS, probe_key


def _run(usable: np.ndarray, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, hidden = 2600, 24  # more positions than one cache block of the scratch buffer
    rng = np.random.default_rng(0)
    positions = PositionSet(chunk=rng.integers(0, 40, n), position=rng.integers(0, 256, n),
                            label=rng.random(n) < 0.5, subset=rng.integers(0, len(SUBSETS), n).astype(np.int8))
    value_layers = [0, 3, 6]
    values = torch.randn(len(value_layers), n, hidden, generator=g) * 20 + 3
    layers = [6, 0]  # probed layers, not in the order of `values`, one of them not probed
    probes = [LinearProbe(weight=torch.randn(hidden, generator=g), bias=torch.randn((), generator=g),
                          mean=torch.randn(hidden, generator=g), scale=torch.rand(hidden, generator=g))
              for _ in layers]
    seen = {}
    evaluate = evaluation.evaluate

    def spy(scorers, *args, **kwargs):
        seen.update(scorers)
        return evaluate(scorers, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    source = MemorySink(value_layers, n, hidden, torch.float32)
    source.values, source.keep = values, usable
    run = evaluation.score_run(None, SimpleNamespace(positions=positions), source, dict(zip(layers, probes)),
                               baselines=False, resamples=20)
    for layer, probe in zip(layers, probes):
        scores = seen[probe_key(layer)].scores
        rows = np.flatnonzero(usable)
        expected = probe.predict_proba(values[value_layers.index(layer)][torch.from_numpy(rows)]).double().numpy()
        assert np.array_equal(scores[rows], expected)
        assert np.isnan(np.delete(scores, rows)).all()
        assert run.probe_metrics(layer)["eval"].n == int((positions.mask("eval") & usable).sum())
    return run


@pytest.mark.parametrize("all_usable", [True, False])
def test_probe_scores_are_predict_proba_bit_for_bit(all_usable, monkeypatch):
    usable = np.ones(2600, bool) if all_usable else np.random.default_rng(1).random(2600) < 0.8
    _run(usable, monkeypatch)
