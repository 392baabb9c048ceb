"""The sweep plot: probe balanced accuracy and AUROC per layer with 95% bands, baselines as lines;
several runs in one plot with a colour per run. Drawn from results.json alone (no torch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tokenprobe.vocabulary import BASELINE_LABELS

PLOT = "plot.png"
METRICS = (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC"))


def num(value: Any) -> float:
    """A JSON number (null as NaN)."""
    return float("nan") if value is None else float(value)


def run_labels(runs: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Short labels naming only what differs between the runs (task, target, corpus, model, ...)."""
    def facets(run_dir: Path, results: dict[str, Any]) -> dict[str, str]:
        run = results["run"]
        return {"task": run["config"].get("task", ""), "target": repr(run.get("target", {}).get("text", "")),
                "corpus": run["corpus"]["name"], "model": run["model"]["name"],
                "ctx": f"ctx{run['config'].get('context_length')}"}
    all_facets = [facets(d, r) for d, r in runs]
    varying = [k for k in all_facets[0] if len({f[k] for f in all_facets}) > 1]
    if not varying:
        return [d.name for d, _ in runs]
    return [" ".join(f[k] for k in varying) for f in all_facets]


def plot(runs: list[tuple[Path, dict[str, Any]]], path: Path) -> None:
    """Probe balanced accuracy and AUROC per layer with 95% bands; the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = run_labels(runs) if len(runs) > 1 else [""]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, metric_label) in zip(axes, METRICS):
        for i, ((_, results), label) in enumerate(zip(runs, labels)):
            # One run: a colour per predictor. Several: a colour per run, a line style per predictor.
            colour = cycle[i % len(cycle)]
            colours = ({"probe": cycle[0], "logit_lens": cycle[1], "model": cycle[2], "token_stats": cycle[3]}
                       if len(runs) == 1 else dict.fromkeys(("probe", "logit_lens", "model", "token_stats"), colour))
            prefix = f"{label}: " if label else ""
            layers = results["layers"]
            x = [r["layer"] for r in layers]

            def band(entries, colour=colours["probe"]):
                low = [num(e.get(f"{metric}_low")) for e in entries]
                high = [num(e.get(f"{metric}_high")) for e in entries]
                if not all(math.isnan(v) for v in low):
                    ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)

            ax.plot(x, [num(r.get(metric)) for r in layers], "o-", color=colours["probe"], markersize=4,
                    label=f"{prefix}probe")
            band(layers)
            lens = [r.get("logit_lens", {}).get("eval") for r in layers]
            if all(lens):
                ax.plot(x, [num(e.get(metric)) for e in lens], "s--", color=colours["logit_lens"], markersize=3,
                        label=f"{prefix}logit lens")
                low = [num(e.get(f"{metric}_low")) for e in lens]
                if not all(math.isnan(v) for v in low):
                    ax.fill_between(x, low, [num(e.get(f"{metric}_high")) for e in lens],
                                    color=colours["logit_lens"], alpha=0.12, linewidth=0)
            for name, style in (("model", ":"), ("token_stats", "-."), ("majority", (0, (1, 4)))):
                entry = results.get("baselines", {}).get(name, {}).get("sets", {}).get("eval")
                if not entry:
                    continue
                value = num(entry.get(metric))
                line_colour = "0.45" if name == "majority" else colours[name]
                ax.axhline(value, color=line_colour, linestyle=style, linewidth=1.6,
                           label=f"{prefix}{BASELINE_LABELS[name]} ({value:.3f})")
                low, high = num(entry.get(f"{metric}_low")), num(entry.get(f"{metric}_high"))
                if name != "majority" and not math.isnan(low):
                    ax.axhspan(low, high, color=line_colour, alpha=0.1, linewidth=0)
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel(f"{metric_label} (held-out, balanced)")
        ax.set_title(f"{metric_label} per layer, 95% bootstrap bands over held-out chunks", fontsize=10)
        ax.grid(alpha=0.3)
        all_x = sorted({r["layer"] for _, res in runs for r in res["layers"]})
        if len(all_x) <= 40:
            ax.set_xticks(all_x)
        ax.legend(fontsize=8, loc="lower right")
    first = runs[0][1]["run"]
    fig.suptitle(f"tokenprobe: {first['model']['name']}, task {first['config'].get('task')} "
                 f"{first.get('target', {}).get('text', '')!r}" + (f" ({len(runs)} runs)" if len(runs) > 1 else ""),
                 fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
