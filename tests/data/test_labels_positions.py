"""Labels for both tasks, target resolution, and the balanced, chunk-split sampling of positions."""

from __future__ import annotations

import numpy as np
import pytest

from tokenprobe.errors import TokenprobeError
from tokenprobe.data.labels import make_labeler, resolve_target
from tokenprobe.data.positions import sample_positions, split_chunks

T = 7  # target id in these hand-made chunks


def test_next_task_labels_look_one_ahead():
    chunks = np.array([[2, 5, T, 6, T, 9]])
    labels, valid = make_labeler("next", [T]).labels(chunks, has_bos=True)
    assert labels.tolist() == [[False, True, False, True, False, False]]
    assert valid.tolist() == [[False, True, True, True, True, False]]  # BOS and the last position unused


def test_current_task_labels_are_the_token_itself():
    chunks = np.array([[2, 5, T, 6, T, 9]])
    labels, valid = make_labeler("current", [T]).labels(chunks, has_bos=True)
    assert labels.tolist() == [[False, False, True, False, True, False]]
    assert valid.tolist() == [[False, True, True, True, True, True]]
    _, valid = make_labeler("current", [T]).labels(chunks, has_bos=False)
    assert valid.all()


def test_resolve_target(tiny_model_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    target = resolve_target(tok, " the")
    assert tok.decode([target.token_id]) == " the"
    with pytest.raises(TokenprobeError, match=r"is \d+ tokens .*--target-id"):
        resolve_target(tok, " antidisestablishment")
    assert resolve_target(tok, "ignored", token_id=target.token_id).text == " the"
    with pytest.raises(TokenprobeError, match="empty"):
        resolve_target(tok, "")
    with pytest.raises(TokenprobeError, match="out of range"):
        resolve_target(tok, "", token_id=10**6)


def _random_chunks(n=200, length=64, rate=0.08, seed=0):
    rng = np.random.default_rng(seed)
    chunks = rng.integers(10, 100, size=(n, length))
    chunks[rng.random((n, length)) < rate] = T
    chunks[:, 0] = 2
    return chunks


def test_split_is_by_chunk_and_deterministic():
    a = split_chunks(100, 0.2, seed=3)
    b = split_chunks(100, 0.2, seed=3)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.eval, b.eval)
    assert len(a.eval) == 20 and not set(a.train) & set(a.eval)
    assert sorted(np.concatenate([a.train, a.eval])) == list(range(100))
    capped = split_chunks(100, 0.2, seed=3, max_chunks=10)
    assert len(capped.train) + len(capped.eval) == 10


def test_balanced_training_and_natural_eval():
    chunks = _random_chunks()
    labels, valid = make_labeler("next", [T]).labels(chunks, has_bos=True)
    split = split_chunks(len(chunks), 0.25, seed=0)
    ps = sample_positions(labels, valid, split, train_positions=400, eval_positions=300, balance="positions", seed=0)
    train, ev, nat = ps.mask("train"), ps.mask("eval"), ps.mask("eval_natural")
    assert ps.label[train].sum() == (~ps.label[train]).sum() >= 200  # exactly 50/50
    assert ps.label[ev].sum() == (~ps.label[ev]).sum() >= 150
    # No chunk is on both sides of the split.
    assert not set(ps.chunk[train]) & (set(ps.chunk[ev]) | set(ps.chunk[nat]))
    assert set(ps.chunk[train]) <= set(split.train) and set(ps.chunk[ev]) <= set(split.eval)
    # The natural set keeps the corpus's class ratio (about 8% here), far from 50%.
    rate = ps.label[nat].mean()
    assert 0.03 < rate < 0.15
    # Every sampled position is valid and carries its true label.
    assert valid[ps.chunk, ps.position].all()
    assert np.array_equal(labels[ps.chunk, ps.position], ps.label)
    # Only as many chunks as needed are used (far fewer than all 150 training chunks).
    assert len(set(ps.chunk[train])) < len(split.train)


def test_unbalanced_training_keeps_natural_ratio():
    chunks = _random_chunks()
    labels, valid = make_labeler("next", [T]).labels(chunks, has_bos=True)
    ps = sample_positions(labels, valid, split_chunks(len(chunks), 0.25, 0), 400, 300, "none", 0)
    assert ps.label[ps.mask("train")].mean() < 0.2


def test_target_absent_or_too_rare_is_an_error():
    chunks = _random_chunks(rate=0.0)
    labels, valid = make_labeler("next", [T]).labels(chunks, has_bos=True)
    with pytest.raises(TokenprobeError, match="never occurs"):
        sample_positions(labels, valid, split_chunks(len(chunks), 0.25, 0), 100, 100, "positions", 0)
    chunks[5, 10] = T
    labels, valid = make_labeler("next", [T]).labels(chunks, has_bos=True)
    with pytest.raises(TokenprobeError, match="too rare"):
        sample_positions(labels, valid, split_chunks(len(chunks), 0.25, 0), 100, 100, "positions", 0)


@pytest.mark.parametrize("rate,eval_positions", [(0.08, 600), (0.5, 40)])
def test_balanced_held_out_negatives_come_from_the_natural_sample(rate, eval_positions):
    chunks = _random_chunks(n=400, rate=rate)
    labels, valid = make_labeler("next", [T]).labels(chunks, has_bos=True)
    split = split_chunks(len(chunks), 0.25, seed=0)
    ps = sample_positions(labels, valid, split, 400, eval_positions, "positions", seed=0)
    ev, nat = ps.mask("eval"), ps.mask("eval_natural")
    assert ps.label[ev].sum() == (~ps.label[ev]).sum()
    natural = set(zip(ps.chunk[nat], ps.position[nat]))
    negatives = list(zip(ps.chunk[ev & ~ps.label], ps.position[ev & ~ps.label]))
    assert len(set(negatives)) == len(negatives)  # no negative twice
    # Per chunk, the balanced negatives are natural ones as far as the natural sample has negatives;
    # the rest are topped up from the chunk's other negatives.
    topped_up = 0
    for c in np.unique(ps.chunk[ev]):
        wanted = int((ev & ~ps.label & (ps.chunk == c)).sum())
        available = int((nat & ~ps.label & (ps.chunk == c)).sum())
        assert sum(key in natural for key in negatives if key[0] == c) == min(wanted, available)
        topped_up += wanted > available
    if rate < 0.1:  # ~5 positives per chunk against ~9 natural negatives: nearly all shared
        assert sum(key in natural for key in negatives) > 0.95 * len(negatives) > 100
    else:  # ~32 positives per chunk against ~20 natural negatives: topped up
        assert topped_up > 0


def test_shared_negatives_are_a_uniform_sample_of_the_chunk():
    """Over many seeds every negative of a chunk is drawn equally often (the sharing adds no bias)."""
    labels = np.zeros(64, bool)
    labels[[5, 20, 21, 40, 41, 42, 60]] = True
    valid = np.ones(64, bool)
    valid[0] = False
    from tokenprobe.data.positions import _shared_negatives

    counts = np.zeros(64)
    draws = 4000
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        natural = np.sort(rng.choice(np.flatnonzero(valid), size=10, replace=False))
        counts[_shared_negatives(labels, valid, natural, 7, rng)] += 1
    negatives = np.flatnonzero(~labels & valid)
    assert counts[~(~labels & valid)].sum() == 0
    expected = draws * 7 / len(negatives)  # about 500 per negative
    assert np.abs(counts[negatives] - expected).max() < 0.2 * expected


SHORT_OF_POSITIVES = """
import numpy as np
from tokenprobe.data.positions import sample_positions, split_chunks
rng = np.random.default_rng(0)
labels = rng.random((60, 64)) < 0.05
valid = np.ones_like(labels)
sample_positions(labels, valid, split_chunks(60, 0.2, 0), 100_000, 100_000, "positions", 0)
print("done")
"""


def test_a_short_supply_is_a_logged_warning_without_source_lines():
    """Python users get tokenprobe's warnings through `logging` (stderr by default, one plain line,
    no file and line); the CLI prints the same as `warning: ...`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SHORT_OF_POSITIVES], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "positive training positions exist" in lines[0] and "positive held-out positions exist" in lines[1]
    assert all(line.startswith("only ") and ".py" not in line and "Warning" not in line for line in lines), lines


def test_warnings_can_be_silenced_the_logging_way(caplog):
    import logging

    rng = np.random.default_rng(0)
    labels = rng.random((60, 64)) < 0.05
    with caplog.at_level(logging.WARNING, logger="tokenprobe"):
        sample_positions(labels, np.ones_like(labels), split_chunks(60, 0.2, 0), 100_000, 100_000, "positions", 0)
    assert [r.name for r in caplog.records] == ["tokenprobe.data.positions"] * 2
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_control_labels_are_a_function_of_the_token_type_at_the_asked_rate():
    from tokenprobe.data.labels import ControlTask

    ids = np.random.default_rng(3).integers(0, 50_000, size=(400, 64))
    control = ControlTask(rate=0.3, seed=7)
    labels = control.labels_of(ids)
    assert labels.shape == ids.shape
    # a function of the type: every occurrence of one id has one label, in any order and any shape
    by_type = {}
    for token, label in zip(ids.ravel(), labels.ravel()):
        assert by_type.setdefault(int(token), bool(label)) == bool(label)
    assert np.array_equal(control.labels_of(ids.ravel()[::-1]), labels.ravel()[::-1])
    # the rate over types (not positions) is the asked one, within sampling noise of ~22k types
    types = np.array(sorted(by_type))
    assert abs(control.labels_of(types).mean() - 0.3) < 0.015
    # another seed draws other labels; the same seed the same
    assert (ControlTask(0.3, 8).labels_of(types) != control.labels_of(types)).mean() > 0.3
    assert np.array_equal(ControlTask(0.3, 7).labels_of(types), control.labels_of(types))
    assert ControlTask(0.5, 7).labels_of(types).mean() == pytest.approx(0.5, abs=0.015)
