"""95% intervals by bootstrap over held-out CHUNKS, and paired tests of layer differences.

Neighbouring positions of one chunk are not independent (they share a text), so resampling
positions would give intervals that are too narrow. Each bootstrap resample draws whole chunks with
replacement; a position then counts as often as its chunk was drawn. Every scorer (the probe of
each layer, each baseline) is evaluated on the SAME resamples, which makes differences between
them paired: a difference whose own 95% interval excludes zero is larger than the noise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from tokenprobe.analysis.metrics import BinaryMetrics
from tokenprobe.vocabulary import ScorerKey

INTERVAL_METRICS = ("balanced_accuracy", "accuracy", "auroc")
CONFUSION = ("tp", "fp", "tn", "fn")
LEVEL = 0.95


def chunk_counts(chunk: np.ndarray, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(samples, chunks) draw counts of each resample, and each position's chunk column.

    A resample draws as many chunks as there are, with replacement; a position then counts as often
    as its chunk was drawn.
    """
    unique, inverse = np.unique(chunk, return_inverse=True)
    k = len(unique)
    draws = rng.integers(0, k, size=(samples, k)) + (np.arange(samples) * k)[:, None]
    counts = np.bincount(draws.ravel(), minlength=samples * k).reshape(samples, k)
    return counts.astype(np.float64), inverse


def pair_matrix(inverse: np.ndarray, k: int, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """A[c, d]: pairs (positive in chunk c, negative in chunk d) with the positive scored higher, ties 1/2.

    Under chunk draw counts m the weighted AUROC numerator is m A m^T, so every resample's AUROC
    comes from this one matrix instead of a sort per resample.

    Positions are sorted by score, positives first within a tie, so the negatives scored strictly lower
    than a positive are exactly those before it; those pairs are counted block by block (see
    `_ordered_pairs`), and ties between a positive and a negative add one half each.
    """
    y = labels.astype(bool)
    if y.all() or not y.any():
        return np.zeros((k, k))
    order = np.lexsort((~y, scores))  # by score; within a tie, positives first
    ordered, positive, chunk = scores[order], y[order], inverse[order]
    matrix = _ordered_pairs(chunk, positive, k)
    tied = ordered[1:] == ordered[:-1]
    if (tied & (positive[1:] != positive[:-1])).any():  # some tie holds both a positive and a negative
        matrix += 0.5 * _tied_pairs(chunk, positive, tied, k)
    return matrix


PAIR_BLOCK = 64  # positions per block in `_ordered_pairs`


def _ordered_pairs(chunk: np.ndarray, positive: np.ndarray, k: int, block: int = PAIR_BLOCK) -> np.ndarray:
    """Q[c, d]: pairs (positive of chunk c, negative of chunk d) with the negative earlier in the sequence.

    Cut the sequence into blocks: pairs across blocks are P' C (P: positives per block and chunk,
    C: negatives per chunk in all earlier blocks), one matrix product; pairs inside a block are listed.
    """
    n = len(chunk)
    blocks = -(-n // block)
    pad = blocks * block - n
    chunk = np.concatenate([chunk, np.zeros(pad, chunk.dtype)])
    pos = np.concatenate([positive, np.zeros(pad, bool)])
    neg = np.concatenate([~positive, np.zeros(pad, bool)])
    cell = np.repeat(np.arange(blocks) * k, block) + chunk
    pos_counts = np.bincount(cell[pos], minlength=blocks * k).reshape(blocks, k)
    neg_counts = np.bincount(cell[neg], minlength=blocks * k).reshape(blocks, k)
    earlier = np.cumsum(neg_counts, axis=0) - neg_counts
    # every partial sum of Q[c, d] is at most (positives of c) * (negatives of d): exact in float32 below 2**24
    exact32 = int(pos_counts.sum(axis=0).max()) * int(neg_counts.sum(axis=0).max()) < 2**24
    dtype = np.float32 if exact32 else np.float64
    matrix = (pos_counts.T.astype(dtype) @ earlier.astype(dtype)).astype(np.float64)
    later, first = np.tril_indices(block, -1)  # offsets in a block, `later` after `first`
    chunk, pos, neg = chunk.reshape(blocks, block), pos.reshape(blocks, block), neg.reshape(blocks, block)
    which, pair = np.nonzero(pos[:, later] & neg[:, first])
    cells = chunk[which, later[pair]] * k + chunk[which, first[pair]]
    matrix += np.bincount(cells, minlength=k * k).reshape(k, k)
    return matrix


def _tied_pairs(chunk: np.ndarray, positive: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """T[c, d]: pairs (positive of chunk c, negative of chunk d) with equal scores (`tied`: each position
    equal to the one before it, in score order)."""
    from scipy import sparse  # a dependency of scikit-learn

    group = np.cumsum(np.r_[True, ~tied]) - 1
    groups = group[-1] + 1
    positives = np.bincount(group, weights=positive, minlength=groups)
    mixed = (positives > 0) & (positives < np.bincount(group, minlength=groups))
    keep = mixed[group]
    row = (np.cumsum(mixed) - 1)[group[keep]]
    col, pos = chunk[keep], positive[keep]
    shape = (int(mixed.sum()), k)
    p = sparse.csr_matrix((np.ones(int(pos.sum())), (row[pos], col[pos])), shape=shape)
    n = sparse.csr_matrix((np.ones(int((~pos).sum())), (row[~pos], col[~pos])), shape=shape)
    return (p.T @ n).toarray()


def resampled_metrics(counts: np.ndarray, inverse: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                      threshold: float) -> dict[str, np.ndarray]:
    """Every metric of INTERVAL_METRICS, and the confusion counts, under each row of chunk draw `counts`;
    NaN where a class is missing. A row of ones (every chunk drawn once) gives the metrics of the set itself.

    Every sum here is of integers (and halves) and exact, so the result does not depend on how it is
    computed: m A goes through float32 (twice as fast as float64) where that is exact too.
    """
    k = counts.shape[1]
    y = labels.astype(bool)
    predicted = scores >= threshold

    def per_chunk(mask: np.ndarray) -> np.ndarray:
        return np.bincount(inverse, weights=mask.astype(np.float64), minlength=k)

    positives_per_chunk, negatives_per_chunk = per_chunk(y), per_chunk(~y)
    positives, negatives = counts @ positives_per_chunk, counts @ negatives_per_chunk
    tp, tn = counts @ per_chunk(y & predicted), counts @ per_chunk(~y & ~predicted)
    matrix = pair_matrix(inverse, k, y, scores)
    # A[c, d] <= pos[c] neg[d] and every partial sum of (m A)[d] <= (positives drawn) neg[d]: multiples of
    # 1/2 below 2**23 are exact in float32, whatever order the matrix product adds them in
    bound = max(positives.max(initial=0), positives_per_chunk.max(initial=0)) * negatives_per_chunk.max(initial=0)
    if bound < 2**23:
        weighted = (counts.astype(np.float32) @ matrix.astype(np.float32)).astype(np.float64)
    else:
        weighted = counts @ matrix
    pairs = (weighted * counts).sum(axis=1)
    both = (positives > 0) & (negatives > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "balanced_accuracy": np.where(both, 0.5 * (tp / positives + tn / negatives), np.nan),
            "accuracy": (tp + tn) / (positives + negatives),
            "auroc": np.where(both, pairs / (positives * negatives), np.nan),
            "tp": tp, "fp": negatives - tn, "tn": tn, "fn": positives - tp,
        }


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> BinaryMetrics:
    """Metrics of `scores` (positive when >= `threshold`) against `labels`, every position counted once."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    return _point(resampled_metrics(np.ones((1, 1)), np.zeros(len(labels), dtype=np.int64), labels, scores,
                                    threshold), threshold)


def _point(rows: dict[str, np.ndarray], threshold: float) -> BinaryMetrics:
    """The metrics of the first row of draws (every chunk drawn once)."""
    tp, fp, tn, fn = (int(round(rows[c][0])) for c in CONFUSION)
    return BinaryMetrics.from_counts(tp, fp, tn, fn, rows["auroc"][0], threshold)


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution (NaN resamples ignored)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return (float(low), float(high))


@dataclass(frozen=True)
class Scorer:
    """Scores of one predictor at every position of a PositionSet (NaN where it was not computed)."""

    scores: np.ndarray
    threshold: float


@dataclass(frozen=True)
class Difference:
    """Paired bootstrap comparison of two scorers on one metric: a minus b."""

    a: ScorerKey
    b: ScorerKey
    metric: str
    difference: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """True when the 95% interval of the difference excludes zero."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"a": str(self.a), "b": str(self.b), "metric": self.metric, "difference": self.difference,
                "low": self.low, "high": self.high, "significant": self.significant}


@dataclass
class Evaluation:
    """Point metrics, bootstrap distributions and intervals of several scorers on several sets."""

    metrics: dict[ScorerKey, dict[str, BinaryMetrics]] = field(default_factory=dict)  # scorer -> set -> metrics
    samples: dict[ScorerKey, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)  # scorer -> set -> metric
    chunks: dict[str, int] = field(default_factory=dict)  # set -> held-out chunks resampled
    resamples: int = 0

    def interval(self, scorer: ScorerKey, subset: str, metric: str) -> tuple[float, float]:
        dist = self.samples.get(scorer, {}).get(subset, {}).get(metric)
        return interval(dist) if dist is not None else (float("nan"), float("nan"))

    def intervals(self, scorer: ScorerKey, subset: str) -> dict[str, tuple[float, float]]:
        return {m: self.interval(scorer, subset, m) for m in INTERVAL_METRICS if self.samples.get(scorer, {}).get(subset)}

    def ratio(self, numerator: ScorerKey, denominator: ScorerKey, subset: str, metric: str = "auroc") -> tuple[float, float, float]:
        """numerator/denominator of a metric (e.g. probe AUROC as a fraction of the model's), paired interval."""
        point = getattr(self.metrics[numerator][subset], metric) / getattr(self.metrics[denominator][subset], metric)
        a = self.samples.get(numerator, {}).get(subset, {}).get(metric)
        b = self.samples.get(denominator, {}).get(subset, {}).get(metric)
        low, high = interval(a / b) if a is not None and b is not None else (float("nan"), float("nan"))
        return float(point), low, high

    def difference(self, a: ScorerKey, b: ScorerKey, subset: str, metric: str) -> Difference:
        point = getattr(self.metrics[a][subset], metric) - getattr(self.metrics[b][subset], metric)
        da = self.samples.get(a, {}).get(subset, {}).get(metric)
        db = self.samples.get(b, {}).get(subset, {}).get(metric)
        low, high = interval(da - db) if da is not None and db is not None else (float("nan"), float("nan"))
        return Difference(a, b, metric, float(point), low, high)


def evaluate(
    scorers: dict[ScorerKey, Scorer],
    labels: np.ndarray,
    chunk: np.ndarray,
    index: dict[str, np.ndarray],
    resamples: int = 1000,
    seed: int = 0,
    only: dict[ScorerKey, tuple[str, ...]] | None = None,
) -> Evaluation:
    """Metrics of every scorer on every set of `index` (set -> position indices), with 95% intervals.

    A scorer is evaluated on a set only where it has finite scores at all of that set's positions
    (and, if `only` names the scorer, only on the sets listed there). All scorers of one set share
    the same chunk resamples, so their differences are paired.
    """
    result = Evaluation(resamples=resamples)
    only = only or {}
    for subset, idx in index.items():
        idx = np.asarray(idx)
        y = labels[idx]
        present = {name: s for name, s in scorers.items() if len(idx) and subset in only.get(name, (subset,))
                   and np.isfinite(s.scores[idx]).all()}
        result.chunks[subset] = int(len(np.unique(chunk[idx])))
        if not present:
            continue
        # One generator per set, seeded independently of the scorers, so every scorer sees the same resamples.
        rng = np.random.default_rng([seed, zlib.crc32(subset.encode())])
        counts, inverse = chunk_counts(chunk[idx], max(resamples, 0), rng)
        # Row 0 draws every chunk once: the set's own metrics, from the same exact counts as the resamples.
        draws = np.vstack([np.ones((1, counts.shape[1])), counts])
        for name, s in present.items():
            rows = resampled_metrics(draws, inverse, y, s.scores[idx], s.threshold)
            result.metrics.setdefault(name, {})[subset] = _point(rows, s.threshold)
            if resamples > 0:
                result.samples.setdefault(name, {})[subset] = {m: rows[m][1:] for m in INTERVAL_METRICS}
    return result


def pairwise_differences(evaluation: Evaluation, names: list[ScorerKey], subset: str, metric: str) -> list[Difference]:
    """Every pair (a, b) of `names` with a before b, each with its paired 95% interval."""
    return [evaluation.difference(a, b, subset, metric)
            for i, a in enumerate(names) for b in names[i + 1:]]
