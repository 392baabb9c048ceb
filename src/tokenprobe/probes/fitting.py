"""One call fits any family's probes for a run's layers (``--probe linear,mlp,mean-diff,sparse``), and
its online-code description length (``--mdl``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenprobe.config import RunConfig
from tokenprobe.probes.mdl import family_fit, online_code_length


def fit_family(family: str, x: Sequence[torch.Tensor], y: torch.Tensor, *, rows: torch.Tensor | None,
               groups: torch.Tensor, seed: int, pos_weight: float, config: RunConfig,
               device: torch.device | str = "cpu", progress: bool = True) -> list[Any]:
    """`family`'s probe of each layer in `x` (per-layer views of all positions; `rows` the training
    rows, `y` their labels, `groups` their chunks), with the run's options for that family."""
    common = dict(rows=rows, groups=groups, seed=seed, pos_weight=pos_weight, device=device, progress=progress)
    if family == "linear":
        from tokenprobe.probes.linear import fit_linear_probes

        return fit_linear_probes(x, y, l2=config.l2, max_iter=config.max_iter, **common)
    if family == "mlp":
        from tokenprobe.probes.mlp import fit_mlp_probes

        return fit_mlp_probes(x, y, width=config.mlp_width, **common)
    if family == "mean-diff":
        from tokenprobe.probes.mean_diff import fit_mean_diff_probes

        return fit_mean_diff_probes(x, y, **common)
    if family == "sparse":
        from tokenprobe.probes.sparse import fit_sparse_probes

        return fit_sparse_probes(x, y, **common)
    raise ValueError(f"unknown probe family {family!r}")


def description_length(family: str, x: torch.Tensor, y: torch.Tensor, *, groups: torch.Tensor, seed: int,
                       config: RunConfig) -> dict[str, Any]:
    """Online-code MDL of one layer's training rows `x` (n, hidden) for `family`, as the run fits it
    (the MLP's epochs picked by log-loss, since the code is a sum of log-losses)."""
    opts: dict[str, Any] = {}
    if family == "linear":
        opts = {"l2": config.l2, "max_iter": config.max_iter}
    elif family == "mlp":
        opts = {"width": config.mlp_width, "select": "log_loss"}
    return online_code_length(family_fit(family, **opts), x.float(), y, groups=groups, seed=seed)
