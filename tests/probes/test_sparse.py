"""The sparse probe: its optimum against scikit-learn and the optimality conditions, support recovery,
the penalty choice, warm starts, `rows`, bfloat16, determinism, fit_info and the file round trip."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from tokenprobe.errors import TokenprobeError
from tokenprobe.files import dumps_json
from tokenprobe.probes import sparse
from tokenprobe.probes.base import ModelIdentity, ProbeMeta, load_probe, read_probe_meta
from tokenprobe.probes.sparse import SparseProbe, fit_sparse_probes


def _planted(n=2000, d=30, seed=0, true=(1, 5, 9, 20), noise=1.0):
    """Correlated, badly scaled, offset features; labels from a few standardised ones (the planted support)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    x = (torch.randn(n, d, generator=g) @ (torch.eye(d) + mix)) * torch.logspace(-1, 1, d) + 5
    z = (x - x.mean(0)) / x.std(0)
    w = torch.zeros(d)
    w[list(true)] = torch.tensor([1.5, -1.0, 0.8, 1.2, -0.9, 1.1][: len(true)])
    y = (z @ w + 0.3 + noise * torch.randn(n, generator=g)) > 0
    return x, y, torch.arange(n) // 10  # groups: "chunks" of 10 rows


def _standardised(x: torch.Tensor) -> np.ndarray:
    xd = x.double().numpy()
    return (xd - xd.mean(0)) / xd.std(0, ddof=1)


def _in_float64(probe: SparseProbe, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """The probe's (w, b) in the float64 standardisation of `x` (its own is float32)."""
    xd = x.double().numpy()
    raw = (probe.weight.double() * probe.scale.double()).numpy()
    return raw * xd.std(0, ddof=1), float(probe.bias) + float((xd.mean(0) - probe.mean.double().numpy()) @ raw)


def _objective(z: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l1: float) -> float:
    s = z @ w + b
    return float(np.mean(np.logaddexp(0.0, s) - y * s) + l1 * np.abs(w).sum())


def _same(a: list[SparseProbe], b: list[SparseProbe]) -> bool:
    return all(torch.equal(getattr(p, k), getattr(q, k)) for p, q in zip(a, b) for k in sparse.TENSORS)


def _meta(hidden: int) -> ProbeMeta:
    return ProbeMeta(kind="sparse", layer=4, task="next", target=" the", target_ids=[7],
                     model=ModelIdentity("m", "/models/m", "w" * 64, "t" * 64, hidden), context_length=32,
                     dtype="float32", run_name="probe-layer4", tokenprobe_version="0", config={"seed": 0},
                     corpus={"name": "c", "sha256": "s"})


@pytest.mark.parametrize("l1", [0.02, 0.005])
def test_matches_scikit_learns_l1_logistic_regression_at_the_same_penalty(l1):
    x, y, _ = _planted()
    probe = fit_sparse_probes([x], y, l1=l1, progress=False)[0]
    z, yn = _standardised(x), y.numpy().astype(float)
    # ours: mean loss + l1 |w|_1; scikit-learn: C sum(loss) + |w|_1, the same minimiser for C = 1 / (l1 n);
    # l1_ratio=1 is penalty="l1" (deprecated in scikit-learn 1.8); saga leaves the intercept unpenalised
    reference = LogisticRegression(l1_ratio=1.0, C=1 / (l1 * len(yn)), solver="saga", tol=1e-12,
                                   max_iter=100_000).fit(z, yn)
    expected = reference.coef_[0]
    w, b = _in_float64(probe, x)
    assert np.array_equal(w != 0, expected != 0) and 4 <= np.count_nonzero(expected) < len(expected)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-3)
    assert b == pytest.approx(reference.intercept_[0], abs=1e-3)
    assert _objective(z, yn, w, b, l1) == pytest.approx(_objective(z, yn, expected, reference.intercept_[0], l1),
                                                        rel=1e-7)
    # a penalty scaled the other way (l1 * n, or C = 1 / l1) would keep nothing, or nearly everything
    assert probe.fit_info["kept"] == np.count_nonzero(expected) and probe.fit_info["l1"] == l1


def _optimality_gap(probe: SparseProbe, x: torch.Tensor, y: torch.Tensor, l1: float, pos_weight: float = 1.0):
    """How far the probe is from the optimality conditions of its objective (float64, its own standardisation):
    the gradient of the data loss is -l1 * sign(w_j) where w_j != 0, within [-l1, l1] where w_j == 0, and
    zero for the bias. Returns (worst violation on kept weights, on zero weights, on the bias)."""
    z = (x.double() - probe.mean.double()) * probe.scale.double()
    v = torch.where(y, pos_weight, 1.0).double()
    v = v / v.sum()
    w = probe.weight.double()
    r = v * (torch.sigmoid(z @ w + probe.bias.double()) - y.double())
    g = z.T @ r
    kept = w != 0
    return (float((g[kept] + l1 * torch.sign(w[kept])).abs().max()) if kept.any() else 0.0,
            float((g[~kept].abs() - l1).clamp_min(0).max()) if (~kept).any() else 0.0, float(r.sum().abs()))


def test_fit_meets_the_optimality_conditions_with_pos_weight_and_imbalance():
    x, y, _ = _planted(n=3000, d=40, seed=1)
    y = y & (torch.arange(3000) % 3 == 0)  # ~15% positive
    for l1 in (0.01, 0.002):
        probe = fit_sparse_probes([x], y, l1=l1, pos_weight=2.5, progress=False)[0]
        # about 3e-5 here; a probe one Newton step short, or fitted without pos_weight, is off by ~1e-2
        assert max(_optimality_gap(probe, x, y, l1, pos_weight=2.5)) < 1e-4


def test_recovers_the_planted_support():
    true = {2, 11, 17, 25, 33}
    x, y, groups = _planted(n=6000, d=40, seed=3, true=sorted(true), noise=0.5)
    fixed = fit_sparse_probes([x], y, l1=0.02, progress=False)[0]
    assert set(torch.nonzero(fixed.weight).flatten().tolist()) == true
    assert set(fixed.fit_info["kept_dims"]) == true
    chosen = fit_sparse_probes([x], y, groups=groups, progress=False)[0]  # l1="auto"
    assert set(chosen.fit_info["kept_dims"][:5]) == true  # the largest weights are the planted ones
    others = [j for j in range(40) if j not in true]
    assert chosen.weight[others].abs().max() < 0.2 * chosen.weight[sorted(true)].abs().min()


def test_auto_l1_is_strong_with_little_data_weak_with_much():
    x, y, groups = _planted(n=8000, d=60, seed=4, true=(0, 7, 19, 33, 50, 58), noise=2.0)
    small = fit_sparse_probes([x[:500]], y[:500], groups=groups[:500], progress=False)[0]
    large = fit_sparse_probes([x], y, groups=groups, progress=False)[0]
    assert small.fit_info["l1"] > large.fit_info["l1"]
    assert small.fit_info["kept"] < large.fit_info["kept"]
    for probe in (small, large):  # from the strongest down, stopped after the best, which has the lowest loss
        path = probe.fit_info["l1_path"]
        assert [p for p, _ in path] == list(sparse.L1_PATH[: len(path)])
        assert min(path, key=lambda step: step[1])[0] == probe.fit_info["l1"]
        assert len(probe.fit_info["l1_path_kept"]) == len(path)
        assert probe.fit_info["l1_path_kept"] == sorted(probe.fit_info["l1_path_kept"])  # weaker keeps more
    assert len(small.fit_info["l1_path"]) < len(sparse.L1_PATH)
    assert "100 training positions set aside" in small.fit_info["l1_method"]  # a fifth of 50 groups of 10
    # the final probe is the refit on every row at the chosen penalty: that objective's optimum
    assert max(_optimality_gap(small, x[:500], y[:500], small.fit_info["l1"])) < 1e-4


def _drifting_layers(layers=4, n=1500, d=50, seed=5):
    x, y, groups = _planted(n=n, d=d, seed=seed, noise=1.5)
    drift = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)) * x.std(0)
    return torch.stack([x + 0.15 * k * drift for k in range(layers)]), y, groups


def test_warm_start_gives_the_cold_start_solution_and_the_same_penalties():
    x, y, groups = _drifting_layers()
    warm = fit_sparse_probes(x, y, groups=groups, progress=False)
    cold = fit_sparse_probes(x, y, groups=groups, progress=False, warm_start=False)
    assert [p.fit_info["l1"] for p in warm] == [p.fit_info["l1"] for p in cold]
    assert warm[0].fit_info["l1_path"] == cold[0].fit_info["l1_path"]
    assert warm[1].fit_info["l1_path"][0][0] == warm[0].fit_info["l1"]  # later layers start at the previous choice
    for layer in range(len(x)):
        assert torch.equal(warm[layer].weight != 0, cold[layer].weight != 0)
        gap = (warm[layer].predict_proba(x[layer]) - cold[layer].predict_proba(x[layer])).abs()
        assert gap.max() < 1e-3


def test_rows_gather_one_layer_at_a_time_deterministically():
    x, y, groups = _drifting_layers(layers=3, n=2000)
    rows = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:1400].sort().values
    copied = fit_sparse_probes(x[:, rows], y[rows], groups=groups[rows], progress=False)
    views = fit_sparse_probes([x[i] for i in range(3)], y[rows], rows=rows, groups=groups[rows], progress=False)
    assert _same(copied, views) and [p.fit_info for p in copied] == [p.fit_info for p in views]
    assert _same(copied, fit_sparse_probes(x[:, rows], y[rows], groups=groups[rows], progress=False))
    with pytest.raises(ValueError, match="labels"):
        fit_sparse_probes(x, y[rows], progress=False)


def test_bfloat16_inputs_train_and_score_like_their_float32_values():
    x, y, groups = _drifting_layers(layers=2)
    xb = x.to(torch.bfloat16)
    trained = fit_sparse_probes(xb, y, groups=groups, progress=False)
    assert _same(trained, fit_sparse_probes(xb.float(), y, groups=groups, progress=False))
    probe = trained[1]
    logits = probe.decision_function(xb[1])
    assert logits.dtype == torch.float32 and torch.equal(logits, probe.decision_function(xb[1].float()))
    batch = xb[1, :60].reshape(3, 20, -1)
    assert torch.equal(probe.predict_proba(batch).flatten(), probe.predict_proba(xb[1, :60]))


def test_fit_info_kept_dimensions_and_fallbacks():
    x, y, groups = _planted(n=3000, d=80, seed=6, noise=3.0)
    probe = fit_sparse_probes([x], y, l1=1e-4, progress=False)[0]  # weak: keeps most dimensions
    info = probe.fit_info
    order = probe.kept_dims()
    assert info["kept"] == int(torch.count_nonzero(probe.weight)) == len(order) > sparse.KEPT_DIMS
    assert info["kept_dims"] == order[: sparse.KEPT_DIMS].tolist()  # the first 50, largest |weight| first
    magnitudes = probe.weight.abs()[order]
    assert bool((magnitudes[:-1] >= magnitudes[1:]).all())
    assert info["l1_method"] == "fixed" and "l1_path" not in info
    dumps_json(info)  # JSON-safe: stored flat in the file's header
    names = {f.name for f in dataclasses.fields(ProbeMeta)} | {"format", "format_version", "model_source",
                                                                "weights_hash", "tokenizer_hash", "hidden_size"}
    auto = fit_sparse_probes([x], y, groups=groups, progress=False)[0].fit_info
    assert not names & (set(info) | set(auto))
    dumps_json(auto)
    # a constant feature keeps a zero weight; one group cannot be split: the fallback penalty
    x[:, 3] = 7.0
    one_group = fit_sparse_probes([x], y, groups=torch.zeros(3000, dtype=torch.long), progress=False)[0]
    assert one_group.scale[3] == 0 and one_group.weight[3] == 0
    assert one_group.fit_info["l1"] == sparse.L1_FALLBACK and one_group.fit_info["l1_method"].startswith("fallback")
    assert all(torch.isfinite(t).all() for t in one_group.tensors().values())
    for bad in (-1.0, "strong", True):
        with pytest.raises(ValueError, match="l1 must be"):
            fit_sparse_probes([x], y, l1=bad, progress=False)


def test_a_feature_constant_in_the_next_layer_loses_its_warm_started_weight():
    x, y, groups = _planted(n=2000, d=30, seed=8)
    flat = x.clone()
    flat[:, 5] = 3.0  # kept in the first layer (planted), constant in the second
    first, second = fit_sparse_probes([x, flat], y, l1=0.01, progress=False)
    assert first.weight[5] != 0 and second.weight[5] == 0 and second.scale[5] == 0
    assert 5 not in second.kept_dims().tolist() and second.fit_info["kept"] == int(torch.count_nonzero(second.weight))
    alone = fit_sparse_probes([flat], y, l1=0.01, progress=False)[0]  # the same optimum as without the start
    torch.testing.assert_close(second.predict_proba(flat), alone.predict_proba(flat), rtol=0, atol=1e-3)


def test_separable_data_give_a_finite_probe():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(600, 8, generator=g)
    y = x[:, 0] > 0  # separable: only the L1 penalty keeps the weights finite
    probe = SparseProbe().fit(x, y, l1=1e-3)
    assert all(torch.isfinite(t).all() for t in probe.tensors().values())
    assert ((probe.predict_proba(x) >= 0.5) == y).float().mean() > 0.98


def test_save_and_load_give_the_same_predictions_and_refuse_another_model(tmp_path):
    x, y, groups = _planted()
    probe = SparseProbe().fit(x, y, groups=groups)
    probe.meta = dataclasses.replace(_meta(x.shape[-1]), fit=dict(probe.fit_info))
    path = tmp_path / "layer4.safetensors"
    probe.save(path)
    again = load_probe(path)
    assert type(again) is SparseProbe and again.kind == "sparse" and again.layer == 4
    assert again.meta == probe.meta == read_probe_meta(path)
    assert again.fit_info == probe.fit_info and again.metadata["kept"] == probe.fit_info["kept"]
    assert torch.equal(again.predict_proba(x), probe.predict_proba(x))
    assert torch.equal(again.direction(), probe.direction())

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
