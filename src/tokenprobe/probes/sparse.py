"""The sparse probe: L1-regularised logistic regression on one layer's standardised residual stream,
fitted layer by layer in float32 with the penalty chosen per layer (``l1="auto"``, like ``--l2 auto``).

Like the linear probe it carries its own input standardisation (the same mean and scale, computed the
same way), so ``predict_proba`` takes raw hidden states; most of its weights are exactly zero, and
``fit_info`` says which dimensions it kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.probes.lbfgs import ProbeFitter, Solution, standardised_logits
from tokenprobe.probes.linear import TENSORS, LinearProbe  # noqa: F401 (TENSORS: the same file layout)
from tokenprobe.probes.selection import PATIENCE, validation_split

L1_PATH = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)  # tried from the strongest down
L1_FALLBACK = 1e-3  # for l1="auto" when the training rows cannot be split (one group, or one class aside)
KEPT_DIMS = 50  # fit_info["kept_dims"] lists at most this many of the kept dimensions, largest |weight| first


@dataclass
class SparseProbe(LinearProbe):
    """A linear probe whose `weight` is sparse: logit = ((x - mean) * scale) . weight + bias, fitted with an
    L1 penalty (its tensors, file layout, logits and direction are the linear probe's)."""

    kind: ClassVar[str] = "sparse"  # fit_info: l1, l1_method, l1_path, l1_path_kept, kept, kept_dims

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, groups: torch.Tensor | None = None, seed: int = 0,
            pos_weight: float = 1.0, **opts) -> SparseProbe:
        """Fits on (n, hidden) hidden states and (n,) 0/1 labels; returns self. `opts`: the keyword
        arguments of :func:`fit_sparse_probes` (l1, max_iter, device)."""
        opts.setdefault("device", x.device)
        fitted = fit_sparse_probes([x], y, groups=groups, seed=seed, pos_weight=pos_weight, progress=False, **opts)[0]
        self.weight, self.bias, self.mean, self.scale = fitted.weight, fitted.bias, fitted.mean, fitted.scale
        self.fit_info = fitted.fit_info
        return self

    def kept_dims(self) -> torch.Tensor:
        """Every kept (nonzero-weight) dimension, largest |weight| (standardised) first."""
        return _kept_order(self.weight)


def _kept_order(weight: torch.Tensor) -> torch.Tensor:
    """Indices of the nonzero weights, by |weight| descending (ties: lower index first)."""
    weight = weight.detach().cpu()
    kept = torch.nonzero(weight).flatten()
    order = torch.sort(weight[kept].abs(), descending=True, stable=True).indices
    return kept[order]


class SparseFitter(ProbeFitter):
    """Fits the L1-penalised logistic objective on standardised rows by a working-set proximal Newton method.

    The objective, in the standardised coordinates z = (x - mean) * scale of :class:`ProbeFitter`
    (whose standardisation and buffers it reuses, so a sparse probe standardises exactly as a linear
    one) with theta = (w, b):

        F(theta) = sum_i v_i * BCE(z_i . w + b, y_i) + l1 * |w|_1,   v = sample weight / its sum,

    so `l1` is on the scale of the mean loss (scikit-learn's ``C`` is ``1 / (l1 * n)`` without sample
    weights). Each outer iteration:

    1. takes the exact gradient g (one float32 pass over z) and the working set: the nonzero weights
       and the zero weights whose |g_j| exceeds l1 (every other weight is optimal at zero to first order);
    2. builds the Hessian Z_A' D Z_A (D = v p (1 - p)) of the working set's columns from every row, in
       bfloat16 on devices that multiply it natively (3x faster here) and float32 elsewhere: the Hessian
       only steers the steps, the gradient and the objective decide where they stop. Its cost, n |A|^2,
       grows as the penalty weakens and more dimensions are kept. After a small full step that the model
       predicted well, the next iteration reuses it;
    3. minimises the quadratic model g.d + d'Hd/2 + l1 |w + d|_1 on the working set in float64, by rounds
       of a coordinate-descent sweep and a Newton step on the nonzero weights with their signs fixed
       (see `_model_step`);
    4. takes an Armijo line search on the true objective (summed in float64) along that step, one
       pass over z for the step's logits.

    It stops when the model's predicted decrease falls below `REL_TOL` times the objective, when a step
    no longer lowers it (rounding), or after `max_iter` iterations. From a neighbouring penalty's
    solution a `solve` takes a few iterations (Newton: quadratic convergence near the end).
    """

    REL_TOL = 1e-7  # ten times ProbeFitter's: which weights are exactly zero depends on the last digits
    INNER_REL_TOL = 1e-4  # coordinate descent stops when a sweep gains under this share of the model's decrease
    INNER_ROUNDS = 50  # at most, per outer iteration
    ARMIJO = 0.25

    def __init__(self, n: int, hidden: int, y: torch.Tensor, pos_weight: float, max_iter: int, device: torch.device):
        super().__init__(n, hidden, y, pos_weight, max_iter, device)
        if self.bf16:  # ProbeFitter's sampled bfloat16 rows (its preconditioner): one row, unused here
            self.every, self.gram_rows = n, 1
            self.zb, self.zb_weighted = torch.empty(1, hidden, device=device, dtype=torch.bfloat16), None
        # z transposed, in bfloat16 on devices that multiply it natively (3x faster here; the Hessian only
        # steers the steps, the float32 gradient and the objective decide where they stop), else float32
        self.zt = torch.empty(hidden, n, device=device, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        self.l1 = 0.0
        self.y64, self.v64 = self.y.double(), self.v.double()

    def _loss(self, s: torch.Tensor, w: torch.Tensor) -> float:
        """F at logits `s` and weights `w`, summed in float64 (O(n): float32 sums would hide the last decreases)."""
        data = torch.nn.functional.binary_cross_entropy_with_logits(s.double(), self.y64, weight=self.v64,
                                                                    reduction="sum")
        return float(data) + self.l1 * float(w.double().abs().sum())

    def solve(self, start: tuple[torch.Tensor, torch.Tensor] | None, l1: float) -> Solution:
        """The probe minimising the objective with penalty `l1` on the prepared rows, from `start`."""
        self.l1, self.l2 = float(l1), 0.0
        theta, s, f = self._start(start)
        constant = torch.nonzero(self.scale == 0).flatten()
        if len(constant) and bool((theta[constant] != 0).any()):  # a start from another layer: no weight there
            theta[constant] = 0.0
            f = self._loss(s, theta[:-1])  # z is zero there: the logits stay
        iterations = 0
        last = None  # (Hessian, its coordinates) when the last step showed it still fits (see below)
        while iterations < self.max_iter:
            p = torch.sigmoid(s)
            g = self._gradient(self.v * (p - self.y), theta)
            working = torch.nonzero((theta[:-1] != 0) | (g[:-1].abs() > self.l1)).flatten()
            coords = torch.cat([working, torch.tensor([self.hidden], device=working.device)])
            reused = last is not None and bool(torch.isin(coords, last[1]).all())
            if reused:
                where = torch.searchsorted(last[1], coords).cpu().numpy()
                hessian = last[0][np.ix_(where, where)]
            else:
                hessian = self._block_hessian(working, self.v * p * (1 - p))
            step, model_decrease, linear_decrease = _model_step(
                hessian, g[coords].double().cpu().numpy(), theta[coords].double().cpu().numpy(), self.l1,
                self.INNER_REL_TOL, self.INNER_ROUNDS)
            last = None
            if -model_decrease <= self.REL_TOL * abs(f):
                break
            iterations += 1
            full = torch.zeros(self.hidden + 1, device=self.device)
            full[coords] = torch.from_numpy(step).to(self.device, torch.float32)
            u = torch.mv(self.z, full[:-1]).add_(full[-1])
            accepted, t = None, 1.0
            for _ in range(30):  # F is convex along the step; its L1 part is piecewise linear
                candidate = theta + t * full  # a full step keeps the model's exact zeros: w + (0 - w) == 0
                s_new = torch.add(s, u, alpha=t)
                f_new = self._loss(s_new, candidate[:-1])
                if f_new <= f + self.ARMIJO * t * linear_decrease:
                    accepted = candidate, s_new, f_new
                    break
                t *= 0.5
            if accepted is None or not accepted[2] < f:
                if reused:
                    continue  # the reused Hessian no longer fits: a fresh one
                break  # no decrease left above rounding
            if t == 1.0 and 0.8 <= (accepted[2] - f) / model_decrease <= 1.25 and -model_decrease < 1e-3 * f:
                last = hessian, coords  # a small full step the model predicted well: its Hessian still fits
            theta, s, f = accepted
        self.iterations.append(iterations)
        return Solution(weight=theta[:-1].clone().cpu(), bias=theta[-1].clone().cpu())

    def prepare(self, x: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Standardises the rows (ProbeFitter) and keeps z transposed, so the Hessian gathers whole rows."""
        super().prepare(x, rows)
        for first in range(0, self.n, self.BLOCK):  # a block at a time: the transpose stays in cache
            self.zt[:, first:first + self.BLOCK].copy_(self.z[first:first + self.BLOCK].T)

    def _block_hessian(self, working: torch.Tensor, d: torch.Tensor) -> np.ndarray:
        """The data Hessian of (w_A, b), [[Z_A'DZ_A, Z_A'D1], [1'DZ_A, 1'D1]], in float64 for the model step."""
        k = len(working)
        hessian = torch.empty(k + 1, k + 1, device=self.device)
        if k:
            z_a = self.zt.index_select(0, working)  # (k, n)
            hessian[:k, :k] = ((z_a * d.to(z_a.dtype)) @ z_a.T).float()
            hessian[:k, k] = torch.mv(self.z.T, d)[working]
            hessian[k, :k] = hessian[:k, k]
        hessian[k, k] = d.sum()
        return _positive_definite(hessian.double().cpu())


def _positive_definite(hessian: torch.Tensor) -> np.ndarray:
    """The Hessian, symmetrised, its diagonal lifted just enough for a Cholesky factor: rounding (a bfloat16
    Gram matrix) can leave it slightly indefinite, and saturated probabilities singular; an indefinite
    model would be unbounded below."""
    hessian = 0.5 * (hessian + hessian.T)
    scale = float(hessian.diagonal().abs().mean())
    lifted = hessian
    for power in range(-7, 1):
        if int(torch.linalg.cholesky_ex(lifted)[1]) == 0:
            break
        lifted = hessian + 10.0 ** power * scale * torch.eye(len(hessian), dtype=hessian.dtype)
    return lifted.numpy()


def _model_step(hessian: np.ndarray, g: np.ndarray, theta: np.ndarray, l1: float, rel_tol: float,
                max_rounds: int) -> tuple[np.ndarray, float, float]:
    """Minimises the model m(d) = g.d + d'Hd / 2 + l1 * (|w + d_w|_1 - |w|_1) over d = (d_w, d_b), the
    last coordinate (the bias) unpenalised, in float64.

    Rounds of one cyclic coordinate-descent sweep (which finds the signs: weights leaving or joining
    zero) and one Newton step on the nonzero weights with those signs fixed (see `_newton_step`),
    until a round gains under `rel_tol` of the decrease so far.
    Returns (d, m(d), g.d + l1 * (|w + d_w|_1 - |w|_1)).
    """
    bias = len(g) - 1
    x = theta.copy()  # theta + d
    q = g.copy()  # the model's smooth gradient at x: g + H (x - theta)
    diagonal = np.diagonal(hessian).tolist()
    coords = [j for j in range(len(g)) if diagonal[j] > 1e-12]  # no curvature: a constant feature, kept at zero
    penalised = [j for j in coords if j != bias]
    total = 0.0  # m(x - theta)
    for _ in range(max_rounds):
        gained = 0.0
        if bias in coords:  # the bias: unpenalised
            delta = -q[bias] / diagonal[bias]
            gained += 0.5 * q[bias] * delta
            x[bias] += delta
            q += delta * hessian[bias]
        for j in penalised:
            a, old, qj = diagonal[j], x[j], q[j]
            c = a * old - qj
            new = math.copysign((abs(c) - l1) / a, c) if abs(c) > l1 else 0.0
            if new != old:
                delta = new - old
                x[j] = new
                q += delta * hessian[j]
                gained += qj * delta + 0.5 * a * delta * delta + l1 * (abs(new) - abs(old))
        gained += _newton_step(hessian, q, x, bias, l1)
        total += gained
        if gained >= 0.0 or -gained <= rel_tol * -total:
            break
    step = x - theta
    linear = float(g @ step) + l1 * float(np.abs(x[:-1]).sum() - np.abs(theta[:-1]).sum())
    return step, linear + 0.5 * float(step @ hessian @ step), linear


def _newton_step(hessian: np.ndarray, q: np.ndarray, x: np.ndarray, bias: int, l1: float) -> float:
    """With the signs of x fixed, the model on its nonzero weights (and the bias) is a smooth quadratic: a
    Newton step to its minimiser, with the weights it takes across zero set to zero (projected), or, where
    that gains less, the step up to the first weight that reaches zero. Updates x and q; returns the
    model's change (<= 0)."""
    free = np.flatnonzero(x != 0)
    if bias not in free:
        free = np.append(free, bias)
    penalised = free != bias
    before = x[free]
    signs = np.where(penalised, np.sign(before), 0.0)
    q_free = q[free]
    block = np.ascontiguousarray(hessian[np.ix_(free, free)])
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(block))
    if int(info) != 0:
        return 0.0
    newton = -torch.cholesky_solve(torch.from_numpy(q_free + l1 * signs)[:, None], factor)[:, 0].numpy()

    def gain(after: np.ndarray) -> float:
        change = after - before
        return (float(q_free @ change) + 0.5 * float(change @ block @ change)
                + l1 * float(np.abs(after[penalised]).sum() - np.abs(before[penalised]).sum()))

    after = before + newton
    crossed = penalised & (np.sign(after) != signs)
    after[crossed] = 0.0
    best = gain(after)
    if crossed.any():
        ratios = np.where(crossed, -before / np.where(crossed, newton, 1.0), np.inf)
        first = int(np.argmin(ratios))
        partial = before + ratios[first] * newton
        partial[first] = 0.0
        partial_gain = gain(partial)
        if partial_gain < best:
            after, best = partial, partial_gain
    if not best < 0.0:  # rounding: no progress
        return 0.0
    x[free] = after
    q += hessian[:, free] @ (after - before)
    return best


def _validation_loss(probe: Solution, mean, scale, held_x, held_y, held_v) -> float:
    logits = standardised_logits(held_x, mean, scale, *probe).to(held_y.device)
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, held_y, weight=held_v, reduction="sum"))
    return loss if math.isfinite(loss) else math.inf


class L1Chooser:
    """Chooses a layer's l1 on training rows set aside, as `selection.L2Chooser` chooses l2."""

    def __init__(self, split: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, rows: torch.Tensor | None,
                 hidden: int, pos_weight: float, max_iter: int, device: torch.device):
        fit, held = split
        self.fit_rows = rows.to(device)[fit] if rows is not None else fit
        self.held_rows = rows.to(device)[held] if rows is not None else held
        self.fitter = SparseFitter(len(fit), hidden, y[fit], pos_weight, max_iter, device)
        self.fitter.REL_TOL = ProbeFitter.REL_TOL  # enough to rank penalties; the final refit goes ten times further
        self.held_y = y[held]
        weight = torch.where(self.held_y > 0.5, float(pos_weight), 1.0)
        self.held_v = weight / weight.sum()

    def choose(self, x: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor] | None, near: float | None = None):
        """(l1, warm start for the final fit, fit_info) for one layer.

        Without `near`, penalties are tried from the strongest down (each fit warm-started from the
        previous one) until `PATIENCE` steps pass without a new best. With `near` (the previous
        layer's choice), it is tried first, then its stronger neighbours while the loss falls, or
        else its weaker ones.
        """
        self.fitter.prepare(x, self.fit_rows)
        held_x = x.index_select(0, self.held_rows.to(x.device))
        mean, scale = self.fitter.mean.cpu(), self.fitter.scale.cpu()
        tried: dict[int, tuple[float, Solution]] = {}
        path, kept = [], []

        def loss_at(i: int, origin) -> float:
            fitted = self.fitter.solve(origin, L1_PATH[i])
            tried[i] = (_validation_loss(fitted, mean, scale, held_x, self.held_y, self.held_v), fitted)
            path.append([L1_PATH[i], tried[i][0]])
            kept.append(int(torch.count_nonzero(fitted.weight)))
            return tried[i][0]

        if near is None or near not in L1_PATH:
            best, origin = None, start
            for i in range(len(L1_PATH)):
                loss_at(i, origin)
                origin = tried[i][1]
                best = i if best is None or tried[i][0] < tried[best][0] else best
                if i - best >= PATIENCE:
                    break
        else:
            first = L1_PATH.index(near)
            loss_at(first, start)
            for step in (-1, 1):  # stronger penalties first, then weaker ones
                i = first
                while 0 <= i + step < len(L1_PATH) and loss_at(i + step, tried[i][1]) < tried[i][0]:
                    i += step
                if i != first:
                    break
        best = min(tried, key=lambda i: tried[i][0])
        if not math.isfinite(tried[best][0]):  # cannot happen with finite inputs
            return L1_FALLBACK, start, {"l1": L1_FALLBACK, "l1_method": "fallback: no finite validation loss",
                                        "l1_path": path, "l1_path_kept": kept}
        info = {"l1": L1_PATH[best],
                "l1_method": f"lowest log-loss on {len(self.held_rows):,} training positions set aside",
                "l1_path": path, "l1_path_kept": kept}
        return L1_PATH[best], tried[best][1], info


def fit_sparse_probes(
    x: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor,
    *,
    l1: float | str = "auto",
    rows: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    seed: int = 0,
    pos_weight: float = 1.0,
    max_iter: int = 100,
    device: torch.device | str = "cpu",
    progress: bool = True,
    warm_start: bool = True,
) -> list[SparseProbe]:
    """L1-regularised logistic regression per layer: `x` is (layers, n, hidden) or a sequence of
    (n_all, hidden) (float32 or bfloat16, e.g. views of a larger array), `y` the (n,) labels.

    With `rows` (position indices), only those rows of each layer train, gathered one layer at a time
    (as `fit_linear_probes`). Each layer minimises the mean (pos_weight-weighted) logistic loss on its
    standardised inputs plus ``l1 * |w|_1`` (see :class:`SparseFitter`), in float32 with a float64
    working-set solver for the Newton steps. With `warm_start` a layer starts from the previous
    layer's solution; the minimiser is unique where the kept dimensions are not collinear, so the
    start changes the time taken, not the probe (beyond the tolerance). Deterministic: the same inputs
    give the same probes, bit for bit.

    ``l1="auto"`` chooses the penalty per layer like ``l2="auto"``: the training rows of a seeded
    fifth of the `groups` (chunks; each row its own group when None) are set aside, probes are fitted
    on the rest along `L1_PATH` (the first layer from the strongest down until `PATIENCE` penalties
    pass without a better one, later layers near the previous layer's choice; each fit warm-started
    from its neighbour's), and the penalty with the lowest weighted log-loss on the rows set aside is
    refitted on all rows, starting from its solution there. Each probe's ``fit_info`` holds ``l1``,
    ``l1_method``, for auto the path (``l1_path``: [penalty, loss] pairs; ``l1_path_kept``: the
    dimensions each kept), ``kept`` (the number of nonzero weights) and ``kept_dims`` (the first
    `KEPT_DIMS` of them by |weight| descending; `SparseProbe.kept_dims()` lists them all).
    """
    device = torch.device(device)
    y = y.to(device=device, dtype=torch.float32)
    layers = len(x)
    if not layers:
        return []
    n = len(rows) if rows is not None else x[0].shape[0]
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} training positions")
    if not (l1 == "auto" or (isinstance(l1, (int, float)) and not isinstance(l1, bool) and l1 >= 0)):
        raise ValueError(f"l1 must be 'auto' or a number >= 0, got {l1!r}")
    hidden = x[0].shape[-1]
    fitter = SparseFitter(n, hidden, y, pos_weight, max_iter, device)
    chooser = None
    if l1 == "auto":
        split = validation_split(groups if groups is not None else torch.arange(n), y, seed)
        if split is not None:
            chooser = L1Chooser(split, y, rows, hidden, pos_weight, max_iter, device)
    probes: list[SparseProbe] = []
    start, penalty = None, None
    with tqdm(total=layers, desc=f"Training {layers} sparse probe(s)", unit="probe", disable=not progress,
              dynamic_ncols=True) as bar:
        for layer_x in x:
            start = start if warm_start else None
            if chooser is not None:
                penalty, start, info = chooser.choose(layer_x, start, near=penalty if warm_start and probes else None)
            else:
                penalty = L1_FALLBACK if l1 == "auto" else float(l1)
                info = {"l1": penalty, "l1_method": "fixed" if l1 != "auto" else
                        "fallback: the training rows could not be split to choose it"}
            solution = fitter.fit(layer_x, rows, start, penalty)
            order = _kept_order(solution.weight)
            info = {**info, "kept": len(order), "kept_dims": order[:KEPT_DIMS].tolist()}
            probes.append(SparseProbe(solution.weight, solution.bias, fitter.mean.cpu(), fitter.scale.cpu(),
                                      fit_info=info))
            start = solution
            bar.update(1)
    return probes
