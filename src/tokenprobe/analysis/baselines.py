"""What a probe's score should be compared with, on the same held-out positions.

- ``model``: the probability the model's own output gives the target (final norm, full
  unembedding, final-logit softcapping where the config has it, softmax over the vocabulary). The
  full vocabulary is computed only at the held-out positions (once per position, though the
  balanced and natural sets share many), plus a sample of training positions used to choose its
  threshold (as many as the balanced held-out set, at most 1,000: balanced accuracy is flat near its
  best threshold), in tiles: never for every token.
- ``logit_lens`` at each probed layer: that layer's residual through the final norm and ONLY the
  target's unembedding row (a logit, not a probability: normalising it would need every row).
- ``token_stats``: P(label | current token id), counted over every usable position of the training
  chunks. A probe that does not beat it has learned nothing beyond the bigram.
- ``majority``: always the training set's majority class.

Every baseline's threshold is the one that maximises balanced accuracy on the training positions.
``--baselines`` may ask for a subset (``model``, ``lens``, ``stats``; the majority class comes with any
of them): only ``model`` needs the last layer, so a run without it need not load the deeper blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch

from tokenprobe.analysis.bootstrap import Scorer
from tokenprobe.config import BASELINE_KINDS
from tokenprobe.data.positions import PositionSet
from tokenprobe.data.prepare import Prepared
from tokenprobe.extract.sinks import ActivationSource
from tokenprobe.models.loading import LoadedModel
from tokenprobe.models.surgery import Unembedding
from tokenprobe.vocabulary import (
    EVAL,
    EVAL_NATURAL,
    LOGIT_LENS,
    MAJORITY,
    MODEL,
    TOKEN_STATS,
    TRAIN,
    ScorerKey,
    baseline_key,
    lens_key,
)

DESCRIPTIONS = {
    MODEL: "the model's own probability of the target (full softmax, held-out positions only)",
    LOGIT_LENS: "the layer's residual through the final norm and the target's unembedding row",
    TOKEN_STATS: "P(label | current token id) counted on the training chunks",
    MAJORITY: "always the training set's majority class",
}
THRESHOLD_POSITIONS = 1000  # at most this many training positions get the model's full softmax, for its threshold


def choose_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold (predict positive when score >= it) that maximises balanced accuracy.

    Balanced accuracy at a threshold is (TPR + 1 - FPR) / 2, so this is the point of the ROC curve
    farthest above the diagonal (the highest threshold among ties), found from one sort and the
    cumulative class counts at each distinct score. Equal to the best threshold on
    ``sklearn.metrics.roc_curve`` (tested), without the 2 s that importing scikit-learn costs every run.
    """
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("inf") if not labels.any() else float("-inf")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ordered, positive = scores[order], labels[order]
    last_of_score = np.r_[ordered[1:] != ordered[:-1], True]  # predict positive down to each distinct score
    tpr = np.cumsum(positive)[last_of_score] / positive.sum()
    fpr = np.cumsum(~positive)[last_of_score] / (~positive).sum()
    return float(ordered[last_of_score][int(np.argmax(tpr - fpr))])


def token_statistics(chunks: np.ndarray, labels: np.ndarray, valid: np.ndarray, train_chunks: np.ndarray,
                     prior_strength: float = 1.0) -> np.ndarray:
    """P(label | current token id) per token id, counted over the usable positions of the training chunks.

    Ids never seen in training get the overall rate; rare ids are pulled towards it with
    `prior_strength` pseudo-counts.
    """
    ids = chunks[train_chunks][valid[train_chunks]]
    hits = labels[train_chunks][valid[train_chunks]].astype(np.float64)
    size = int(chunks.max()) + 1
    n = np.bincount(ids, minlength=size).astype(np.float64)
    k = np.bincount(ids, weights=hits, minlength=size)
    prior = hits.mean() if len(hits) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n + prior_strength > 0, (k + prior_strength * prior) / (n + prior_strength), prior)


@dataclass
class BaselineSet:
    """Every baseline as a Scorer over all positions of the PositionSet, and how each was made."""

    scorers: dict[ScorerKey, Scorer]
    info: dict[str, object]


def model_rows(positions: PositionSet, usable: np.ndarray, seed: int = 0,
               threshold_positions: int = THRESHOLD_POSITIONS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The positions where the model's own probability is computed: (rows, sample, first).

    `rows`: the held-out positions plus `sample`, a seeded sample of training positions for the
    threshold, as many as the balanced held-out set has, at most `threshold_positions`. `first`
    indexes one row of each distinct (chunk, position) of `rows` (the balanced and natural sets share
    rows): the full softmax runs at ``rows[first]`` only.
    """
    train = positions.mask(TRAIN) & usable
    held_out = (positions.mask(EVAL) | positions.mask(EVAL_NATURAL)) & usable
    train_rows = np.flatnonzero(train)
    rng = np.random.default_rng(seed + 7)
    size = min(threshold_positions, len(train_rows), int((positions.mask(EVAL) & usable).sum()))
    sample = np.sort(rng.choice(train_rows, size=size, replace=False))
    rows = np.union1d(np.flatnonzero(held_out), sample)
    keys = positions.chunk[rows] * (int(positions.position.max()) + 1) + positions.position[rows]
    _, first = np.unique(keys, return_index=True)
    return rows, sample, first


def baseline_kinds(baselines: bool | Collection[str]) -> tuple[str, ...]:
    """What `score_run`'s `baselines` asks for: True all of BASELINE_KINDS, False none, else those named."""
    if isinstance(baselines, bool):
        return BASELINE_KINDS if baselines else ()
    return tuple(kind for kind in BASELINE_KINDS if kind in baselines)


def compute_baselines(loaded: LoadedModel, prepared: Prepared, source: ActivationSource, probed_layers: list[int],
                      seed: int = 0, model_probability: Callable[[np.ndarray], np.ndarray] | None = None,
                      threshold_positions: int = THRESHOLD_POSITIONS,
                      kinds: Collection[str] = BASELINE_KINDS) -> BaselineSet:
    """Baseline scores at every position of the prepared positions (NaN where not computed).

    `kinds`: which of ``model``, ``lens`` and ``stats`` (BASELINE_KINDS) to compute; the majority class
    comes with any of them. `source` must hold every probed layer, and for ``model`` the last layer
    (``loaded.num_layers``); its `keep` marks positions whose batch was finite. `model_probability`,
    given position rows, returns the model's own probability of the target there (a scan computes it
    for every target at once); by default it is computed here from the last layer.
    """
    positions, usable, target_id = prepared.positions, source.keep, prepared.target.token_ids
    n = len(positions)
    train = positions.mask(TRAIN) & usable
    held_out = (positions.mask(EVAL) | positions.mask(EVAL_NATURAL)) & usable
    scorers: dict[ScorerKey, Scorer] = {}
    info: dict[str, object] = {"descriptions": DESCRIPTIONS}
    if list(kinds) != list(BASELINE_KINDS):
        info["kinds"] = list(kinds)  # a subset (--baselines): the record says which
    unembed = Unembedding.of(loaded.model) if "model" in kinds or "lens" in kinds else None
    if unembed is not None:
        info.update(final_logit_softcapping=unembed.softcap,
                    final_norm=type(unembed.norm).__name__ if unembed.norm is not None else None)

    def scorer(scores: np.ndarray) -> Scorer:
        return Scorer(scores=scores, threshold=choose_threshold(positions.label[train], scores[train]))

    for layer in probed_layers if "lens" in kinds else ():
        scores = np.full(n, np.nan)
        rows = np.flatnonzero(train | held_out)
        scores[rows] = unembed.target_logit(source.layer(layer)[torch.from_numpy(rows)], target_id)
        scorers[lens_key(layer)] = scorer(scores)

    if "model" in kinds:
        # The model's own probability: held-out positions (each (chunk, position) once), plus a seeded
        # sample of training positions for the threshold (see model_rows).
        rows, sample, first = model_rows(positions, usable, seed, threshold_positions)
        keys = positions.chunk[rows] * (int(positions.position.max()) + 1) + positions.position[rows]
        inverse = np.searchsorted(keys[first], keys) if len(rows) else np.zeros(0, dtype=np.int64)
        scores = np.full(n, np.nan)
        if model_probability is not None:
            scores[rows] = model_probability(rows[first])[inverse]
        else:
            unique = torch.from_numpy(rows[first])
            scores[rows] = unembed.target_probability(source.layer(loaded.num_layers)[unique], target_id)[inverse]
        threshold = choose_threshold(positions.label[sample], scores[sample])
        scorers[baseline_key(MODEL)] = Scorer(scores=scores, threshold=threshold)
        info["model_threshold_positions"] = int(len(sample))
        info["model_positions"] = int(len(first))

    if "stats" in kinds:
        chunks = prepared.chunks
        table = token_statistics(chunks, prepared.labels, prepared.valid, prepared.split.train)
        scorers[baseline_key(TOKEN_STATS)] = scorer(table[chunks[positions.chunk, positions.position]])

    majority = float(positions.label[train].mean() > 0.5)
    scorers[baseline_key(MAJORITY)] = Scorer(scores=np.full(n, majority), threshold=0.5)
    info["majority_class"] = int(majority)
    return BaselineSet(scorers=scorers, info=info)
