"""The MLP probe: it learns what a linear probe provably cannot (XOR), matches linear on linear problems,
is deterministic for a seed, early-stops on training chunks set aside only, and round-trips through
the probe file format (and refuses other models)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tokenprobe.errors import TokenprobeError
from tokenprobe.probes import base, mlp
from tokenprobe.probes.base import ModelIdentity, ProbeMeta, load_probe, read_probe_meta, save_probe
from tokenprobe.probes.linear import LinearProbe
from tokenprobe.probes.mlp import MLPProbe, fit_mlp_probes
from tokenprobe.probes.selection import validation_split


def _balanced_accuracy(proba: torch.Tensor, y: torch.Tensor) -> float:
    predicted, y = proba >= 0.5, y > 0.5
    return 0.5 * (float((predicted & y).sum()) / float(y.sum()) + float((~predicted & ~y).sum()) / float((~y).sum()))


def _xor(n: int, d: int = 64, seed: int = 1):
    """Labels: the XOR of the signs of two orthogonal directions. Every linear function of x is
    uncorrelated with them (the problem is symmetric under x -> -x along either direction)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
    y = ((x @ q[:, 0] > 0) ^ (x @ q[:, 1] > 0)).float()
    return x * torch.linspace(0.5, 4, d) + 10, y  # badly scaled and offset, as residual streams are


def _linear(n: int, d: int = 32, noise: float = 0.0, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-1, 1, d) + 3
    w = torch.randn(d, generator=g) / torch.logspace(-1, 1, d)
    s = (x - 3) @ w / math.sqrt(d)
    return x, (s + noise * torch.randn(n, generator=g) > 0.2).float()


def _meta(hidden: int, fit: dict | None = None) -> ProbeMeta:
    return ProbeMeta(kind="mlp", layer=3, task="next", target=" the", target_ids=[7],
                     model=ModelIdentity("m", "/models/m", "w" * 64, "t" * 64, hidden), context_length=32,
                     dtype="float32", run_name="probe-layer3", tokenprobe_version="0", fit=dict(fit or {}),
                     config={"seed": 0}, corpus={"name": "c", "sha256": "s"})


def test_mlp_learns_xor_where_a_linear_probe_cannot():
    x, y = _xor(12000)
    train, test = slice(0, 8000), slice(8000, None)
    groups = torch.arange(8000) // 10  # chunks of 10 positions
    probe = MLPProbe().fit(x[train], y[train], groups=groups)
    linear = LinearProbe().fit(x[train], y[train], groups=groups)
    assert _balanced_accuracy(probe.predict_proba(x[test]), y[test]) > 0.9
    assert abs(_balanced_accuracy(linear.predict_proba(x[test]), y[test]) - 0.5) < 0.05
    assert probe.fit_info["validation_balanced_accuracy"] > 0.9
    assert probe.direction() is None


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_mlp_matches_linear_on_a_linear_problem(noise):
    x, y = _linear(6000, noise=noise)
    train, test = slice(0, 4000), slice(4000, None)
    groups = torch.arange(4000) // 10
    mlp_score = _balanced_accuracy(MLPProbe().fit(x[train], y[train], groups=groups).predict_proba(x[test]), y[test])
    linear_score = _balanced_accuracy(LinearProbe().fit(x[train], y[train], groups=groups).predict_proba(x[test]),
                                      y[test])
    assert mlp_score > linear_score - 0.03
    assert mlp_score > (0.95 if noise == 0 else 0.75)


def test_fits_are_deterministic_for_a_seed_and_leave_global_random_state_alone():
    x, y = _linear(1500, noise=0.5)
    groups = torch.arange(1500) // 10
    x_before = x.clone()
    state = torch.get_rng_state()
    a = MLPProbe().fit(x, y, groups=groups, seed=3)
    b = MLPProbe().fit(x, y, groups=groups, seed=3)
    c = MLPProbe().fit(x, y, groups=groups, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # drew nothing from the global generator
    assert torch.equal(x, x_before)  # the caller's hidden states are not standardised in place
    assert all(torch.equal(ta, tb) for ta, tb in zip(a.tensors().values(), b.tensors().values(), strict=True))
    assert a.fit_info == b.fit_info
    assert not torch.equal(a.hidden_weight, c.hidden_weight)


def test_rows_bfloat16_views_and_several_layers():
    x, y = _linear(1200, noise=0.5)
    extra = torch.randn(300, x.shape[1]) + 3
    every = torch.cat([extra[:100], x, extra[100:]])  # the training rows sit among others
    rows = torch.arange(100, 1300)
    groups = torch.arange(1200) // 10
    gathered = fit_mlp_probes([x, 2 * x], y, groups=groups, max_epochs=3, progress=False)
    picked = fit_mlp_probes([every, 2 * every], y, rows=rows, groups=groups, max_epochs=3, progress=False)
    for p, q in zip(gathered, picked, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(p.tensors().values(), q.tensors().values(), strict=True))
    half = every.to(torch.bfloat16)
    from_half = fit_mlp_probes([half], y, rows=rows, groups=groups, max_epochs=3, progress=False)[0]
    from_float = fit_mlp_probes([half.float()[rows]], y, groups=groups, max_epochs=3, progress=False)[0]
    assert all(torch.equal(a, b) for a, b in zip(from_half.tensors().values(), from_float.tensors().values()))
    assert from_half.predict_proba(half[:5]).dtype == torch.float32


def test_early_stopping_scores_only_the_chunks_set_aside():
    """The set-aside chunks' labels never reach a gradient: flipping them leaves one epoch's weights
    unchanged bit for bit, and turns the validation balanced accuracy b into exactly 1 - b."""
    x, y = _linear(2000, noise=0.5)
    groups = torch.arange(2000) // 10
    fit, held = validation_split(groups, y, seed=0)
    assert len(torch.unique(groups[held])) == 40 and not set(groups[held].tolist()) & set(groups[fit].tolist())
    flipped = y.clone()
    flipped[held] = 1 - flipped[held]
    a = MLPProbe().fit(x, y, groups=groups, max_epochs=1)
    b = MLPProbe().fit(x, flipped, groups=groups, max_epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.tensors().values(), b.tensors().values(), strict=True))
    assert a.fit_info["validation_rows"] == len(held) == 400
    assert b.fit_info["validation_balanced_accuracy"] == pytest.approx(1 - a.fit_info["validation_balanced_accuracy"],
                                                                         abs=1e-12)
    # and the scores decide the epoch kept: the best one, and training stops `patience` epochs after it
    c = MLPProbe().fit(x, y, groups=groups, max_epochs=30, patience=2)
    path = c.fit_info["validation_path"]
    best = c.fit_info["best_epoch"]
    assert len(path) == c.fit_info["epochs"] and path[best - 1][0] == max(score for score, _ in path)
    assert c.fit_info["epochs"] == 30 or c.fit_info["epochs"] == best + 2
    by_loss = MLPProbe().fit(x, y, groups=groups, max_epochs=30, patience=2, select="log_loss").fit_info
    path = by_loss["validation_path"]
    assert by_loss["selected_by"] == "log_loss" and path[by_loss["best_epoch"] - 1][1] == min(loss for _, loss in path)


def test_pos_weight_weights_the_positives():
    x, labels = _linear(2000, noise=1.0)
    y = labels * (torch.arange(2000) % 4 == 0).float()  # rare positives (about 1 in 8)
    groups = torch.arange(2000) // 10
    plain = MLPProbe().fit(x, y, groups=groups).predict_proba(x).mean()
    weighted = MLPProbe().fit(x, y, groups=groups, pos_weight=4.0).predict_proba(x).mean()
    assert weighted > plain + 0.05


def test_rows_that_cannot_be_split_train_a_fixed_number_of_epochs():
    x, y = _linear(300, noise=0.5)
    probe = MLPProbe().fit(x, y, groups=torch.zeros(300, dtype=torch.long))  # one chunk: nothing to set aside
    info = probe.fit_info
    assert info["epochs"] == mlp.FALLBACK_EPOCHS and info["validation_balanced_accuracy"] is None
    assert info["stopping"].startswith("fallback")
    assert _balanced_accuracy(probe.predict_proba(x), y) > 0.7


def test_fit_info_is_json_safe_and_never_shadows_metadata():
    x, y = _linear(600, noise=0.5)
    probe = MLPProbe().fit(x, y, width=32, dropout=0.2, weight_decay=0.05)
    info = probe.fit_info
    json.dumps(info, allow_nan=False)
    assert not set(info) & ({f.name for f in dataclasses.fields(ProbeMeta)} | base._NOT_FIT)
    assert (info["width"], info["dropout"], info["weight_decay"]) == (32, 0.2, 0.05)
    assert 1 <= info["best_epoch"] <= info["epochs"] <= info["max_epochs"]
    assert probe.width == 32 and probe.hidden_weight.shape == (32, x.shape[1])


def test_scoring_any_shape_in_blocks_with_a_scratch_buffer(monkeypatch):
    x, y = _linear(800, noise=0.5)
    probe = MLPProbe().fit(x, y, activation="gelu", max_epochs=3)
    monkeypatch.setattr(mlp, "SCORE_ROWS", 64)  # several blocks
    z = (x - probe.mean) * probe.scale
    expected = torch.nn.functional.gelu(z @ probe.hidden_weight.T + probe.hidden_bias) @ probe.output_weight \
        + probe.output_bias
    logits = probe.decision_function(x)
    torch.testing.assert_close(logits, expected)
    scratch = torch.empty_like(x)
    assert torch.equal(probe.decision_function(x, out=scratch), logits)
    assert torch.equal(probe.decision_function(x.clone(), out=None), logits)
    assert probe.decision_function(x[:30].reshape(2, 15, -1)).shape == (2, 15)
    assert torch.equal(probe.decision_function(x[:30].reshape(2, 15, -1)).flatten(), probe.decision_function(x[:30]))
    assert torch.equal(probe.predict_proba(x), torch.sigmoid(logits))
    assert torch.equal(probe.predict(x, threshold=0.7), torch.sigmoid(logits) >= 0.7)
    assert probe.decision_function(x[:0]).shape == (0,)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_save_and_load_give_the_same_predictions(tmp_path, activation):
    x, y = _linear(600, noise=0.5)
    probe = MLPProbe().fit(x, y, width=48, activation=activation, max_epochs=4)
    probe.meta = _meta(x.shape[1], fit=probe.fit_info)  # as the pipeline sets it
    path = tmp_path / "layer03.safetensors"
    probe.save(path)
    again = load_probe(path)
    assert type(again) is MLPProbe and again.activation == activation and again.width == 48
    assert again.meta == probe.meta == read_probe_meta(path)
    assert again.fit_info == probe.fit_info and again.layer == 3 and again.metadata["best_epoch"] > 0
    assert torch.equal(again.predict_proba(x), probe.predict_proba(x))
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in probe.tensors().values())


def test_metadata_naming_another_activation_is_not_written(tmp_path):
    x, y = _linear(300, noise=0.5)
    probe = MLPProbe().fit(x, y, activation="gelu", max_epochs=2)
    probe.meta = _meta(x.shape[1])  # fit left empty: the file would load as relu
    with pytest.raises(ValueError, match="activation"):
        save_probe(probe, tmp_path / "p.safetensors")


def test_a_probe_refuses_another_model(tmp_path):
    x, y = _linear(300, noise=0.5)
    probe = MLPProbe().fit(x, y, max_epochs=2)
    probe.meta = _meta(x.shape[1], fit=probe.fit_info)
    probe.save(tmp_path / "p.safetensors")
    again = load_probe(tmp_path / "p.safetensors")

    class Same:
        source, weights_hash, tokenizer_hash, hidden_size = "/models/m", "w" * 64, "t" * 64, x.shape[1]

    class OtherTokenizer(Same):
        tokenizer_hash = "x" * 64

    class OtherWeights(Same):
        weights_hash = "v" * 64

    again.check_compatible(Same)
    with pytest.raises(TokenprobeError, match="another tokenizer"):
        again.check_compatible(OtherTokenizer)
    with pytest.raises(TokenprobeError, match="weights"):
        again.check_compatible(OtherWeights)


def test_a_corrupt_or_unknown_file_is_refused(tmp_path):
    x, y = _linear(300, noise=0.5)
    probe = MLPProbe().fit(x, y, max_epochs=2)
    tensors = probe.tensors()
    tensors["output_weight"] = tensors["output_weight"][:-1]
    with pytest.raises(ValueError, match="output_weight"):
        MLPProbe.from_tensors(tensors, _meta(x.shape[1]))
    with pytest.raises(TokenprobeError, match="activation"):
        MLPProbe.from_tensors(probe.tensors(), _meta(x.shape[1], fit={"activation": "swish"}))


@pytest.mark.parametrize("bad", [dict(width=0), dict(dropout=1.0), dict(activation="tanh"), dict(max_epochs=0),
                                 dict(weight_decay=-1.0), dict(learning_rate=0.0), dict(batch_size=0),
                                 dict(select="auc")])
def test_bad_options_are_refused(bad):
    x, y = _linear(100)
    with pytest.raises(ValueError):
        fit_mlp_probes([x], y, progress=False, **bad)
    with pytest.raises(ValueError, match="labels"):
        fit_mlp_probes([x], y[:-1], progress=False)
