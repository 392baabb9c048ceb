"""The solver behind the logistic probes: L-BFGS preconditioned by the Hessian, with exact line
searches, on standardised inputs, in float32. Moved whole: its methods share buffers."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tokenprobe.device import native_bfloat16_matmul

ROWS_IN_CACHE = 1024  # rows of hidden states processed at a time where a temporary should stay in cache


class Solution(NamedTuple):
    """A fitted probe in standardised coordinates: logit = ((x - mean) * scale) . weight + bias."""

    weight: torch.Tensor  # (hidden,)
    bias: torch.Tensor  # ()


def standardised_logits(hidden: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a probe with input standardisation (mean, scale) for hidden states of shape (..., hidden).

    `out`, a float32 tensor shaped like `hidden` on its device (`hidden` itself if it may be
    overwritten), receives the standardised inputs instead of two fresh temporaries: the same
    operations, so the same logits, bit for bit, without allocating (and faulting in) their memory.
    """
    x = hidden.to(torch.float32)
    mean, scale = mean.to(x.device), scale.to(x.device)
    if out is None:
        z = (x - mean) * scale
    elif x.dim() == 2:
        z = out
        for first in range(0, len(x), ROWS_IN_CACHE):  # each block scaled while it is in cache
            rows = slice(first, first + ROWS_IN_CACHE)
            torch.sub(x[rows], mean, out=out[rows]).mul_(scale)
    else:
        z = torch.sub(x, mean, out=out).mul_(scale)
    return z @ weight.to(x.device) + bias.to(x.device)


class ProbeFitter:
    """Fits one layer after another, reusing its (n, hidden) buffers (fresh pages cost as much as a pass).

    The objective, in standardised coordinates z = (x - mean) * scale with theta = (w, b):

        f(theta) = sum_i v_i * BCE(z_i . w + b, y_i) + l2 / 2 * |w|^2,   v = sample weight / its sum,

    is convex, and strongly so in w. Standardised residual-stream features are strongly correlated, so
    plain L-BFGS needs hundreds of passes over z. Here its initial inverse Hessian is P^-1, with P the
    Hessian at the starting point (Z'DZ from a share of the rows, in bfloat16 where the CPU multiplies
    bfloat16 natively: a preconditioner only steers the steps, gradients and losses stay float32), and
    every step is an exact line search: z @ d is computed once, and the one-dimensional Newton steps on
    it cost O(n) each. An iteration is thus two passes over z (z @ d and r @ z).

    It stops when the model's predicted decrease -g.d/2 falls below `REL_TOL` times the loss (the gap
    to the minimum, which that estimates, measured at most ~7x as large on real activations), when a
    step no longer lowers the loss (float32 noise), or after `max_iter` iterations.
    """

    REL_TOL = 1e-6
    HISTORY = 10
    GRAM_ROWS_PER_FEATURE_BF16 = 16  # rows of z in the Gram matrix (preconditioner), per hidden unit
    GRAM_ROWS_PER_FEATURE_FP32 = 8  # the same in float32, on CPUs without native bfloat16
    BLOCK = ROWS_IN_CACHE

    def __init__(self, n: int, hidden: int, y: torch.Tensor, pos_weight: float, max_iter: int, device: torch.device):
        if n < 1:
            raise ValueError("no training positions")
        self.n, self.hidden, self.max_iter, self.device = n, hidden, int(max_iter), device
        self.l2 = 0.0  # set by each fit
        self.y = y
        weight = torch.where(y > 0.5, float(pos_weight), 1.0)
        self.v = weight / weight.sum()  # normalised sample weights
        self.ones = torch.ones(n, device=device)
        self.z = torch.empty(n, hidden, device=device)
        self.work = torch.empty(min(n, self.BLOCK), hidden, device=device)
        self.bf16 = native_bfloat16_matmul(device)
        per_feature = self.GRAM_ROWS_PER_FEATURE_BF16 if self.bf16 else self.GRAM_ROWS_PER_FEATURE_FP32
        rows = n if device.type != "cpu" else min(n, per_feature * hidden)
        self.every = -(-n // rows)  # the Gram uses every `every`-th row
        self.gram_rows = len(range(0, n, self.every))
        if self.bf16:
            self.zb = torch.empty(self.gram_rows, hidden, device=device, dtype=torch.bfloat16)
            self.zb_weighted = torch.empty_like(self.zb)
        self.iterations: list[int] = []  # per fitted layer, for diagnostics and tests

    def _standardise(self, x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """z = (x - mean) * scale into the buffer; mean and 1/scale are ``x.mean(0)`` and ``x.std(0)`` (to rounding)."""
        z, n = self.z, self.n
        if rows is not None:
            rows = rows.to(x.device)
            x = torch.index_select(x, 0, rows, out=z) if x.device == z.device and x.dtype == z.dtype \
                else z.copy_(x.index_select(0, rows))
        elif x.device != z.device or x.dtype != z.dtype:
            x = z.copy_(x)
        mean = torch.mv(x.T, self.ones) / n
        torch.sub(x, mean, out=z)
        squares = torch.zeros(self.hidden, device=self.device)
        for first in range(0, n, self.BLOCK):  # squares block by block, while the block is in cache
            block = z[first:first + self.BLOCK]
            work = torch.mul(block, block, out=self.work[:len(block)])
            squares.add_(torch.mv(work.T, self.ones[:len(block)]))
        std = (squares / (n - 1)).sqrt()
        scale = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))
        z.mul_(scale)
        if self.bf16:
            self.zb.copy_(z[::self.every])
        return mean, scale

    def _residual(self, s: torch.Tensor) -> torch.Tensor:
        return self.v * (torch.sigmoid(s) - self.y)

    def _loss(self, s: torch.Tensor, w: torch.Tensor) -> float:
        data = torch.nn.functional.binary_cross_entropy_with_logits(s, self.y, weight=self.v, reduction="sum")
        return float(data + 0.5 * self.l2 * (w @ w))

    def _gradient(self, r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        g = torch.empty_like(theta)
        torch.mv(self.z.T, r, out=g[:-1])
        g[:-1].add_(theta[:-1], alpha=self.l2)
        g[-1] = r.sum()
        return g

    def _curvature(self, s: torch.Tensor) -> torch.Tensor:
        """The data part of the Hessian at logits `s`: [[Z'DZ, Z'D1], [1'DZ, 1'D1]], D = v p (1-p)."""
        z, h, every = self.z, self.hidden, self.every
        p = torch.sigmoid(s)
        d = self.v * p * (1 - p)
        sampled = d[::every].sum()
        d_rows = d[::every] * (d.sum() / sampled if sampled > 0 else 1.0)  # the sampled rows stand for all rows
        hessian = torch.empty(h + 1, h + 1, device=self.device)
        if self.bf16:
            weighted = torch.mul(self.zb, d_rows.to(torch.bfloat16)[:, None], out=self.zb_weighted)
            gram = (weighted.T @ self.zb).float()
            hessian[:h, :h] = 0.5 * (gram + gram.T)
        else:
            sub = z[::every]
            hessian[:h, :h] = (sub * d_rows[:, None]).T @ sub
        hessian[:h, h] = torch.mv(z.T, d)
        hessian[h, :h] = hessian[:h, h]
        hessian[h, h] = d.sum()
        return hessian

    def _preconditioner(self, curvature: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of the Hessian: `curvature` plus the current l2 on the weights' diagonal."""
        h = self.hidden
        hessian = curvature.clone()
        hessian.diagonal()[:h] += self.l2
        lift = 1e-3 * float(hessian.diagonal().abs().mean())
        for _ in range(10):
            factor, info = torch.linalg.cholesky_ex(hessian)
            if int(info) == 0 and torch.isfinite(factor.diagonal()).all():  # a NaN anywhere reaches the diagonal
                return factor
            # rounding (bfloat16) can leave the sampled Gram matrix slightly indefinite, and saturated
            # probabilities (p(1 - p) = 0) singular: lift its diagonal
            lift = lift * 10 if lift > 0 and math.isfinite(lift) else 1e-6
            hessian.diagonal().add_(lift)
        return torch.eye(h + 1, device=self.device)  # no usable curvature: plain (scaled) L-BFGS

    def fit(self, x: torch.Tensor, rows: torch.Tensor | None,
            start: tuple[torch.Tensor, torch.Tensor] | None, l2: float) -> Solution:
        self.prepare(x, rows)
        return self.solve(start, l2)

    def prepare(self, x: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Standardises the rows once, for any number of `solve` calls (penalties) on them."""
        self.mean, self.scale = self._standardise(x, rows)
        self.curvature = None

    def solve(self, start: tuple[torch.Tensor, torch.Tensor] | None, l2: float) -> Solution:
        """The probe minimising the objective with penalty `l2` on the prepared rows, from `start`.

        The data part of the preconditioner (the Gram matrix) is computed at the first solve after
        `prepare`; later solves only add their own penalty to its diagonal. A preconditioner only steers
        the steps, so a slightly stale one changes the time taken, not the optimum.
        """
        self.l2 = float(l2)
        theta, s, f = self._start(start)
        if self.curvature is None:
            self.curvature = self._curvature(s)
        theta = self._minimise(theta, s, f, self._preconditioner(self.curvature))
        return Solution(weight=theta[:-1].clone().cpu(), bias=theta[-1].clone().cpu())

    def _start(self, start: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(theta, logits, loss) at `start`, or at zero where that is lower."""
        z, h = self.z, self.hidden
        theta = torch.zeros(h + 1, device=self.device)
        s = torch.zeros(self.n, device=self.device)
        f = self._loss(s, theta[:-1])  # log 2
        if start is not None:
            warm = torch.cat([start[0].reshape(-1), start[1].reshape(1)]).to(self.device, torch.float32)
            s_warm = torch.mv(z, warm[:-1]).add_(warm[-1])
            f_warm = self._loss(s_warm, warm[:-1])
            if f_warm < f:  # a start worse than zero is no start
                theta, s, f = warm, s_warm, f_warm
        return theta, s, f

    def _minimise(self, theta: torch.Tensor, s: torch.Tensor, f: float, factor: torch.Tensor) -> torch.Tensor:
        """theta = (w, b) minimising the objective on the standardised rows, from `theta` (logits `s`, loss
        `f`), with the preconditioner's Cholesky `factor`."""
        z = self.z

        def precondition(vector: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(vector[:, None], factor)[:, 0]

        g = self._gradient(self._residual(s), theta)
        history: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]] = []  # s, y, 1/s.y, P^-1 y
        iterations = 0
        while iterations < self.max_iter:
            direction = self._direction(g, history, precondition)
            slope = float(g @ direction)
            if not slope < 0:
                if not history:
                    break
                history.clear()  # stale curvature pairs: restart from the preconditioned gradient
                continue
            if -0.5 * slope <= self.REL_TOL * abs(f):
                break
            iterations += 1
            u = torch.mv(z, direction[:-1]).add_(direction[-1])
            step, p = self._line_search(s, u, theta[:-1], direction[:-1], slope)
            s = s.add_(u, alpha=step)
            theta_new = theta + step * direction
            r = self.v * (p - self.y) if p is not None else self._residual(s)
            f_new = self._loss(s, theta_new[:-1])
            if not math.isfinite(f_new):  # cannot happen with finite inputs; keep the last good point
                break
            g_new = self._gradient(r, theta_new)
            s_k, y_k = theta_new - theta, g_new - g
            sy = float(s_k @ y_k)
            if sy > 0:
                history.append((s_k, y_k, 1.0 / sy, precondition(y_k)))
                if len(history) > self.HISTORY:
                    history.pop(0)
            decreased = f_new < f
            theta, g, f = theta_new, g_new, f_new
            if not decreased:  # no decrease left above float32 noise
                break
        self.iterations.append(iterations)
        return theta

    @staticmethod
    def _direction(g: torch.Tensor, history: list, precondition) -> torch.Tensor:
        """L-BFGS two-loop recursion with initial inverse Hessian gamma * P^-1."""
        q = -g
        alphas = []
        for s_k, y_k, rho, _ in reversed(history):
            alpha = rho * float(s_k @ q)
            alphas.append(alpha)
            q = q - alpha * y_k
        gamma = 1.0
        if history:
            _, y_k, rho, py_k = history[-1]
            gamma = (1.0 / rho) / float(y_k @ py_k)
        q = gamma * precondition(q)
        for (s_k, y_k, rho, _), alpha in zip(history, reversed(alphas)):
            beta = rho * float(y_k @ q)
            q = q + (alpha - beta) * s_k
        return q

    def _line_search(self, s: torch.Tensor, u: torch.Tensor, w: torch.Tensor, dw: torch.Tensor,
                     slope: float) -> tuple[float, torch.Tensor | None]:
        """Minimises f(theta + a d) over a > 0 (convex in a) by safeguarded Newton steps on its derivative.

        Returns the step and the probabilities there (None if they were not computed at that step).
        """
        vu = self.v * u
        wd, dd = float(w @ dw), float(dw @ dw)
        step, low, high = 1.0, 0.0, math.inf
        for _ in range(30):
            p = torch.sigmoid(s + step * u)
            derivative = float(vu @ (p - self.y)) + self.l2 * (wd + step * dd)
            if abs(derivative) <= 0.05 * abs(slope):
                return step, p
            if derivative < 0:
                low = step
            else:
                high = step
            curvature = float((vu * u) @ (p * (1 - p))) + self.l2 * dd
            new = step - derivative / curvature if curvature > 0 else math.nan
            if not low < new < high:
                new = 0.5 * (low + high) if math.isfinite(high) else 2.0 * step
            step = new
        return step, None
