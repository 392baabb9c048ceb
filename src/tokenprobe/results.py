"""Per-layer results: the terminal table, results.json (NaN as null) and results.csv."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenprobe.files import atomic_write_bytes, write_json
from tokenprobe.metrics import BinaryMetrics

EVAL_SETS = ("eval", "eval_natural", "train")
SET_DESCRIPTIONS = {
    "eval": "held-out chunks, balanced 50/50 (primary)",
    "eval_natural": "held-out chunks, natural class ratio",
    "train": "training positions",
}


@dataclass(frozen=True)
class LayerResult:
    layer: int
    run_name: str
    probe_file: str | None
    metrics: dict[str, BinaryMetrics]  # keyed by EVAL_SETS

    @property
    def primary(self) -> BinaryMetrics:
        return self.metrics["eval"]

    def to_dict(self) -> dict[str, Any]:
        """Flat primary metrics (held-out, balanced) plus every set in full."""
        return {
            "layer": self.layer,
            "run_name": self.run_name,
            "probe_file": self.probe_file,
            **self.primary.to_dict(),
            "sets": {name: m.to_dict() for name, m in self.metrics.items()},
        }


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(layers: list[LayerResult]) -> str:
    """The end-of-run table: held-out balanced metrics, confusion matrix, natural-ratio figures."""
    head = (f"{'layer':>5}  {'bal.acc':>7}  {'acc':>6}  {'AUROC':>6}  {'TP':>6} {'FP':>6} {'TN':>6} {'FN':>6}"
            f"   {'natural: bal.acc':>16}  {'acc':>6}  {'AUROC':>6}")
    lines = [head, "-" * len(head)]
    best = max(layers, key=lambda r: -1 if math.isnan(r.primary.balanced_accuracy) else r.primary.balanced_accuracy)
    for r in layers:
        m, nat = r.primary, r.metrics["eval_natural"]
        mark = " *" if r is best else ""
        lines.append(
            f"{r.layer:>5}  {_fmt(m.balanced_accuracy):>7}  {_fmt(m.accuracy):>6}  {_fmt(m.auroc):>6}  "
            f"{m.tp:>6} {m.fp:>6} {m.tn:>6} {m.fn:>6}   {_fmt(nat.balanced_accuracy):>16}  "
            f"{_fmt(nat.accuracy):>6}  {_fmt(nat.auroc):>6}{mark}"
        )
    first = layers[0].metrics
    lines.append(
        f"held-out balanced set: {first['eval'].n:,} positions ({first['eval'].positives:,} positive); "
        f"natural set: {first['eval_natural'].n:,} positions ({first['eval_natural'].positives:,} positive); "
        f"* best layer"
    )
    return "\n".join(lines)


def write_results(out_dir: Path, record: dict[str, Any], layers: list[LayerResult]) -> None:
    write_json(out_dir / "results.json", {
        "run": record,
        "primary_metric": "balanced_accuracy on the held-out balanced set ('eval')",
        "sets": SET_DESCRIPTIONS,
        "layers": [r.to_dict() for r in layers],
    })
    buffer = io.StringIO()
    fields = ["layer", "set", *BinaryMetrics.__dataclass_fields__]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for r in layers:
        for name, m in r.metrics.items():
            row = {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in m.to_dict().items()}
            writer.writerow({"layer": r.layer, "set": name, **row})
    atomic_write_bytes(out_dir / "results.csv", buffer.getvalue().encode())
