"""Probe training (float32, all layers at once), metrics against scikit-learn, probe file round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from tokenprobe.errors import TokenprobeError
from tokenprobe.probes.base import ProbeMeta, load_probe, read_header
from tokenprobe.probes.linear import LinearProbe, fit_linear_probes, pos_weight_for
from tokenprobe.analysis.bootstrap import binary_metrics


def _problem(n=2000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 50, d)  # badly scaled features
    y = ((x / torch.linspace(0.1, 50, d)) @ direction + 0.3 * torch.randn(n, generator=g)) > 0
    return x, y


def test_metrics_match_sklearn_and_hand_count():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.2
    probs = np.clip(labels * 0.3 + rng.random(500) * 0.7, 0, 1)
    m = binary_metrics(labels, probs, threshold=0.5)
    predicted = probs >= 0.5
    assert m.tp == int((predicted & labels).sum()) and m.fp == int((predicted & ~labels).sum())
    assert m.tn == int((~predicted & ~labels).sum()) and m.fn == int((~predicted & labels).sum())
    assert m.tp + m.fp + m.tn + m.fn == m.n == 500
    tpr, tnr = m.tp / (m.tp + m.fn), m.tn / (m.tn + m.fp)
    assert m.balanced_accuracy == pytest.approx((tpr + tnr) / 2)
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert m.auroc == pytest.approx(roc_auc_score(labels, probs))
    assert m.accuracy == pytest.approx((predicted == labels).mean())


def test_metrics_with_one_class_give_nan_not_a_crash():
    m = binary_metrics(np.zeros(10, bool), np.linspace(0, 1, 10))
    assert np.isnan(m.auroc) and np.isnan(m.balanced_accuracy) and m.fp == 5


def test_always_one_class_scores_half_balanced_accuracy():
    labels = np.array([True] * 5 + [False] * 95)
    m = binary_metrics(labels, np.zeros(100))  # the reward hack: always predict 0
    assert m.accuracy == 0.95 and m.balanced_accuracy == 0.5


def test_pos_weight_is_capped_square_root():
    assert pos_weight_for(torch.tensor([1, 0]), cap=5) == 1.0
    assert pos_weight_for(torch.tensor([1] + [0] * 8), cap=5) == pytest.approx(np.sqrt(8))
    assert pos_weight_for(torch.tensor([1] + [0] * 99), cap=5) == 5.0


def test_probes_agree_with_sklearn_logistic_regression():
    x, y = _problem()
    x2, y2 = _problem(seed=1)
    xs = torch.stack([x, x2])  # two "layers" trained together
    ys = y  # layer 2 gets labels unrelated to its inputs: it must not learn anything
    probes = fit_linear_probes(xs[:, :1500], ys[:1500], l2=1e-3, progress=False)
    assert all(p.weight.dtype == torch.float32 for p in probes)
    ours = probes[0].predict_proba(x[1500:]).numpy()
    sk = LogisticRegression(C=1.0 / (1e-3 * 1500), max_iter=2000)
    xm, xsd = x[:1500].mean(0), x[:1500].std(0)
    sk.fit(((x[:1500] - xm) / xsd).numpy(), y[:1500].numpy())
    theirs = sk.predict_proba(((x[1500:] - xm) / xsd).numpy())[:, 1]
    assert np.corrcoef(ours, theirs)[0, 1] > 0.999
    assert binary_metrics(y[1500:].numpy(), ours).balanced_accuracy > 0.9
    assert binary_metrics(y[1500:].numpy(), probes[1].predict_proba(x2[1500:]).numpy()).balanced_accuracy < 0.65


def test_probe_accepts_bfloat16_inputs_and_returns_float32():
    x, y = _problem()
    probe = fit_linear_probes(x[None], y, progress=False)[0]
    out = probe.predict_proba(x[:10].to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (10,)


def test_probe_file_round_trip_with_metadata(tmp_path):
    x, y = _problem()
    probe = fit_linear_probes(x[None], y, progress=False)[0]
    probe.meta = ProbeMeta.from_dict({"layer": 5, "task": "next", "target": " the", "target_ids": [506], "model": "m",
                                      "weights_hash": "abc", "tokenizer_hash": "def", "context_length": 256,
                                      "dtype": "float32", "run_name": "r", "tokenprobe_version": "0",
                                      "metrics": {"eval": {"auroc": float("nan")}}})
    path = tmp_path / "p.safetensors"
    probe.save(path)
    loaded = load_probe(path)
    assert loaded.layer == 5 and loaded.metadata["target"] == " the"
    assert loaded.metadata["metrics"]["eval"]["auroc"] is None  # NaN stored as JSON null
    torch.testing.assert_close(loaded.predict_proba(x), probe.predict_proba(x))
    with safe_open(str(path), framework="pt") as f:
        json.loads(f.metadata()["tokenprobe"])  # strict JSON inside the file itself


def test_bad_probe_files_are_refused(tmp_path):
    not_probe = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(not_probe))
    with pytest.raises(TokenprobeError, match="not a tokenprobe probe"):
        read_header(not_probe)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 50)
    with pytest.raises(TokenprobeError, match="not a readable probe"):
        read_header(garbage)
    with pytest.raises(TokenprobeError, match="not found"):
        read_header(tmp_path / "missing.safetensors")


def test_probe_refuses_another_model():
    probe = LinearProbe(torch.zeros(4), torch.zeros(()), torch.zeros(4), torch.ones(4),
                        meta=ProbeMeta.from_dict({"model": "a", "weights_hash": "w1", "tokenizer_hash": "t1",
                                                  "hidden_size": 4, "layer": 0, "task": "next", "target": " the",
                                                  "target_ids": [1], "context_length": 8, "dtype": "float32",
                                                  "run_name": "r", "tokenprobe_version": "0"}))

    class Fake:
        source, weights_hash, tokenizer_hash, hidden_size = "b", "w1", "t2", 4

    with pytest.raises(TokenprobeError, match="another tokenizer"):
        probe.check_compatible(Fake)
    Fake.tokenizer_hash, Fake.weights_hash = "t1", "w2"
    with pytest.raises(TokenprobeError, match="trained on model a"):
        probe.check_compatible(Fake)
    Fake.weights_hash = "w1"
    probe.check_compatible(Fake)
