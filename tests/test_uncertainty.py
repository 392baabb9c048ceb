"""Bootstrap intervals over chunks, weighted AUROC, and paired differences."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from tokenprobe.uncertainty import Scorer, chunk_counts, evaluate, interval, resampled_metrics


def test_resampled_metrics_match_sklearn_with_chunk_weights_and_ties():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 23, size=300) * 7  # 23 chunks with arbitrary ids, positions interleaved
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + labels * 0.4, 1)  # coarse: many ties
    counts, inverse = chunk_counts(chunk, 6, rng)
    got = resampled_metrics(counts, inverse, labels, scores, threshold=0.6)
    for b, row in enumerate(counts[:, inverse]):  # each position weighted by its chunk's draw count
        assert np.isclose(got["auroc"][b], roc_auc_score(labels, scores, sample_weight=row))
        predicted = scores >= 0.6
        assert np.isclose(got["balanced_accuracy"][b], balanced_accuracy_score(labels, predicted, sample_weight=row))
        assert np.isclose(got["accuracy"][b], accuracy_score(labels, predicted, sample_weight=row))


def test_resampling_unit_is_the_chunk():
    chunk = np.repeat([10, 20, 30, 40], [3, 1, 5, 2])
    counts, inverse = chunk_counts(chunk, 200, np.random.default_rng(1))
    weights = counts[:, inverse]
    assert weights.shape == (200, len(chunk))
    for c in np.unique(chunk):
        block = weights[:, chunk == c]
        assert (block == block[:, :1]).all()  # every position of a chunk is drawn together
    # Each resample draws as many chunks as there are (4), with replacement.
    per_chunk = np.stack([weights[:, chunk == c][:, 0] for c in np.unique(chunk)], axis=1)
    assert (per_chunk.sum(axis=1) == 4).all() and (per_chunk == 0).any() and (per_chunk > 1).any()


def test_correlated_chunks_give_wider_intervals_than_positions_would():
    """40 chunks of 25 positions whose correctness is shared within a chunk: resampling chunks must see
    40 independent units, not 1,000, so its interval is clearly wider than a position-level one."""
    rng = np.random.default_rng(2)
    n_chunks, per = 40, 25
    chunk = np.repeat(np.arange(n_chunks), per)
    labels = np.tile(np.arange(per) % 2 == 0, n_chunks)
    chunk_right = rng.random(n_chunks) < 0.8
    right = np.repeat(chunk_right, per)
    scores = np.where(right, labels, ~labels).astype(float)
    idx = {"eval": np.arange(len(chunk))}
    by_chunk = evaluate({"s": Scorer(scores, 0.5)}, labels, chunk, idx, resamples=500, seed=0)
    by_position = evaluate({"s": Scorer(scores, 0.5)}, labels, np.arange(len(chunk)), idx, resamples=500, seed=0)
    lo_c, hi_c = by_chunk.interval("s", "eval", "balanced_accuracy")
    lo_p, hi_p = by_position.interval("s", "eval", "balanced_accuracy")
    point = by_chunk.metrics["s"]["eval"].balanced_accuracy
    assert lo_c <= point <= hi_c
    assert (hi_c - lo_c) > 3 * (hi_p - lo_p)


def test_paired_differences_and_ratio():
    rng = np.random.default_rng(3)
    chunk = np.repeat(np.arange(60), 20)
    labels = rng.random(len(chunk)) < 0.5
    good = labels + rng.normal(0, 0.5, len(chunk))
    bad = labels + rng.normal(0, 2.0, len(chunk))
    scorers = {"good": Scorer(good, 0.5), "same": Scorer(good.copy(), 0.5), "bad": Scorer(bad, 0.5)}
    ev = evaluate(scorers, labels, chunk, {"eval": np.arange(len(chunk))}, resamples=300, seed=0)
    same = ev.difference("good", "same", "eval", "auroc")
    assert same.difference == 0 and same.low == 0 and same.high == 0 and not same.significant
    better = ev.difference("good", "bad", "eval", "auroc")
    assert better.significant and better.low > 0
    value, low, high = ev.ratio("bad", "good", "eval")
    assert low <= value <= high < 1


def test_interval_of_nothing_is_nan_and_evaluate_skips_missing_scores():
    assert all(np.isnan(interval(np.full(10, np.nan))))
    labels = np.array([0, 1, 0, 1], bool)
    partial = Scorer(np.array([0.1, 0.9, np.nan, np.nan]), 0.5)
    ev = evaluate({"p": partial}, labels, np.array([0, 0, 1, 1]),
                  {"a": np.array([0, 1]), "b": np.array([2, 3])}, resamples=100)
    assert "a" in ev.metrics["p"] and "b" not in ev.metrics["p"]
