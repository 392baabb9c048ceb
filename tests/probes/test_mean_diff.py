"""The mean-difference probe: its direction against numpy, its threshold against a brute-force search,
its slope against scikit-learn, `rows`, bfloat16, determinism, and its file round trip."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from tokenprobe.errors import TokenprobeError
from tokenprobe.probes import mean_diff
from tokenprobe.probes.base import ModelIdentity, ProbeMeta, load_probe, read_probe_meta
from tokenprobe.probes.mean_diff import MeanDiffProbe, fit_mean_diff_probes


def _layers(n=3000, d=24, layers=3, seed=0):
    """Residual-stream-like layers: correlated, badly scaled features with large offsets; imbalanced,
    noisy labels whose classes differ in spread (so the midpoint of the class means is not the best cut)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    h = torch.randn(n, d, generator=g) @ (torch.eye(d) + 2 * mix)
    y = (h[:, :3].sum(1) + 1.5 * torch.randn(n, generator=g)) > 1.5  # ~20% positive
    h[y] = h[y] * 2.0  # positives spread wider
    xs = []
    for _ in range(layers):
        h = h + 0.3 * torch.randn(n, d, generator=g) @ mix
        xs.append(h * torch.logspace(-1, 1.5, d) + 100)
    return torch.stack(xs), y


def _meta(hidden: int) -> ProbeMeta:
    return ProbeMeta(kind="mean-diff", layer=2, task="next", target=" the", target_ids=[7],
                     model=ModelIdentity("m", "/models/m", "w" * 64, "t" * 64, hidden), context_length=32,
                     dtype="float32", run_name="probe-layer2", tokenprobe_version="0", config={"seed": 0},
                     corpus={"name": "c", "sha256": "s"})


def _balanced_accuracy(predicted: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * (predicted[y].mean() + (~predicted[~y]).mean())


def _same(a: list[MeanDiffProbe], b: list[MeanDiffProbe]) -> bool:
    return all(torch.equal(getattr(p, k), getattr(q, k)) for p, q in zip(a, b) for k in mean_diff.TENSORS)


def test_direction_is_the_difference_of_the_class_means():
    x, y = _layers()
    probes = fit_mean_diff_probes(x, y, progress=False)
    for layer, probe in enumerate(probes):
        xd, yd = x[layer].double().numpy(), y.numpy()
        expected = xd[yd].mean(0) - xd[~yd].mean(0)
        assert probe.mean_diff.dtype == torch.float32 and probe.mean_diff.shape == (x.shape[-1],)
        # float64 sums: as close as float32 can hold it, though the features sit at ~100 (x 30 scale)
        np.testing.assert_allclose(probe.mean_diff.double().numpy(), expected, rtol=1e-6, atol=1e-6)
        # the logit moves along mu_pos - mu_neg: direction() is a positive multiple of it
        direction = probe.direction().double()
        assert probe.slope > 0
        np.testing.assert_allclose(direction.numpy(), float(probe.slope) * expected, rtol=1e-5)


def test_threshold_maximises_training_balanced_accuracy_by_brute_force():
    x, y = _layers()
    yn = y.numpy()
    for layer, probe in enumerate(fit_mean_diff_probes(x, y, progress=False)):
        projection = probe.projection(x[layer]).double().numpy()
        # every cut: each distinct projection as the lowest positive, and "all negative"
        candidates = np.append(np.unique(projection), np.inf)
        best = max(_balanced_accuracy(projection >= c, yn) for c in candidates)
        predicted = probe.predict(x[layer]).numpy()
        assert np.array_equal(predicted, projection >= float(probe.threshold))  # p >= 0.5 exactly at the cut
        assert _balanced_accuracy(predicted, yn) == pytest.approx(best, abs=1e-12)
        assert probe.fit_info["train_balanced_accuracy"] == pytest.approx(best, abs=1e-12)
        assert probe.fit_info["threshold"] == float(probe.threshold)
        # the search matters here: the cut halfway between the projected class means is worse
        halfway = 0.5 * (projection[yn].mean() + projection[~yn].mean())
        assert _balanced_accuracy(projection >= halfway, yn) < best - 0.005


def test_slope_is_the_one_dimensional_logistic_fit_at_the_threshold():
    x, y = _layers(layers=1)
    for pos_weight in (1.0, 3.0):
        probe = fit_mean_diff_probes(x, y, pos_weight=pos_weight, progress=False)[0]
        centred = probe.projection(x[0]).double().numpy() - float(probe.threshold)
        spread = np.sqrt(np.mean(centred ** 2))
        weight = np.where(y.numpy(), pos_weight, 1.0)
        # ours: sum_i v_i loss_i + SLOPE_L2 / 2 a'^2 with v = weight / sum(weight), a' = slope * spread;
        # scikit-learn: C sum_i weight_i loss_i + a'^2 / 2, the same minimiser for C = 1 / (SLOPE_L2 sum(weight))
        reference = LogisticRegression(C=1 / (mean_diff.SLOPE_L2 * weight.sum()), fit_intercept=False, tol=1e-12,
                                       max_iter=1000).fit((centred / spread)[:, None], y.numpy(), sample_weight=weight)
        assert float(probe.slope) == pytest.approx(reference.coef_[0, 0] / spread, rel=1e-5)
        torch.testing.assert_close(probe.decision_function(x[0]),
                                   (probe.projection(x[0]) - probe.threshold) * probe.slope)
    # pos_weight changes only the slope: the means and the cut do not depend on it
    one, three = (fit_mean_diff_probes(x, y, pos_weight=w, progress=False)[0] for w in (1.0, 3.0))
    assert torch.equal(one.mean_diff, three.mean_diff) and torch.equal(one.threshold, three.threshold)
    assert three.slope != one.slope


def test_separable_classes_give_a_finite_slope_and_no_signal_a_tiny_one():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 5, generator=g)
    separable = torch.arange(400) % 3 == 0
    x[separable, 0] += 12.0  # classes far apart along the mean difference
    probe = MeanDiffProbe().fit(x, separable)
    assert math.isfinite(float(probe.slope)) and probe.slope > 0
    assert bool((probe.predict(x) == separable).all())
    noise = torch.zeros(400, 5)  # every row alike: no direction, every cut the same
    flat = MeanDiffProbe().fit(noise, separable)
    assert flat.slope > 0 and torch.allclose(flat.predict_proba(noise), torch.tensor(0.5))


def test_rows_gather_one_layer_at_a_time_with_the_same_result():
    x, y = _layers(n=4000)
    rows = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:2500].sort().values
    copied = fit_mean_diff_probes(x[:, rows], y[rows], progress=False)
    views = fit_mean_diff_probes([x[i] for i in range(len(x))], y[rows], rows=rows, progress=False)
    assert _same(copied, views)
    assert _same(copied, fit_mean_diff_probes(x, y[rows], rows=rows, progress=False))
    assert _same(copied, fit_mean_diff_probes(x[:, rows], y[rows], progress=False))  # deterministic
    with pytest.raises(ValueError, match="labels"):
        fit_mean_diff_probes(x, y[rows], progress=False)
    with pytest.raises(TokenprobeError, match="both classes"):
        fit_mean_diff_probes(x, torch.zeros(4000, dtype=torch.bool), progress=False)


def test_bfloat16_inputs_train_and_score_like_their_float32_values():
    x, y = _layers(layers=2)
    xb = x.to(torch.bfloat16)
    trained = fit_mean_diff_probes(xb, y, progress=False)
    assert _same(trained, fit_mean_diff_probes(xb.float(), y, progress=False))
    probe = trained[1]
    logits = probe.decision_function(xb[1])
    assert logits.dtype == torch.float32 and torch.equal(logits, probe.decision_function(xb[1].float()))
    assert torch.equal(probe.decision_function(xb[1], out=torch.empty(xb[1].shape)), logits)  # scratch buffer
    batch = xb[1, :60].reshape(3, 20, -1)  # any leading shape
    assert probe.predict_proba(batch).shape == (3, 20)
    assert torch.equal(probe.predict_proba(batch).flatten(), probe.predict_proba(xb[1, :60]))


def test_save_and_load_give_the_same_predictions_and_refuse_another_model(tmp_path):
    x, y = _layers(layers=1)
    probe = fit_mean_diff_probes(x, y, progress=False)[0]
    probe.meta = dataclasses.replace(_meta(x.shape[-1]), fit=dict(probe.fit_info))
    path = tmp_path / "layer2.safetensors"
    probe.save(path)
    again = load_probe(path)
    assert type(again) is MeanDiffProbe and again.kind == "mean-diff" and again.layer == 2
    assert again.meta == probe.meta == read_probe_meta(path)
    assert again.fit_info == probe.fit_info and again.metadata["threshold"] == probe.fit_info["threshold"]
    assert torch.equal(again.predict_proba(x[0]), probe.predict_proba(x[0]))
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in again.tensors().values())

    class Same:
        source, weights_hash, tokenizer_hash, hidden_size = "/models/m", "w" * 64, "t" * 64, x.shape[-1]

    again.check_compatible(Same)

    class OtherWeights(Same):
        weights_hash = "v" * 64

    class OtherTokenizer(Same):
        tokenizer_hash = "u" * 64

    with pytest.raises(TokenprobeError, match="trained on model"):
        again.check_compatible(OtherWeights)
    with pytest.raises(TokenprobeError, match="another tokenizer"):
        again.check_compatible(OtherTokenizer)


def test_fit_info_is_json_safe_and_apart_from_the_metadata_fields():
    from tokenprobe.files import dumps_json

    x, y = _layers(layers=1, n=500)
    info = MeanDiffProbe().fit(x[0], y, l2="auto").fit_info  # other families' options are ignored
    dumps_json(info)
    names = {f.name for f in dataclasses.fields(ProbeMeta)} | {"format", "format_version", "model_source",
                                                                "weights_hash", "tokenizer_hash", "hidden_size"}
    assert not names & set(info)
