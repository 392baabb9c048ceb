"""Which positions of which chunks the probes see, decided before any forward pass.

Chunks are shuffled with the seed and split into training and held-out chunks, so neighbouring
tokens of one text never sit on both sides. Training positions are balanced per chunk (every
positive and as many random negatives from the same chunk) until the requested count is reached;
the held-out chunks give a natural-class-ratio set and a balanced evaluation set whose negatives are
drawn from the natural set's where it has enough (still a uniform sample of the chunk's negatives),
so the two sets share rows and the baselines' full-vocabulary softmax runs about a quarter fewer
times. Only chunks that hold a sampled position are ever run through the model.
"""

from __future__ import annotations

import logging

import math
from dataclasses import dataclass

import numpy as np

from tokenprobe.errors import TokenprobeError
from tokenprobe.vocabulary import SUBSETS

log = logging.getLogger(__name__)

MIN_POSITIVES = {"train": 8, "eval": 4}


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # chunk indices, in (seeded) random order
    eval: np.ndarray


@dataclass
class PositionSet:
    chunk: np.ndarray  # int64 chunk index
    position: np.ndarray  # int64 position within the chunk
    label: np.ndarray  # bool
    subset: np.ndarray  # int8 index into SUBSETS

    def __len__(self) -> int:
        return len(self.chunk)

    def mask(self, name: str) -> np.ndarray:
        return self.subset == SUBSETS.index(name)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in SUBSETS:
            m = self.mask(name)
            out[name] = {"positions": int(m.sum()), "positive": int(self.label[m].sum()),
                         "chunks": int(len(np.unique(self.chunk[m])))}
        return out


def split_chunks(n_chunks: int, eval_fraction: float, seed: int, max_chunks: int | None = None) -> Split:
    if n_chunks < 2:
        raise TokenprobeError(
            f"the corpus gives {n_chunks} chunk(s); at least 2 are needed (one to train, one to evaluate): "
            "use a larger corpus or a smaller --context-length"
        )
    order = np.random.default_rng(seed).permutation(n_chunks)
    if max_chunks is not None:
        order = order[: max(2, max_chunks)]
    n_eval = min(len(order) - 1, max(1, round(eval_fraction * len(order))))
    return Split(train=order[n_eval:], eval=order[:n_eval])


def _balanced(labels, valid, chunks, want_positive, rng, draw_negatives=True):
    """(chunk, positives, negatives) for chunks in order until `want_positive` positives are found;
    as many random negatives as positives per chunk (none drawn without `draw_negatives`)."""
    rows = []
    found = 0
    for c in chunks:
        if found >= want_positive:
            break
        pos = np.flatnonzero(labels[c] & valid[c])
        if len(pos) == 0:
            continue
        neg = np.flatnonzero(~labels[c] & valid[c])
        if draw_negatives:
            neg = rng.choice(neg, size=min(len(pos), len(neg)), replace=False)
        rows.append((c, pos, neg))
        found += len(pos)
    return rows, found


def _shared_negatives(labels: np.ndarray, valid: np.ndarray, natural: np.ndarray, count: int,
                      rng: np.random.Generator) -> np.ndarray:
    """`count` negatives of one chunk (as many as it has), taken from the natural sample's first.

    The natural sample is uniform, so a uniform subset of its negatives (topped up with a uniform
    subset of the others when it has too few) is still a uniform sample of the chunk's negatives.
    """
    every = np.flatnonzero(~labels & valid)
    count = min(count, len(every))
    shared = natural[~labels[natural]]
    if count <= len(shared):
        return rng.choice(shared, size=count, replace=False)
    rest = np.setdiff1d(every, shared, assume_unique=True)
    return np.concatenate([shared, rng.choice(rest, size=count - len(shared), replace=False)])


def _natural(valid, chunks, per_chunk, rng):
    rows = []
    for c in chunks:
        candidates = np.flatnonzero(valid[c])
        rows.append((c, np.sort(rng.choice(candidates, size=min(per_chunk, len(candidates)), replace=False))))
    return rows


def sample_positions(
    labels: np.ndarray,
    valid: np.ndarray,
    split: Split,
    train_positions: int,
    eval_positions: int,
    balance: str,
    seed: int,
) -> PositionSet:
    rng = np.random.default_rng(seed + 1)
    parts: list[tuple[int, np.ndarray, np.ndarray, int]] = []  # chunk, positions, labels, subset

    def add(subset: str, chunk: int, positions: np.ndarray) -> None:
        parts.append((chunk, positions, labels[chunk, positions], SUBSETS.index(subset)))

    total_train_pos = int((labels[split.train] & valid[split.train]).sum())
    total_eval_pos = int((labels[split.eval] & valid[split.eval]).sum())
    if total_train_pos + total_eval_pos == 0:
        raise TokenprobeError(
            f"the target never occurs in the {valid.sum():,} usable positions of this corpus; "
            "choose another --target or a larger corpus"
        )
    for name, found in (("train", total_train_pos), ("eval", total_eval_pos)):
        if found < MIN_POSITIVES[name]:
            raise TokenprobeError(
                f"the target is too rare to balance: {found} positive positions in the {name} chunks "
                f"(need at least {MIN_POSITIVES[name]}); use a larger corpus (--max-tokens) or a more common target"
            )

    if balance == "positions":
        rows, found = _balanced(labels, valid, split.train, train_positions // 2, rng)
        for c, pos, neg in rows:
            add("train", c, np.sort(np.concatenate([pos, neg])))
        if found < train_positions // 2:
            log.warning(f"only {found} positive training positions exist (asked for {train_positions // 2})")
    else:
        per_chunk = max(1, math.ceil(labels.shape[1] / 8))
        needed = math.ceil(train_positions / per_chunk)
        for c, pos in _natural(valid, split.train[:needed], per_chunk, rng):
            add("train", c, pos)

    rows, found = _balanced(labels, valid, split.eval, eval_positions // 2, rng, draw_negatives=False)
    if found < eval_positions // 2:
        log.warning(f"only {found} positive held-out positions exist (asked for {eval_positions // 2})")
    used = np.asarray([c for c, _, _ in rows])
    natural = _natural(valid, used, max(1, math.ceil(eval_positions / max(1, len(used)))), rng)
    for (c, pos, _), (_, sample) in zip(rows, natural):
        add("eval", c, np.sort(np.concatenate([pos, _shared_negatives(labels[c], valid[c], sample, len(pos), rng)])))
    for c, sample in natural:
        add("eval_natural", c, sample)

    chunk = np.concatenate([np.full(len(p), c, dtype=np.int64) for c, p, _, _ in parts])
    position = np.concatenate([p for _, p, _, _ in parts]).astype(np.int64)
    label = np.concatenate([lab for _, _, lab, _ in parts]).astype(bool)
    subset = np.concatenate([np.full(len(p), s, dtype=np.int8) for _, p, _, s in parts])
    return PositionSet(chunk=chunk, position=position, label=label, subset=subset)
