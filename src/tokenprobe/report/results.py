"""Per-layer results: the terminal table, results.json (NaN as null) and results.csv."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from tokenprobe.analysis.metrics import BaselineResult, BinaryMetrics, Intervals, LayerResult, flat_metrics
from tokenprobe.files import atomic_write_bytes, json_safe, write_json
from tokenprobe.report.families import write_families_csv
from tokenprobe.vocabulary import EVAL, EVAL_NATURAL, SET_DESCRIPTIONS, best_index


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ci(intervals: Intervals, name: str) -> str:
    low, high = intervals.get(name, (float("nan"), float("nan")))
    return "" if math.isnan(low) else f"[{low:.3f},{high:.3f}]"


def format_table(layers: list[LayerResult], baselines: list[BaselineResult] | None = None,
                 indistinguishable: list[int] | None = None) -> str:
    """The end-of-run table: held-out balanced metrics with 95% intervals, logit lens, confusion matrix,
    natural-ratio figures; then the run-level baselines. Without intervals (--bootstrap 0) the interval
    columns are left out and the footnote says so."""
    intervals = any(r.intervals.get(EVAL) for r in layers)

    def ci(iv: Intervals, name: str) -> str:
        return f" {_ci(iv, name):<13}" if intervals else ""

    ci_head = f" {'95% CI':<13}" if intervals else ""
    head = (f"{'layer':>5}  {'bal.acc':>7}{ci_head}  {'AUROC':>6}{ci_head}  {'/model':>6}  "
            f"{'lens bal.acc':>12} {'AUROC':>6}  {'TP':>6} {'FP':>6} {'TN':>6} {'FN':>6}"
            f"   {'natural: bal.acc':>16}  {'acc':>6}  {'AUROC':>6}")
    lines = [head, "-" * len(head)]
    best = layers[best_index([r.primary.balanced_accuracy for r in layers])]
    for r in layers:
        m, nat, iv = r.primary, r.metrics[EVAL_NATURAL], r.intervals.get(EVAL, {})
        lens = r.logit_lens.get(EVAL)
        fraction = r.auroc_fraction_of_model.get(EVAL, (float("nan"),))[0]
        mark = " *" if r is best else (" =" if indistinguishable and r.layer in indistinguishable else "")
        lines.append(
            f"{r.layer:>5}  {_fmt(m.balanced_accuracy):>7}{ci(iv, 'balanced_accuracy')}  {_fmt(m.auroc):>6}"
            f"{ci(iv, 'auroc')}  {_fmt(fraction):>6}  "
            f"{_fmt(lens.balanced_accuracy if lens else float('nan')):>12} {_fmt(lens.auroc if lens else float('nan')):>6}  "
            f"{m.tp:>6} {m.fp:>6} {m.tn:>6} {m.fn:>6}   {_fmt(nat.balanced_accuracy):>16}  "
            f"{_fmt(nat.accuracy):>6}  {_fmt(nat.auroc):>6}{mark}"
        )
    for b in baselines or []:
        m, nat, iv = b.metrics.get(EVAL), b.metrics.get(EVAL_NATURAL), b.intervals.get(EVAL, {})
        if m is None:
            continue
        lines.append(
            f"{'':>5}  {_fmt(m.balanced_accuracy):>7}{ci(iv, 'balanced_accuracy')}  {_fmt(m.auroc):>6}"
            f"{ci(iv, 'auroc')}  {'':>6}  {'':>12} {'':>6}  {m.tp:>6} {m.fp:>6} {m.tn:>6} {m.fn:>6}   "
            f"{_fmt(nat.balanced_accuracy if nat else float('nan')):>16}  {_fmt(nat.accuracy if nat else float('nan')):>6}  "
            f"{_fmt(nat.auroc if nat else float('nan')):>6}  <- {b.name}"
        )
    first = layers[0].metrics
    lines.append(
        f"held-out balanced set: {first[EVAL].n:,} positions ({first[EVAL].positives:,} positive); "
        f"natural set: {first[EVAL_NATURAL].n:,} positions ({first[EVAL_NATURAL].positives:,} positive); "
        f"* best layer" + ("; = indistinguishable from it (paired 95% CI of the difference includes 0)"
                           if indistinguishable else "")
    )
    lines.append(("95% CI: bootstrap over held-out chunks" if intervals else "no intervals (--bootstrap 0)")
                 + "; /model: probe AUROC as a fraction of the model's own; lens: logit lens at that layer")
    return "\n".join(lines)


CSV_METRICS = [*BinaryMetrics.__dataclass_fields__]
CSV_INTERVALS = [f"{m}_{end}" for m in ("balanced_accuracy", "accuracy", "auroc") for end in ("low", "high")]


def _csv_row(layer: int | str, subset: str, scorer: str, metrics: BinaryMetrics, intervals: Intervals,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return json_safe({"layer": layer, "set": subset, "scorer": scorer, **flat_metrics(metrics, intervals),
                      **(extra or {})})  # NaN -> None, which csv writes as an empty field


def write_results(out_dir: Path, record: dict[str, Any], layers: list[LayerResult],
                  baselines: list[BaselineResult] | None = None, extra: dict[str, Any] | None = None) -> None:
    """results.json (NaN as null) and results.csv (one row per layer, set and scorer; NaN as empty); with
    `extra["families"]` (probe families, control task, MDL: `FamilyEvaluation.to_dict()`) also
    families.csv, one row per layer and family."""
    write_json(out_dir / "results.json", {
        "run": record,
        "primary_metric": "balanced_accuracy on the held-out balanced set ('eval')",
        "sets": SET_DESCRIPTIONS,
        "layers": [r.to_dict() for r in layers],
        "baselines": {b.name: b.to_dict() for b in baselines or []},
        **(extra or {}),
    })
    buffer = io.StringIO()
    fields = ["layer", "set", "scorer", *CSV_METRICS, *CSV_INTERVALS, "auroc_fraction_of_model",
              "auroc_fraction_of_model_low", "auroc_fraction_of_model_high"]
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    for r in layers:
        for name, m in r.metrics.items():
            value, low, high = r.auroc_fraction_of_model.get(name, (float("nan"),) * 3)
            writer.writerow(_csv_row(r.layer, name, "probe", m, r.intervals.get(name, {}), {
                "auroc_fraction_of_model": value, "auroc_fraction_of_model_low": low,
                "auroc_fraction_of_model_high": high}))
        for name, m in r.logit_lens.items():
            writer.writerow(_csv_row(r.layer, name, "logit_lens", m, r.logit_lens_intervals.get(name, {})))
    for b in baselines or []:
        for name, m in b.metrics.items():
            writer.writerow(_csv_row("", name, b.name, m, b.intervals.get(name, {})))
    atomic_write_bytes(out_dir / "results.csv", buffer.getvalue().encode())
    if (extra or {}).get("families"):
        write_families_csv(out_dir, extra["families"])
