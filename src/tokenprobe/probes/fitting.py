"""One call fits any family's probes for a run's layers (``--probe linear,mlp,mean-diff,sparse``), and
its online-code description length (``--mdl``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

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


def fit_control(family: str, x: Sequence[torch.Tensor], y: torch.Tensor, task_probes: Sequence[Any], *,
                rows: torch.Tensor | None, groups: torch.Tensor, seed: int, pos_weight: float, config: RunConfig,
                device: torch.device | str = "cpu", progress: bool = True) -> list[Any]:
    """`family`'s probes of the control task, each with the hyperparameters its task probe was given
    (Hewitt & Liang 2019: the same probe, other labels): the linear probe's L2 penalty, the sparse probe's
    L1 penalty, the MLP's number of epochs (the task's best; the control's best of those is kept).
    Choosing them again on control labels would tune each control probe to memorise as well as it can,
    and would cost the penalty path and the early stopping a second time."""
    if family == "mean-diff":  # no hyperparameters
        return fit_family(family, x, y, rows=rows, groups=groups, seed=seed, pos_weight=pos_weight, config=config,
                          device=device, progress=progress)
    common = dict(rows=rows, groups=groups, seed=seed, pos_weight=pos_weight, device=device, progress=False)
    fitted: list[Any] = []
    with tqdm(total=len(x), desc=f"Training {len(x)} {family} control probe(s)", unit="probe",
              disable=not progress, dynamic_ncols=True) as bar:
        for view, task in zip(x, task_probes):
            info = task.fit_info
            if family == "linear":
                from tokenprobe.probes.linear import fit_linear_probes

                fitted += fit_linear_probes([view], y, l2=info["l2"], max_iter=config.max_iter, **common)
            elif family == "sparse":
                from tokenprobe.probes.sparse import fit_sparse_probes

                fitted += fit_sparse_probes([view], y, l1=info["l1"], **common)
            elif family == "mlp":
                from tokenprobe.probes.mlp import fit_mlp_probes

                epochs = max(1, int(info.get("best_epoch") or info.get("epochs") or 1))
                fitted += fit_mlp_probes([view], y, width=config.mlp_width, max_epochs=epochs, patience=epochs,
                                         **common)
            else:
                raise ValueError(f"unknown probe family {family!r}")
            bar.update(1)
    return fitted


def description_length(family: str, x: torch.Tensor, y: torch.Tensor, *, groups: torch.Tensor, seed: int,
                       config: RunConfig) -> dict[str, Any]:
    """Online-code MDL of one layer's training rows `x` (n, hidden) for `family`, with the run's options
    for that family, unweighted (a code length counts every label alike), the MLP's epochs picked by
    log-loss (the code is a sum of log-losses). Fits run on `x`'s device."""
    opts: dict[str, Any] = {}
    if family == "linear":
        opts = {"l2": config.l2, "max_iter": config.max_iter}
    elif family == "mlp":
        opts = {"width": config.mlp_width, "select": "log_loss"}
    return online_code_length(family_fit(family, **opts), x.float(), y, groups=groups, seed=seed)
