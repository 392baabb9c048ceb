"""Runs of models with different depths side by side (`tokenprobe report RUN_A RUN_B ...`): the probe
against relative depth, and a table per run of how high its best layer gets and how early it gets there.

Relative depth is layer / num_layers (results.json's run.model.num_layers): 0 is the embedding output,
1 the last block's output, so a 24-layer model's layer 12 and an 18-layer model's layer 9 share the point
0.5. The plateau starts at the first (shallowest) probed layer whose balanced accuracy is indistinguishable
from the best layer's (comparisons.balanced_accuracy.indistinguishable_from_best: the paired 95% bootstrap
interval of the difference includes 0), or at the best layer itself when it is the first; without
intervals (--bootstrap 0) no layer can be called indistinguishable, so the plateau is the best layer.

Drawn from results.json alone (no torch). Nothing is added when all the runs' models have the same
number of layers (the plot's x-axis, layers, already lines them up).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tokenprobe.report.plot import METRICS, num, save_figure
from tokenprobe.vocabulary import best_index

DEPTH_PLOT = "depth.png"


def num_layers(results: dict[str, Any]) -> int | None:
    value = results.get("run", {}).get("model", {}).get("num_layers")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def differing_depths(runs: list[tuple[Path, dict[str, Any]]]) -> bool:
    """Whether the runs' models have different numbers of layers (every run must say its own)."""
    depths = [num_layers(results) for _, results in runs]
    return len(runs) > 1 and None not in depths and len(set(depths)) > 1


def best_layer(results: dict[str, Any]) -> int:
    """The best layer by balanced accuracy, as the report names it."""
    layer = results.get("comparisons", {}).get("balanced_accuracy", {}).get("best_layer")
    if layer is None:
        layers = results["layers"]
        layer = layers[best_index([num(r.get("balanced_accuracy")) for r in layers])]["layer"]
    return int(layer)


def plateau_layer(results: dict[str, Any]) -> int:
    """The first layer whose balanced accuracy is indistinguishable from the best's (or the best layer)."""
    best = best_layer(results)
    ties = results.get("comparisons", {}).get("balanced_accuracy", {}).get("indistinguishable_from_best") or []
    return min([best, *(int(layer) for layer in ties)])


def depth_row(results: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: best layer and its relative depth, its balanced accuracy and AUROC (with their
    intervals as in results.json), the model's own AUROC, the fraction recovered, the plateau's start."""
    n = num_layers(results)
    best = best_layer(results)
    entry = next(r for r in results["layers"] if r["layer"] == best)
    model = results.get("baselines", {}).get("model", {}).get("sets", {}).get("eval")
    fraction = entry.get("auroc_fraction_of_model", {}).get("eval")
    if not fraction and model and num(model.get("auroc")) > 0:
        fraction = {"value": num(entry.get("auroc")) / num(model.get("auroc"))}
    plateau = plateau_layer(results)
    intervals = bool(results.get("comparisons", {}).get("resamples"))
    return {"num_layers": n, "best_layer": best, "best_depth": best / n, "best": entry, "model": model,
            "fraction": fraction, "plateau_layer": plateau, "plateau_depth": plateau / n, "intervals": intervals}


def _value(entry: dict[str, Any] | None, metric: str) -> str:
    if not entry or math.isnan(num(entry.get(metric))):
        return "n/a"
    text = f"{num(entry.get(metric)):.3f}"
    low, high = num(entry.get(f"{metric}_low")), num(entry.get(f"{metric}_high"))
    return text if math.isnan(low) else f"{text} [{low:.3f}, {high:.3f}]"


def _fraction(fraction: dict[str, Any] | None) -> str:
    if not fraction or math.isnan(num(fraction.get("value"))):
        return "n/a"
    text = f"{100 * num(fraction['value']):.1f}%"
    low, high = num(fraction.get("low")), num(fraction.get("high"))
    return text if math.isnan(low) else f"{text} [{100 * low:.1f}, {100 * high:.1f}]"


def depth_markdown(runs: list[tuple[Path, dict[str, Any]]], labels: list[str],
                   plot_name: str | None = DEPTH_PLOT) -> list[str]:
    """The section "Across model depths" of a multi-run report.md."""
    lines = ["## Across model depths", "",
             "The runs' models have different numbers of layers, so layers are compared at their relative depth, "
             "layer / number of layers (0 = embedding output, 1 = last layer). The plateau starts at the first "
             "probed layer whose balanced accuracy is indistinguishable from the best layer's (the paired 95% "
             "interval of the difference includes 0); without intervals it is the best layer. Recovered: the "
             "best layer's AUROC as a fraction of the model's own AUROC (its ceiling).", ""]
    if plot_name:
        lines += [f"![probe per relative depth]({plot_name})", ""]
    lines += ["| run | layers | best layer (depth) | bal. acc. | AUROC | model's AUROC | recovered | plateau from "
              "layer (depth) |", "|---|---|---|---|---|---|---|---|"]
    for (_, results), label in zip(runs, labels):
        row = depth_row(results)
        plateau = f"{row['plateau_layer']} ({row['plateau_depth']:.2f})" + ("" if row["intervals"] else " ¹")
        lines.append(f"| {label} | {row['num_layers']} | {row['best_layer']} ({row['best_depth']:.2f}) | "
                     f"{_value(row['best'], 'balanced_accuracy')} | {_value(row['best'], 'auroc')} | "
                     f"{_value(row['model'], 'auroc')} | {_fraction(row['fraction'])} | {plateau} |")
    if any(not depth_row(results)["intervals"] for _, results in runs):
        lines += ["", "¹ no intervals (--bootstrap 0): the plateau is the best layer."]
    lines.append("")
    return lines


def plot_depth(runs: list[tuple[Path, dict[str, Any]]], labels: list[str], path: Path) -> None:
    """Probe balanced accuracy and AUROC against relative depth, a colour per run, with 95% bands; each
    run's model AUROC as a dotted line in the AUROC panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, metric_label) in zip(axes, METRICS):
        for i, ((_, results), label) in enumerate(zip(runs, labels)):
            colour, n = cycle[i % len(cycle)], num_layers(results)
            layers = sorted(results["layers"], key=lambda r: r["layer"])
            x = [r["layer"] / n for r in layers]
            ax.plot(x, [num(r.get(metric)) for r in layers], "o-", color=colour, markersize=4,
                    label=f"{label} ({n} layers)")
            low = [num(r.get(f"{metric}_low")) for r in layers]
            if not all(math.isnan(v) for v in low):
                ax.fill_between(x, low, [num(r.get(f"{metric}_high")) for r in layers], color=colour, alpha=0.18,
                                linewidth=0)
            plateau = plateau_layer(results) / n
            ax.axvline(plateau, color=colour, linestyle="--", linewidth=1, alpha=0.6)
            model = results.get("baselines", {}).get("model", {}).get("sets", {}).get("eval")
            if metric == "auroc" and model and not math.isnan(num(model.get("auroc"))):
                ax.axhline(num(model["auroc"]), color=colour, linestyle=":", linewidth=1.6,
                           label=f"{label}: model's own ({num(model['auroc']):.3f})")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("relative depth (layer / number of layers); dashed: where the plateau starts")
        ax.set_ylabel(f"{metric_label} (held-out, balanced)")
        ax.set_title(f"probe {metric_label} by relative depth", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"tokenprobe: {len(runs)} runs of models with different depths", fontsize=11)
    save_figure(fig, path)


def depth_section(runs: list[tuple[Path, dict[str, Any]]], labels: list[str], out: Path) -> list[str]:
    """For a multi-run report: draws depth.png into `out` and returns the section's lines, when the runs'
    models differ in depth; otherwise nothing."""
    if not differing_depths(runs):
        return []
    plot_depth(runs, labels, Path(out) / DEPTH_PLOT)
    return depth_markdown(runs, labels)
