"""Choosing a probe's penalty on training chunks set aside (``--l2 auto``), never on held-out ones."""

from __future__ import annotations

import math

import torch

from tokenprobe.probes.lbfgs import ProbeFitter, Solution, standardised_logits

L2_PATH = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)  # tried from the strongest down
L2_FALLBACK = 1e-3  # for l2="auto" when the training rows cannot be split (one group, or one class aside)
VALIDATION_FRACTION = 0.2  # of the training groups (chunks), set aside to choose l2
PATIENCE = 2  # weaker penalties tried after the best one before the path stops


def validation_split(groups: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fit rows, validation rows): the rows of a seeded `VALIDATION_FRACTION` of the groups set aside;
    None when that leaves a side without both classes."""
    unique = torch.unique(groups.cpu())
    if len(unique) < 2:
        return None
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    aside = unique[order[: max(1, round(VALIDATION_FRACTION * len(unique)))]]
    held = torch.isin(groups.cpu(), aside).to(y.device)
    for part in (held, ~held):
        labels = y[part]
        if len(labels) == 0 or bool((labels > 0.5).all()) or bool((labels < 0.5).all()):
            return None
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


class L2Chooser:
    """Chooses a layer's l2 on training rows set aside (see fit_linear_probes)."""

    def __init__(self, split: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, rows: torch.Tensor | None,
                 hidden: int, pos_weight: float, max_iter: int, device: torch.device):
        fit, held = split
        self.fit_rows = rows.to(device)[fit] if rows is not None else fit
        self.held_rows = rows.to(device)[held] if rows is not None else held
        self.fitter = ProbeFitter(len(fit), hidden, y[fit], pos_weight, max_iter, device)
        self.held_y = y[held]
        weight = torch.where(self.held_y > 0.5, float(pos_weight), 1.0)
        self.held_v = weight / weight.sum()

    def choose(self, x: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor] | None, near: float | None = None):
        """(l2, warm start for the final fit, metadata) for one layer.

        Without `near`, penalties are tried from the strongest down until `PATIENCE` steps pass without
        a new best. With `near` (the previous layer's choice: neighbouring layers want nearly the same
        penalty), it is tried first, then its stronger neighbours while the loss falls, or else its
        weaker ones: about half the fits.
        """
        self.fitter.prepare(x, self.fit_rows)
        held_x = x.index_select(0, self.held_rows.to(x.device))
        tried: dict[int, tuple[float, Solution]] = {}
        path = []

        def loss_at(i: int, origin: tuple[torch.Tensor, torch.Tensor] | None) -> float:
            fitted = self.fitter.solve(origin, L2_PATH[i])
            logits = standardised_logits(held_x, self.fitter.mean.cpu(), self.fitter.scale.cpu(), *fitted
                                         ).to(self.held_y.device)
            loss = float(torch.nn.functional.binary_cross_entropy_with_logits(
                logits, self.held_y, weight=self.held_v, reduction="sum"))
            tried[i] = (loss if math.isfinite(loss) else math.inf, fitted)
            path.append([L2_PATH[i], loss])
            return tried[i][0]

        def solution(i: int) -> Solution:
            return tried[i][1]

        if near is None or near not in L2_PATH:
            best, origin = None, start
            for i in range(len(L2_PATH)):
                loss_at(i, origin)
                origin = solution(i)
                best = i if best is None or tried[i][0] < tried[best][0] else best
                if i - best >= PATIENCE:
                    break
        else:
            first = L2_PATH.index(near)
            loss_at(first, start)
            for step in (-1, 1):  # stronger penalties first, then weaker ones
                i = first
                while 0 <= i + step < len(L2_PATH) and loss_at(i + step, solution(i)) < tried[i][0]:
                    i += step
                if i != first:
                    break
        best = min(tried, key=lambda i: tried[i][0])
        if not math.isfinite(tried[best][0]):  # cannot happen with finite inputs
            return L2_FALLBACK, start, {"l2": L2_FALLBACK, "l2_method": "fallback: no finite validation loss",
                                        "l2_path": path}
        info = {"l2": L2_PATH[best],
                "l2_method": f"lowest log-loss on {len(self.held_rows):,} training positions set aside",
                "l2_path": path}
        return L2_PATH[best], solution(best), info
