"""A scan's targets and positions on hand-made chunks: the future token of each task, the most frequent
tokens, a targets file, and each target's balanced positions drawn from one shared pool."""

from __future__ import annotations

import numpy as np
import pytest

from tokenprobe.data.labels import TokenLabeler
from tokenprobe.data.positions import Split
from tokenprobe.data.scan import future_tokens, read_targets_file, sample_scan_positions, top_tokens
from tokenprobe.errors import TokenprobeError
from tokenprobe.vocabulary import EVAL, SUBSETS, TRAIN


def test_future_tokens_match_every_tasks_labels():
    chunks = np.array([[9, 1, 2, 3, 1, 2], [9, 2, 2, 1, 3, 3]])
    for offset in (0, 1, 3):
        ahead, valid = future_tokens(chunks, offset, has_bos=True)
        for token in (1, 2, 3):
            labels, valid_t = TokenLabeler((token,), offset).labels(chunks, has_bos=True)
            assert (valid == valid_t).all()
            assert ((ahead == token) == (labels & valid)).all()
        assert (ahead[~valid] == -1).all() and not valid[:, 0].any()  # BOS is never used
    ahead, valid = future_tokens(chunks, 3, has_bos=True)
    assert ahead[0].tolist() == [-1, 1, 2, -1, -1, -1]  # the last 3 positions have no token 3 ahead


def test_top_tokens_counts_the_training_chunks_only():
    ahead = np.array([[5, 5, 5, 7], [7, 7, 7, 7], [8, 8, 8, -1]])
    assert top_tokens(ahead, np.array([0, 2]), 2) == [5, 8]  # chunk 1 (all 7s) is held out
    assert top_tokens(ahead, np.array([0, 1, 2]), 5) == [7, 5, 8]  # ties and fewer tokens than asked


def test_targets_file_keeps_spaces_and_escapes(tmp_path):
    path = tmp_path / "targets.txt"
    path.write_text(" the\n\n,\n\\n\nback\\\\slash\r\n", encoding="utf-8")
    assert read_targets_file(path) == [" the", ",", "\n", "back\\slash"]
    with pytest.raises(TokenprobeError, match="file not found"):
        read_targets_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TokenprobeError, match="names no token"):
        read_targets_file(tmp_path / "empty.txt")


def _corpus(seed=0, chunks=60, width=16, vocab=12):
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.6, size=(chunks, width)) % vocab
    ids[:, 0] = 99  # BOS
    return ids


def test_each_target_is_balanced_from_the_shared_pool_and_its_own_positives():
    chunks = _corpus()
    ahead, valid = future_tokens(chunks, 1, has_bos=True)
    split = Split(train=np.arange(10, 60)[::-1].copy(), eval=np.arange(10))
    ids = top_tokens(ahead, split.train, 5)
    scan = sample_scan_positions(ahead, valid, ids, split, train_positions=200, eval_positions=80, positives=30,
                                 seed=3)
    pool = scan.pool
    keys = pool.chunk * chunks.shape[1] + pool.position
    assert (np.diff(keys) > 0).all()  # every position once, in order
    assert valid[pool.chunk, pool.position].all()
    assert (np.isin(pool.chunk, split.train) == (pool.subset == SUBSETS.index(TRAIN))).all()
    for token, where in zip(ids, scan.targets):
        assert where.error is None
        positions = where.position_set(pool)
        assert (positions.label == (ahead[positions.chunk, positions.position] == token)).all()
        for side, cap in ((TRAIN, 30), (EVAL, 7)):
            mask = positions.mask(side)
            positives = int(positions.label[mask].sum())
            assert positives == min(cap, int((ahead[split.train if side == TRAIN else split.eval] == token).sum()))
            assert int((~positions.label[mask]).sum()) <= positives  # no more negatives than positives
            assert np.isin(positions.chunk[mask], split.train if side == TRAIN else split.eval).all()
        assert where.counts()["train_positive"] == int(positions.label[positions.mask(TRAIN)].sum())
    # A target's positions do not depend on the other targets of the scan
    alone = sample_scan_positions(ahead, valid, [ids[2]], split, 200, 80, 30, seed=3)
    one, same = scan.targets[2], alone.targets[0]
    for a, b in ((one.position_set(scan.pool), same.position_set(alone.pool)),):
        assert (a.chunk == b.chunk).all() and (a.position == b.position).all() and (a.label == b.label).all()
    # The negatives come from the natural sample, which is shared: their union is much smaller than the sum
    negatives = [set(w.rows[~w.label]) for w in scan.targets]
    assert len(set.union(*negatives)) < sum(len(n) for n in negatives)


def test_a_target_too_rare_is_reported_not_scanned():
    chunks = _corpus()
    chunks[5, 7] = 50  # one occurrence, in a held-out chunk
    ahead, valid = future_tokens(chunks, 0, has_bos=True)
    split = Split(train=np.arange(10, 60), eval=np.arange(10))
    scan = sample_scan_positions(ahead, valid, [50, 1], split, 200, 80, 30, seed=0)
    assert scan.targets[0].error == "too rare: 0 positive training positions (at least 8 needed)"
    assert len(scan.targets[0].rows) == 0 and scan.targets[1].error is None


def test_a_byte_token_found_by_frequency_is_named_by_its_spelling():
    from tokenprobe.pipelines.scan import frequent_target

    class Bytes:  # a tokenizer whose token 7 is one byte of a multi-byte character
        def decode(self, ids):
            return {7: "\ufffd", 8: " the"}[ids[0]]

        def convert_ids_to_tokens(self, i):
            return {7: "<0xE2>", 8: "\u2581the"}[i]

    assert frequent_target(Bytes(), 7).text == "<0xE2>"
    assert frequent_target(Bytes(), 8).text == " the" and frequent_target(Bytes(), 8).token == "\u2581the"
