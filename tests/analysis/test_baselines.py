"""Baselines against direct computations through the full model, and token statistics by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprobe import load_model
from tokenprobe.extract.extract import extract_positions
from tokenprobe.analysis.baselines import choose_threshold, token_statistics
from tokenprobe.data.labels import resolve_target
from tokenprobe.data.positions import PositionSet
from tokenprobe.models.surgery import Unembedding


def _probe_positions(n_chunks: int, length: int) -> PositionSet:
    chunk = np.repeat(np.arange(n_chunks), length - 1)
    position = np.tile(np.arange(1, length), n_chunks)
    return PositionSet(chunk=chunk, position=position, label=np.zeros(len(chunk), bool),
                       subset=np.ones(len(chunk), np.int8))


@pytest.fixture(scope="module")
def loaded_models(tiny_model_dirs):
    return {arch: load_model(str(d), "float32", "cpu") for arch, d in tiny_model_dirs.items()}


def _inputs(loaded, n_chunks=3, length=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(loaded.tokenizer), (n_chunks, length), generator=g)
    return ids


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2", "qwen2"])
def test_logit_lens_equals_final_norm_and_target_row_through_the_model(loaded_models, arch):
    loaded = loaded_models[arch]
    target = resolve_target(loaded.tokenizer, " the").token_id
    ids = _inputs(loaded)
    positions = _probe_positions(*ids.shape)
    layers = list(range(loaded.num_layers + 1))
    acts, _ = extract_positions(loaded, ids.numpy(), positions, layers, batch_size=2, progress=False)
    unembed = Unembedding.of(loaded.model)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_hidden_states=True)
        head = loaded.model.get_output_embeddings()
        norm = unembed.norm
        for i, layer in enumerate(layers):
            got = unembed.target_logit(acts.values[i], target)
            if layer == loaded.num_layers:  # transformers reports the last layer after the final norm
                direct = out.logits[positions.chunk, positions.position, target]
            else:
                hidden = out.hidden_states[layer][positions.chunk, positions.position]
                direct = head(norm(hidden))[:, target]
            np.testing.assert_allclose(got, direct.double().numpy(), rtol=1e-4, atol=1e-4)
    assert np.std(got) > 0  # a real signal, not a constant


@pytest.mark.parametrize("arch,softcap", [("gemma3", None), ("gemma3", 0.05), ("llama", None), ("gpt2", None)])
def test_model_probability_equals_softmax_of_full_model_logits(loaded_models, arch, softcap):
    loaded = loaded_models[arch]
    config = loaded.model.config
    old = getattr(config, "final_logit_softcapping", None)
    if arch == "gemma3":
        config.final_logit_softcapping = softcap
    try:
        target = resolve_target(loaded.tokenizer, " the").token_id
        ids = _inputs(loaded)
        positions = _probe_positions(*ids.shape)
        acts, _ = extract_positions(loaded, ids.numpy(), positions, [loaded.num_layers], batch_size=2, progress=False)
        unembed = Unembedding.of(loaded.model)
        assert unembed.softcap == softcap
        got = unembed.target_probability(acts.values[0], target, batch=7)
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits
        direct = torch.softmax(logits.double(), dim=-1)[positions.chunk, positions.position, target].numpy()
        np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-7)
        # The normaliser summed over many vocabulary blocks (the last one partial) gives the same.
        blocked = unembed.target_probability(acts.values[0], target, batch=5, vocab_block=13)
        np.testing.assert_allclose(blocked, direct, rtol=1e-4, atol=1e-7)
        assert unembed.weight.shape[0] % 13 != 0
        if softcap:  # a cap small enough to matter for the tiny model's small logits
            uncapped = torch.softmax(torch.nn.functional.linear(unembed.normed(acts.values[0]), unembed.weight)
                                     .double(), dim=-1)[:, target].numpy()
            assert (np.abs(uncapped - got) / got).max() > 0.01
    finally:
        config.final_logit_softcapping = old


def test_token_statistics_by_hand():
    chunks = np.array([[0, 5, 7, 5, 7, 5, 9],
                       [0, 5, 9, 7, 5, 7, 1],
                       [0, 7, 7, 7, 7, 7, 7]])  # chunk 2 is held out: its counts must not be used
    labels = np.zeros_like(chunks, bool)
    labels[:, :-1] = chunks[:, 1:] == 7  # next token is 7
    valid = np.ones_like(chunks, bool)
    valid[:, 0] = valid[:, -1] = False
    table = token_statistics(chunks, labels, valid, np.array([0, 1]), prior_strength=0.0)
    # Training positions 1..5 of chunks 0 and 1: token 5 is followed by 7 at (0,1), (0,3), (1,4); not at
    # (0,5) (9 follows) or (1,1) (9 follows): 3 of 5. Token 7: (0,2)->5, (0,4)->5, (1,3)->5, (1,5)->1: 0 of 4.
    # Token 9: (1,2)->7: 1 of 1.
    assert table[5] == pytest.approx(3 / 5)
    assert table[7] == pytest.approx(0.0)
    assert table[9] == pytest.approx(1.0)
    # With a pseudo-count, unseen ids get the overall rate (4 of 10) and rare ids are pulled towards it.
    smoothed = token_statistics(chunks, labels, valid, np.array([0, 1]), prior_strength=1.0)
    assert smoothed[1] == pytest.approx(0.4)
    assert smoothed[9] == pytest.approx((1 + 0.4) / 2)


def test_threshold_maximises_balanced_accuracy_on_training_scores():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1], bool)
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.6, 0.9, 0.7, 0.8])
    threshold = choose_threshold(labels, scores)
    predicted = scores >= threshold
    best = 0.5 * (predicted[labels].mean() + (~predicted[~labels]).mean())
    for t in np.unique(scores):
        p = scores >= t
        assert 0.5 * (p[labels].mean() + (~p[~labels]).mean()) <= best + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_threshold_is_the_best_point_of_sklearns_roc_curve(seed):
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + labels * 0.3, 1 + seed % 3)  # coarse scores: ties across classes
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    j = tpr - fpr
    threshold = choose_threshold(labels, scores)
    predicted = scores >= threshold
    assert predicted[labels].mean() - predicted[~labels].mean() == pytest.approx(j.max(), abs=1e-12)
    assert threshold == thresholds[int(np.argmax(j))]


def test_model_probability_runs_once_per_position_shared_by_two_sets(loaded_models, monkeypatch):
    """A (chunk, position) in both held-out sets gets the full softmax once, and the same score in both."""
    from types import SimpleNamespace

    from tokenprobe.analysis import baselines
    from tokenprobe.data.labels import make_labeler
    from tokenprobe.vocabulary import MODEL, SUBSETS, baseline_key

    loaded = loaded_models["llama"]
    target = resolve_target(loaded.tokenizer, " the").token_id
    ids = _inputs(loaded, n_chunks=4, length=16).numpy()
    labels, valid = make_labeler("next", [target]).labels(ids, has_bos=False)
    chunk = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3])  # chunks 0-1 train; 2-3 held out, where rows repeat
    position = np.array([3, 4, 5, 6, 7, 8, 7, 9, 9])
    subset = np.array([SUBSETS.index(s) for s in ("train",) * 4 + ("eval", "eval", "eval_natural",
                                                                    "eval", "eval_natural")], np.int8)
    positions = PositionSet(chunk=chunk, position=position, label=labels[chunk, position], subset=subset)
    positions.label[[0, 4]] = True  # both classes in training and held out (labels of these rows only matter here)
    acts, _ = extract_positions(loaded, ids, positions, [loaded.num_layers], batch_size=2, progress=False)
    seen = []
    original = Unembedding.target_probability

    def spy(self, hidden, target_id, **kwargs):
        seen.append(len(hidden))
        return original(self, hidden, target_id, **kwargs)

    monkeypatch.setattr(Unembedding, "target_probability", spy)
    prepared = SimpleNamespace(positions=positions, chunks=ids, labels=labels, valid=valid,
                               split=SimpleNamespace(train=np.array([0, 1])), target=SimpleNamespace(token_ids=(target,)))
    made = baselines.compute_baselines(loaded, prepared, acts, [], seed=0)
    scores = made.scorers[baseline_key(MODEL)].scores
    # Held out: 5 rows, 3 distinct positions; threshold sample: 3 training rows (as many as the balanced set).
    assert made.info["model_threshold_positions"] == 3 and seen == [3 + 3] and made.info["model_positions"] == 6
    assert scores[4] != scores[5] and scores[4] == scores[6] and scores[7] == scores[8]
    assert np.isfinite(scores[4:]).all()
