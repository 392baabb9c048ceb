"""WandB tracking: one WandB run per layer, the runs of one sweep in one group.

Run names follow ``probe-layer5-ctx256-all-next-gemma-3-270m`` (:func:`tokenprobe.config.run_name`),
the group is :func:`tokenprobe.config.sweep_name`, ``balanced_accuracy`` is the primary summary
metric, and TP/FP/TN/FN, AUROC, the 95% intervals and every baseline are logged per layer; the full
run record (config included) is the WandB config.

Without credentials (no ``WANDB_API_KEY`` and no ``api.wandb.ai`` entry in ~/.netrc) and without an
explicit ``WANDB_MODE``, runs are written offline into the run folder (``<run>/wandb/``) and the
user is told how to upload them with ``wandb sync``. Nothing ever waits for a login prompt.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tokenprobe.analysis.metrics import flat_metrics
from tokenprobe.errors import TokenprobeError
from tokenprobe.files import json_safe
from tokenprobe.vocabulary import LOGIT_LENS, PRIMARY_METRIC, PRIMARY_SET
INIT_TIMEOUT_S = 30


def has_credentials() -> bool:
    """True when WandB could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_mode() -> tuple[str, str | None]:
    """The WandB mode to use and, when it was chosen for the user, why."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit, None
    if not has_credentials():
        return "offline", "no WandB credentials found (WANDB_API_KEY or `wandb login`)"
    return "online", None


def layer_metrics(result, layer_result) -> dict[str, Any]:
    """The flat per-layer metrics logged to one WandB run (NaN left out): the probe's per set, its logit
    lens and AUROC fraction of the model's, and every run-level baseline."""
    def prefix(subset: str) -> str:
        return "" if subset == PRIMARY_SET else f"{subset}/"

    out: dict[str, Any] = {"layer": layer_result.layer}
    for subset, m in layer_result.metrics.items():
        out.update(flat_metrics(m, layer_result.intervals.get(subset, {}), prefix(subset)))
    for subset, m in layer_result.logit_lens.items():
        out.update(flat_metrics(m, layer_result.logit_lens_intervals.get(subset, {}),
                                f"{prefix(subset)}baseline/{LOGIT_LENS}/"))
    for subset, (value, low, high) in layer_result.auroc_fraction_of_model.items():
        key = f"{prefix(subset)}auroc_fraction_of_model"
        out.update({key: value, f"{key}_low": low, f"{key}_high": high})
    for b in result.baselines:
        for subset, m in b.metrics.items():
            out.update(flat_metrics(m, b.intervals.get(subset, {}), f"{prefix(subset)}baseline/{b.name}/"))
    return {k: v for k, v in json_safe(out).items() if v is not None}


def log_to_wandb(result, say: Callable[[str], None] = print, project: str | None = None,
                 wandb_dir: Path | None = None) -> list[Path]:
    """Logs every layer of a finished run as one WandB run in the sweep's group; returns their folders."""
    try:
        import wandb
    except ImportError as exc:
        raise TokenprobeError("--wandb needs the wandb package: pip install wandb") from exc

    mode, why = choose_mode()
    record = result.record
    group = record["sweep_name"]
    base = Path(wandb_dir) if wandb_dir else (Path(result.out_dir) if result.out_dir else Path.cwd())
    base.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    folders: list[Path] = []
    for layer_result in result.layers:
        settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=True, console="off",
                                  x_disable_stats=True, x_disable_meta=True)
        config = {**record["config"], "layer": layer_result.layer, "l2_chosen": layer_result.l2, "run": record}
        kwargs = dict(project=project or result.config.wandb_project, group=group, name=layer_result.run_name,
                      job_type="probe", config=config, dir=str(base), reinit="finish_previous", settings=settings)
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # network down or login refused: never block the run on it
            if mode == "offline":
                raise TokenprobeError(f"WandB could not start even offline: {exc}") from exc
            mode, why = "offline", f"WandB could not reach its server ({type(exc).__name__})"
            run = wandb.init(mode=mode, **kwargs)
        run.define_metric(PRIMARY_METRIC, summary="max")
        metrics = layer_metrics(result, layer_result)
        run.log(metrics)
        for key, value in metrics.items():
            run.summary[key] = value
        folders.append(Path(run.dir).parent)
        run.finish()
    wandb.teardown()  # flushes the offline files now, not at interpreter exit
    if mode == "offline":
        say(f"WandB: {why + '; ' if why else ''}logged {len(folders)} run(s) offline in group {group!r} under "
            f"{base / 'wandb'}; upload them later with: wandb sync {base / 'wandb'}/offline-run-*")
    else:
        say(f"WandB: logged {len(folders)} run(s) in group {group!r} of project "
            f"{project or result.config.wandb_project!r}")
    return folders
