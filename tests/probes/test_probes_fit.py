"""Probe fitting: the optimum (against float64 Newton), warm and cold starts, determinism, `rows`,
both preconditioners, awkward data, and the scratch-buffer path of `decision_function`."""

from __future__ import annotations

import math

import pytest
import torch

from tokenprobe.probes import lbfgs, selection
from tokenprobe.probes.lbfgs import ProbeFitter
from tokenprobe.probes.linear import LinearProbe, fit_linear_probes


def _layers(n=3000, d=48, layers=4, seed=0):
    """Correlated, badly scaled, offset features that drift from layer to layer (like a residual stream),
    and noisy labels (not separable)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    h = torch.randn(n, d, generator=g) @ (torch.eye(d) + 3 * mix)
    y = (h @ torch.randn(d, generator=g) + 2.0 * torch.randn(n, generator=g)) > 0.3
    xs = []
    for _ in range(layers):
        h = h + 0.3 * torch.randn(n, d, generator=g) @ mix
        xs.append(h * torch.logspace(-1, 2, d) + 50)
    return torch.stack(xs), y


def _objective(x: torch.Tensor, y: torch.Tensor, l2: float, pos_weight: float):
    """The fitted objective in float64 as a function of (w, b), in the standardisation the probes use."""
    x = x.double()
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    yd = y.double()
    v = torch.where(y, pos_weight, 1.0).double()
    v = v / v.sum()

    def loss(w: torch.Tensor, b: torch.Tensor) -> float:
        s = z @ w.double() + b.double()
        return float((v * (torch.nn.functional.softplus(s) - yd * s)).sum() + 0.5 * l2 * (w.double() ** 2).sum())

    return z, yd, v, loss


def _optimum(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, pos_weight: float = 1.0) -> float:
    """The minimum of the objective, by Newton's method in float64."""
    z, yd, v, loss = _objective(x, y, l2, pos_weight)
    zz = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
    reg = torch.full((zz.shape[1],), l2, dtype=torch.float64)
    reg[-1] = 0
    theta = torch.zeros(zz.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(zz @ theta)
        g = zz.T @ (v * (p - yd)) + reg * theta
        if g.abs().max() < 1e-14:
            break
        hessian = (zz.T * (v * p * (1 - p))) @ zz + torch.diag(reg)
        theta = theta - torch.linalg.solve(hessian, g)
    return loss(theta[:-1], theta[-1])


def _probe_loss(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, pos_weight: float = 1.0):
    """The objective at a fitted probe, its weights mapped into the float64 standardisation."""
    _, _, _, loss = _objective(x, y, l2, pos_weight)
    xd = x.double()
    # the probe's own standardisation is float32; map its raw-space function onto the float64 one
    raw_w = probe.weight.double() * probe.scale.double()
    w = raw_w * xd.std(0)
    b = probe.bias.double() + (xd.mean(0) - probe.mean.double()) @ raw_w
    return loss(w, b)


def _same(a: list[LinearProbe], b: list[LinearProbe]) -> bool:
    return all(torch.equal(getattr(p, k), getattr(q, k)) for p, q in zip(a, b) for k in ("weight", "bias", "mean", "scale"))


def test_fit_reaches_the_float64_optimum_at_every_layer():
    x, y = _layers()
    probes = fit_linear_probes(x, y, l2=1e-3, progress=False)
    for layer, probe in enumerate(probes):
        best = _optimum(x[layer], y)
        assert _probe_loss(probe, x[layer], y) == pytest.approx(best, rel=2e-5)


def test_fit_with_pos_weight_and_imbalanced_labels_reaches_the_optimum():
    x, _ = _layers(layers=2, seed=1)
    g = torch.Generator().manual_seed(5)
    signal = x[0][:, :4].sum(1)
    y = ((signal - signal.mean()) / signal.std() + torch.randn(len(signal), generator=g)) > 1.5  # ~15% positive
    assert 0.05 < y.float().mean() < 0.3
    probes = fit_linear_probes(x, y, l2=1e-3, pos_weight=2.5, progress=False)
    for layer, probe in enumerate(probes):
        best = _optimum(x[layer], y, pos_weight=2.5)
        assert _probe_loss(probe, x[layer], y, pos_weight=2.5) == pytest.approx(best, rel=2e-5)


def test_warm_start_gives_the_cold_start_solution():
    x, y = _layers()
    warm = fit_linear_probes(x, y, progress=False)
    cold = fit_linear_probes(x, y, progress=False, warm_start=False)
    assert _same(warm[:1], cold[:1])  # the first layer has nothing to start from
    assert not _same(warm[1:], cold[1:])  # the others did start elsewhere
    for layer in range(len(x)):
        lw, lc = _probe_loss(warm[layer], x[layer], y), _probe_loss(cold[layer], x[layer], y)
        assert lw == pytest.approx(lc, rel=2e-5)
        gap = (warm[layer].predict_proba(x[layer]) - cold[layer].predict_proba(x[layer])).abs()
        assert gap.mean() < 1e-3 and gap.max() < 1e-2  # the same function, up to flat directions of the loss


def test_warm_start_saves_iterations_on_drifting_layers(monkeypatch):
    fitters: list[ProbeFitter] = []
    init = ProbeFitter.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        fitters.append(self)

    monkeypatch.setattr(ProbeFitter, "__init__", record)
    x, y = _layers(layers=6)
    fit_linear_probes(x, y, progress=False)
    fit_linear_probes(x, y, progress=False, warm_start=False)
    warm, cold = fitters[0].iterations, fitters[1].iterations
    assert warm[0] == cold[0]
    assert sum(warm[1:]) < sum(cold[1:])


def test_a_start_worse_than_zero_is_not_used():
    """A layer whose features flip sign: the previous solution predicts the opposite, and is discarded."""
    x, y = _layers(layers=1)
    flipped = torch.stack([x[0], -x[0]])
    warm = fit_linear_probes(flipped, y, progress=False)
    cold = fit_linear_probes(flipped, y, progress=False, warm_start=False)
    assert _same(warm, cold)
    assert _probe_loss(warm[1], flipped[1], y) == pytest.approx(_optimum(flipped[1], y), rel=2e-5)


def test_fits_are_deterministic():
    x, y = _layers(layers=3)
    assert _same(fit_linear_probes(x, y, progress=False), fit_linear_probes(x, y, progress=False))


def test_rows_gather_one_layer_at_a_time_with_the_same_result():
    x, y = _layers(layers=3, n=4000)
    rows = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:2500].sort().values
    copied = fit_linear_probes(x[:, rows], y[rows], progress=False)
    views = fit_linear_probes([x[i] for i in range(3)], y[rows], rows=rows, progress=False)
    assert _same(copied, views)
    assert _same(copied, fit_linear_probes(x, y[rows], rows=rows, progress=False))
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probes(x, y, rows=rows, progress=False)


def test_bfloat16_inputs_train_like_their_float32_values():
    x, y = _layers(layers=2)
    xb = x.to(torch.bfloat16)
    assert _same(fit_linear_probes(xb, y, progress=False), fit_linear_probes(xb.float(), y, progress=False))


@pytest.mark.parametrize("native", [True, False])
def test_both_preconditioners_reach_the_optimum(monkeypatch, native):
    """bfloat16 Gram matrix (CPUs with native bfloat16) or a float32 one from a subsample of rows."""
    monkeypatch.setattr(lbfgs, "native_bfloat16_matmul", lambda device: native)
    monkeypatch.setattr(ProbeFitter, "GRAM_ROWS_PER_FEATURE_BF16", 20)  # 960 of 3000 rows: every 4th
    monkeypatch.setattr(ProbeFitter, "GRAM_ROWS_PER_FEATURE_FP32", 20)
    x, y = _layers(layers=2)
    for layer, probe in enumerate(fit_linear_probes(x, y, progress=False)):
        assert _probe_loss(probe, x[layer], y) == pytest.approx(_optimum(x[layer], y), rel=2e-5)


def test_max_iter_stops_early():
    x, y = _layers(layers=1)
    one = fit_linear_probes(x, y, max_iter=1, progress=False)[0]
    full = fit_linear_probes(x, y, progress=False)[0]
    assert _probe_loss(one, x[0], y) > _probe_loss(full, x[0], y) * (1 + 1e-4)


def test_constant_features_and_separable_data_give_finite_probes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g)
    x[:, 2] = 7.0  # constant: no scale, no weight
    y = x[:, 0] > 0  # separable: only the L2 penalty keeps the weights finite
    probe = fit_linear_probes(x[None], y, progress=False)[0]
    assert probe.scale[2] == 0 and probe.weight[2] == 0
    assert all(torch.isfinite(t).all() for t in (probe.weight, probe.bias, probe.mean, probe.scale))
    assert ((probe.predict_proba(x) >= 0.5) == y).float().mean() > 0.98
    kept = [0, 1, 3, 4, 5]  # without the constant feature, the same optimum
    sub = LinearProbe(weight=probe.weight[kept], bias=probe.bias, mean=probe.mean[kept], scale=probe.scale[kept])
    assert _probe_loss(sub, x[:, kept], y) == pytest.approx(_optimum(x[:, kept], y), rel=2e-5)


def test_scratch_buffer_gives_the_same_logits_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2500, 40, generator=g) * 30 + 5  # more rows than one cache block
    probe = LinearProbe(weight=torch.randn(40, generator=g), bias=torch.tensor(0.3),
                        mean=torch.randn(40, generator=g), scale=torch.rand(40, generator=g))
    expected = probe.predict_proba(x)
    assert torch.equal(probe.predict_proba(x, out=torch.empty_like(x)), expected)
    copy = x.clone()
    assert torch.equal(probe.predict_proba(copy, out=copy), expected)  # standardised in place
    batch = x[:60].reshape(3, 20, 40)
    assert torch.equal(probe.predict_proba(batch, out=torch.empty_like(batch)), probe.predict_proba(batch))


def _sparse_signal(n=6000, d=200, seed=0):
    """Many badly scaled features, few of them informative, noisy labels: easy to overfit with little data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-1, 1, d) + 3
    y = (x[:, :4] - 3).sum(1) / 0.1 + 2 * torch.randn(n, generator=g) > 0
    return x, y, torch.arange(n) // 10  # groups: "chunks" of 10 rows


def _balanced_accuracy(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor) -> float:
    predicted = probe.predict(x)
    return 0.5 * float(predicted[y].float().mean() + (~predicted[~y]).float().mean())


def test_auto_l2_is_strong_with_little_data_weak_with_much_and_beats_a_weak_fixed_penalty():
    x, y, groups = _sparse_signal()
    test_x, test_y = x[4000:], y[4000:]
    small = fit_linear_probes(x[None, :400], y[:400], l2="auto", groups=groups[:400], progress=False)[0]
    large = fit_linear_probes(x[None, :4000], y[:4000], l2="auto", groups=groups[:4000], progress=False)[0]
    assert small.metadata["l2"] > large.metadata["l2"]
    weak = fit_linear_probes(x[None, :400], y[:400], l2=1e-4, progress=False)[0]
    assert _balanced_accuracy(small, test_x, test_y) > _balanced_accuracy(weak, test_x, test_y) + 0.01
    # The path went from the strongest penalty down and stopped after the best, whose loss is the lowest.
    path = small.metadata["l2_path"]
    assert [p for p, _ in path] == list(selection.L2_PATH[: len(path)])
    assert min(path, key=lambda step: step[1])[0] == small.metadata["l2"]
    assert len(path) < len(selection.L2_PATH)
    assert "80 training positions set aside" in small.metadata["l2_method"]  # a fifth of 40 groups of 10
    # The final probe is the refit on every row at the chosen penalty: the optimum of that objective.
    penalty = small.metadata["l2"]
    assert _probe_loss(small, x[:400], y[:400], l2=penalty) == pytest.approx(_optimum(x[:400], y[:400], l2=penalty),
                                                                            rel=2e-5)


def test_auto_l2_sets_whole_groups_aside_deterministically():
    y = torch.tensor([0, 1] * 50, dtype=torch.float32)
    groups = torch.arange(100) // 5  # 20 groups
    fit, held = selection.validation_split(groups, y, seed=3)
    assert len(set(groups[held].tolist())) == 4  # a fifth of the groups
    assert not set(groups[held].tolist()) & set(groups[fit].tolist())
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(100))
    again = selection.validation_split(groups, y, seed=3)
    assert torch.equal(again[1], held)
    assert not torch.equal(selection.validation_split(groups, y, seed=4)[1], held)


def test_auto_l2_falls_back_when_the_rows_cannot_be_split():
    x, y = _layers(layers=1, n=200)
    one_group = fit_linear_probes(x, y, l2="auto", groups=torch.zeros(200, dtype=torch.long), progress=False)[0]
    assert one_group.metadata["l2"] == selection.L2_FALLBACK
    assert one_group.metadata["l2_method"].startswith("fallback")
    with pytest.raises(ValueError, match="l2 must be"):
        fit_linear_probes(x, y, l2=-1.0, progress=False)


def test_auto_l2_searches_near_the_previous_layers_choice_and_finds_the_same_penalty():
    x, y, groups = _sparse_signal(n=600)
    drift = torch.randn(600, x.shape[1], generator=torch.Generator().manual_seed(1))
    layers = torch.stack([x + 0.2 * k * drift for k in range(4)])
    near = fit_linear_probes(layers, y, l2="auto", groups=groups, progress=False)
    full = fit_linear_probes(layers, y, l2="auto", groups=groups, progress=False, warm_start=False)
    assert [p.metadata["l2"] for p in near] == [p.metadata["l2"] for p in full]
    assert near[0].metadata["l2_path"] == full[0].metadata["l2_path"]  # the first layer has no neighbour
    # Later layers start at the previous choice: fewer fits than the path from the strongest penalty.
    assert near[1].metadata["l2_path"][0][0] == near[0].metadata["l2"]
    assert sum(len(p.metadata["l2_path"]) for p in near[1:]) < sum(len(p.metadata["l2_path"]) for p in full[1:])
