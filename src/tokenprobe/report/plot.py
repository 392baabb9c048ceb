"""The sweep plot: probe balanced accuracy and AUROC per layer with 95% bands, baselines as lines;
several runs in one plot with a colour per run. Drawn from results.json alone (no torch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tokenprobe.files import atomic_write_bytes
from tokenprobe.vocabulary import BASELINE_LABELS

PLOT = "plot.png"
METRICS = (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC"))


def num(value: Any) -> float:
    """A JSON number (null as NaN)."""
    return float("nan") if value is None else float(value)


# What tells runs apart, most telling first: the question, the data and the model; then the rest of the
# configuration (layers, seed, ...), named only when that is all that differs. Bookkeeping never counts.
PRIMARY_FACETS = ("model", "task", "target", "corpus", "context")
_NOT_A_DIFFERENCE = {"model", "corpus", "task", "target", "target_id", "labels", "label_regex", "context_length",
                     "layers", "wandb", "wandb_project"}


def _short(name: str) -> str:
    """A local path by its last part ('/data/x/corpus.txt' -> 'corpus.txt'); hub names stay whole."""
    return Path(name).name or name if name.startswith(("/", "./", "../", "~")) else name


def _layer_list(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}\u2013{layers[-1]}"
    return ",".join(map(str, layers)) if len(layers) <= 5 else f"{len(layers)} from {layers[0]} to {layers[-1]}"


def _setting(value: Any) -> str:
    if value is None:
        return "default"
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _facets(results: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(primary, secondary): each facet of a run in the words a label or a title uses."""
    run = results["run"]
    config = run.get("config", {})
    target = run.get("target", {}).get("text", config.get("target", ""))
    # one token by its repr (' the'); a set ("' the' | ' The'") or span labels ("regex:\\d+") as written
    named = target if len(run.get("target", {}).get("token_ids", [])) > 1 or "labels" in run.get("target", {}) \
        else repr(target)
    primary = {"model": str(run["model"]["name"]), "task": str(config.get("task", "")), "target": named,
               "corpus": str(run["corpus"]["name"]), "context": str(config.get("context_length"))}
    layers = run.get("layers") or [r["layer"] for r in results.get("layers", [])]
    secondary = {"layers": _layer_list(list(layers))}
    secondary.update({k: _setting(v) for k, v in config.items() if k not in _NOT_A_DIFFERENCE})
    return primary, secondary


def _named(key: str, value: str) -> str:
    return f"{key.replace('_', ' ')} {value}"


def compare_runs(runs: list[tuple[Path, dict[str, Any]]]) -> tuple[str, list[str]]:
    """(shared, labels): what all the runs have in common ("model gpt2, task next ' the', corpus
    corpus.txt, context 32"), and per run a short label naming only what differs between them: the
    model, task, target, corpus or context; the layers, seed or other settings when those are all that
    differ; the run folder's name when nothing does. One run: its description and an empty label."""
    facets = [_facets(results) for _, results in runs]
    primary = [p for p, _ in facets]
    for key in ("model", "corpus"):  # local paths by their last part, unless that would merge two
        short = [_short(p[key]) for p in primary]
        if len(set(short)) == len({p[key] for p in primary}):
            for p, value in zip(primary, short):
                p[key] = value
    same = [k for k in PRIMARY_FACETS if len({p[k] for p in primary}) == 1]
    first = primary[0]
    words = {k: _named(k, first[k]) for k in same}
    if "task" in same and "target" in same:
        words["task"], words["target"] = f"task {first['task']} {first['target']}", ""
    shared = ", ".join(words[k] for k in PRIMARY_FACETS if words.get(k))
    if len(runs) == 1:
        return shared, [""]
    labels: list[list[str]] = [[] for _ in runs]
    for tier in (primary, [s for _, s in facets]):
        keys = list(dict.fromkeys(k for t in tier for k in t))
        keys = [k for k in keys if len({t.get(k) for t in tier}) > 1]
        for label, values in zip(labels, tier):
            label += [_named(k, values[k]) if k in values else f"no {k}" for k in keys]
        if keys and len({", ".join(label) for label in labels}) == len(runs):
            return shared, [", ".join(label) for label in labels]
    names = [d.name for d, _ in runs]
    if len(set(names)) < len(names):
        names = [str(d) for d, _ in runs]
    return shared, [", ".join([*label, name]) for label, name in zip(labels, names)]


def plot_title(runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """'tokenprobe: model gpt2, corpus corpus.txt, context 32 (2 runs)': what the runs share."""
    shared = compare_runs(runs)[0]
    if len(runs) == 1:
        return f"tokenprobe: {shared}"
    return f"tokenprobe: {shared} ({len(runs)} runs)" if shared else f"tokenprobe: {len(runs)} runs"


def has_intervals(runs: list[tuple[Path, dict[str, Any]]]) -> bool:
    """Whether any run carries bootstrap intervals (none with --bootstrap 0)."""
    return any(not math.isnan(num(r.get(f"{metric}_low"))) for _, results in runs for r in results["layers"]
               for metric, _ in METRICS)


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG, written atomically (rendered in memory first: a failed render leaves no
    file, and the figure is closed whatever happens)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def plot(runs: list[tuple[Path, dict[str, Any]]], path: Path) -> None:
    """Probe balanced accuracy and AUROC per layer with 95% bands; the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = compare_runs(runs)[1]
    bands = ("95% bootstrap bands over held-out chunks" if has_intervals(runs)
             else "no intervals (--bootstrap 0)")
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
        ax.set_title(f"{metric_label} per layer, {bands}", fontsize=10)
        ax.grid(alpha=0.3)
        all_x = sorted({r["layer"] for _, res in runs for r in res["layers"]})
        if len(all_x) <= 40:
            ax.set_xticks(all_x)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(plot_title(runs), fontsize=11)
    save_figure(fig, path)
