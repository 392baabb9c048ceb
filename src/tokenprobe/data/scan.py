"""What a scan asks about, and where: its targets (the most frequent tokens of the training chunks, a
file of token strings, or ids) and its positions.

Positions: one natural-ratio sample of the training chunks and one of the held-out chunks, shared by
every target, plus each target's positives (its first ``positives`` in the seeded chunk order of the
training chunks, a quarter as many in the held-out ones, taken from the natural sample first). A
target's training set is its positives and as many negatives drawn from the shared natural sample;
its held-out set the same on the held-out side. The forward pass runs once over the union (the pool),
and each target's positions are then an ordinary run's positions (a PositionSet) over pool rows: the
probe fitting and scoring of `train` run on them unchanged.

A target's positions depend only on the seed, the split and the target itself, never on which other
targets share the scan: scanning ' the' alone or among 100 tokens trains it on the same positions.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenprobe.data.labels import Target, TokenLabeler, resolve_target
from tokenprobe.data.positions import MIN_POSITIVES, PositionSet, Split, _natural
from tokenprobe.errors import TokenprobeError
from tokenprobe.vocabulary import EVAL, SUBSETS, TRAIN

EVAL_SHARE = 4  # a target's held-out positives are at most a quarter of its training ones


def future_tokens(chunks: np.ndarray, offset: int, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, valid): the token `offset` positions ahead of each position (-1 where none), and the
    positions a task with that offset may use (as TokenLabeler's validity mask)."""
    _, valid = TokenLabeler((0,), offset).labels(chunks, has_bos)
    ahead = np.full_like(chunks, -1)
    width = chunks.shape[1]
    if offset < width:
        ahead[:, : width - offset] = chunks[:, offset:]
    return np.where(valid, ahead, -1), valid


def top_tokens(ahead: np.ndarray, train_chunks: np.ndarray, n: int) -> list[int]:
    """The `n` most frequent token ids among the usable positions' `ahead` tokens of the training chunks
    (ties by id)."""
    ids = ahead[train_chunks].ravel()
    ids = ids[ids >= 0]
    if not len(ids):
        return []
    counts = np.bincount(ids)
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(i) for i in order[:n] if counts[i] > 0]


def read_targets_file(path: Path) -> list[str]:
    """One token string per line, kept exactly (leading spaces count; `\\n`, `\\t` and `\\\\` are
    escapes, so a newline token can be named); blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise TokenprobeError(f"--targets-file {path}: file not found; give one token string per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenprobeError(f"--targets-file {path}: cannot read it as UTF-8 text ({exc})") from None
    texts = []
    for line in lines:
        line = line.removesuffix("\r")
        if not line.strip(" "):
            continue
        texts.append(line.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\"))
    if not texts:
        raise TokenprobeError(f"--targets-file {path} names no token; give one token string per line")
    return texts


def resolve_scan_targets(tokenizer, texts: list[str], ids: list[int]) -> list[Target]:
    """Each string (exactly one token, else the error shows how it tokenizes) and each id, in order,
    every token once."""
    targets = [resolve_target(tokenizer, text) for text in texts]
    targets += [resolve_target(tokenizer, "", int(i)) for i in ids]
    seen: dict[int, Target] = {}
    for target in targets:
        if target.token_id in seen:
            raise TokenprobeError(f"target {target.text!r} is token {target.token_id}, already named as "
                                  f"{seen[target.token_id].text!r}: name each token once")
        seen[target.token_id] = target
    return targets


@dataclass
class TargetPositions:
    """One target's positions as pool rows: its training and held-out sets, labelled for it."""

    rows: np.ndarray  # pool rows, training set first
    label: np.ndarray  # bool, per row
    subset: np.ndarray  # int8 index into SUBSETS, per row
    frequency: float  # share of the training chunks' usable positions where the label is positive
    error: str | None = None  # why this target could not be scanned

    def counts(self) -> dict[str, int]:
        train, held = self.subset == SUBSETS.index(TRAIN), self.subset == SUBSETS.index(EVAL)
        return {"train": int(train.sum()), "train_positive": int(self.label[train].sum()),
                "eval": int(held.sum()), "eval_positive": int(self.label[held].sum())}

    def position_set(self, pool: PositionSet) -> PositionSet:
        return PositionSet(chunk=pool.chunk[self.rows], position=pool.position[self.rows], label=self.label.copy(),
                           subset=self.subset.copy())


@dataclass
class ScanPositions:
    pool: PositionSet  # every sampled position once, ordered by (chunk, position); labels unused (False)
    natural: dict[str, int]  # positions of the shared natural samples, by side
    targets: list[TargetPositions]  # in the order of the scan's targets


def _first_positives(labels: np.ndarray, chunks: np.ndarray, cap: int, preferred: np.ndarray) -> np.ndarray:
    """Keys (chunk * width + position) of at most `cap` positives: those among `preferred` keys first,
    then the others in the order of `chunks` (the split's seeded order) and of positions."""
    width = labels.shape[1]
    chunk_index, position = np.nonzero(labels[chunks])
    keys = chunks[chunk_index].astype(np.int64) * width + position
    inside = np.isin(keys, preferred)
    ordered = np.concatenate([keys[inside], keys[~inside]])
    return ordered[:cap]


def sample_scan_positions(ahead: np.ndarray, valid: np.ndarray, target_ids: list[int], split: Split,
                          train_positions: int, eval_positions: int, positives: int, seed: int) -> ScanPositions:
    """The shared natural samples, each target's positions, and the pool (their union); see the module."""
    width = ahead.shape[1]
    per_chunk = max(1, math.ceil(width / 8))
    rng = np.random.default_rng(seed + 1)
    natural = {}
    for side, chunks, count in ((TRAIN, split.train, train_positions), (EVAL, split.eval, eval_positions)):
        rows = _natural(valid, chunks[: math.ceil(count / per_chunk)], per_chunk, rng)
        natural[side] = np.concatenate([c * width + p for c, p in rows]).astype(np.int64) if rows \
            else np.zeros(0, np.int64)
    caps = {TRAIN: positives, EVAL: max(MIN_POSITIVES[EVAL], positives // EVAL_SHARE)}
    usable_train = int(valid[split.train].sum())
    chosen: list[dict[str, tuple[np.ndarray, np.ndarray]] | str] = []
    frequencies = []
    for token_id in target_ids:
        labels = ahead == token_id
        frequencies.append(float(labels[split.train].sum()) / max(1, usable_train))
        target_rng = np.random.default_rng([seed, zlib.crc32(b"scan"), int(token_id)])
        sides: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        problem = None
        for side, chunks in ((TRAIN, split.train), (EVAL, split.eval)):
            found = _first_positives(labels, chunks, caps[side], natural[side])
            if len(found) < MIN_POSITIVES[side]:
                where = "training" if side == TRAIN else "held-out"
                problem = (f"too rare: {len(found)} positive {where} position{'s' if len(found) != 1 else ''} "
                           f"(at least {MIN_POSITIVES[side]} needed)")
                break
            pool = natural[side]
            negatives = pool[~labels.ravel()[pool]]
            negatives = target_rng.choice(negatives, size=min(len(found), len(negatives)), replace=False)
            sides[side] = (np.sort(found), np.sort(negatives))
        chosen.append(problem if problem is not None else sides)
    keys = [natural[TRAIN], natural[EVAL]]
    for entry in chosen:
        if isinstance(entry, dict):
            keys += [part for pair in entry.values() for part in pair]
    pool_keys = np.unique(np.concatenate(keys))
    pool_chunk, pool_position = pool_keys // width, pool_keys % width
    on_train = np.isin(pool_chunk, split.train)
    pool = PositionSet(chunk=pool_chunk, position=pool_position, label=np.zeros(len(pool_keys), bool),
                       subset=np.where(on_train, SUBSETS.index(TRAIN), SUBSETS.index(EVAL)).astype(np.int8))
    targets = []
    for entry, frequency in zip(chosen, frequencies):
        if isinstance(entry, str):
            empty = np.zeros(0, np.int64)
            targets.append(TargetPositions(empty, np.zeros(0, bool), np.zeros(0, np.int8), frequency, entry))
            continue
        rows, label, subset = [], [], []
        for side in (TRAIN, EVAL):
            found, negatives = entry[side]
            both = np.concatenate([found, negatives])
            order = np.argsort(both, kind="stable")
            rows.append(np.searchsorted(pool_keys, both[order]))
            label.append(np.r_[np.ones(len(found), bool), np.zeros(len(negatives), bool)][order])
            subset.append(np.full(len(both), SUBSETS.index(side), np.int8))
        targets.append(TargetPositions(np.concatenate(rows), np.concatenate(label), np.concatenate(subset), frequency))
    return ScanPositions(pool=pool, natural={k: len(v) for k, v in natural.items()}, targets=targets)
