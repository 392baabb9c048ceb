"""Bootstrap intervals over chunks, weighted AUROC, and paired differences."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tokenprobe.analysis.bootstrap import Scorer, chunk_counts, evaluate, interval, pair_matrix, resampled_metrics


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


@pytest.mark.parametrize("resamples", [0, 50])
def test_point_metrics_of_every_set_match_sklearn(resamples):
    """The set's own metrics come from the same exact counts as the resamples (every chunk drawn once)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    rng = np.random.default_rng(5)
    chunk = rng.integers(0, 17, size=400)
    labels = rng.random(400) < 0.25
    coarse = np.round(rng.random(400) + labels * 0.5, 1)  # many ties between the classes
    scorers = {"coarse": Scorer(coarse, 0.7), "fine": Scorer(rng.random(400) + labels * 0.2, 0.55)}
    sets = {"a": np.arange(0, 400, 2), "b": np.arange(1, 400, 2)}
    ev = evaluate(scorers, labels, chunk, sets, resamples=resamples, seed=1)
    for name, s in scorers.items():
        for subset, idx in sets.items():
            m, y, predicted = ev.metrics[name][subset], labels[idx], s.scores[idx] >= s.threshold
            tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[False, True]).ravel()
            assert (m.tp, m.fp, m.tn, m.fn, m.n) == (tp, fp, tn, fn, len(idx))
            assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, predicted), abs=1e-12)
            assert m.auroc == pytest.approx(roc_auc_score(y, s.scores[idx]), abs=1e-12)
            assert m.accuracy == pytest.approx((predicted == y).mean(), abs=1e-12)
            assert (name in ev.samples) == (resamples > 0)


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


def _reference_pair_matrix(inverse, k, labels, scores):
    """A[c, d] by its definition, one pair of chunks at a time (searchsorted counts lower and tied negatives)."""
    y = labels.astype(bool)
    matrix = np.zeros((k, k))
    for d in range(k):
        negatives = np.sort(scores[~y & (inverse == d)])
        for c in range(k):
            positives = scores[y & (inverse == c)]
            lower = np.searchsorted(negatives, positives, side="left")
            tied = np.searchsorted(negatives, positives, side="right") - lower
            matrix[c, d] = lower.sum() + 0.5 * tied.sum()
    return matrix


@pytest.mark.parametrize("n, k, decimals", [(1, 1, 3), (5, 2, 1), (63, 4, 2), (64, 3, 2), (65, 7, 0), (300, 11, 1),
                                            (1000, 23, 6), (1000, 5, 0), (2000, 40, 12)])
def test_pair_matrix_matches_its_definition(n, k, decimals):
    """Blocks of the sorted sequence (partial, exact, one, many), ties within and across blocks, all scores
    tied (decimals 0), no ties at all (12)."""
    rng = np.random.default_rng(n + k)
    inverse = rng.integers(0, k, size=n)
    labels = rng.random(n) < 0.4
    scores = np.round(rng.random(n) * 0.8 + labels * 0.3, decimals)
    assert np.array_equal(pair_matrix(inverse, k, labels, scores), _reference_pair_matrix(inverse, k, labels, scores))


def test_pair_matrix_with_one_class_is_zero():
    scores = np.linspace(0, 1, 50)
    assert not pair_matrix(np.arange(50) % 3, 3, np.ones(50, bool), scores).any()
    assert not pair_matrix(np.arange(50) % 3, 3, np.zeros(50, bool), scores).any()


def _float64_reference(counts, inverse, labels, scores, threshold):
    """resampled_metrics as first written: every product in float64 from the defining pair matrix."""
    k = counts.shape[1]
    y = labels.astype(bool)
    predicted = scores >= threshold
    per = [np.bincount(inverse, weights=m.astype(np.float64), minlength=k) for m in (y, ~y, y & predicted,
                                                                                      ~y & ~predicted)]
    positives, negatives, tp, tn = (counts @ p for p in per)
    pairs = ((counts @ _reference_pair_matrix(inverse, k, y, scores)) * counts).sum(axis=1)
    both = (positives > 0) & (negatives > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"balanced_accuracy": np.where(both, 0.5 * (tp / positives + tn / negatives), np.nan),
                "accuracy": (tp + tn) / (positives + negatives),
                "auroc": np.where(both, pairs / (positives * negatives), np.nan)}


@pytest.mark.parametrize("per_chunk", [30, 3000])
def test_resampled_metrics_are_bit_identical_to_float64(per_chunk):
    """Small chunks take the float32 matrix product, huge ones (pos * neg >= 2**23) float64: both exact."""
    rng = np.random.default_rng(per_chunk)
    k = 40 if per_chunk == 30 else 3
    inverse = np.repeat(np.arange(k), per_chunk * 2)
    labels = np.tile(np.r_[np.ones(per_chunk, bool), np.zeros(per_chunk, bool)], k)
    scores = np.round(rng.random(len(labels)) + labels * 0.2, 3)
    counts, _ = chunk_counts(inverse, 50, rng)
    got = resampled_metrics(counts, inverse, labels, scores, 0.55)
    expected = _float64_reference(counts, inverse, labels, scores, 0.55)
    for metric in expected:
        assert np.array_equal(got[metric], expected[metric], equal_nan=True)
    b = int(np.argmax(counts[:, 0]))  # one resample against scikit-learn's weighted AUROC
    assert np.isclose(got["auroc"][b], roc_auc_score(labels, scores, sample_weight=counts[b, inverse]))
