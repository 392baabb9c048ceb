"""The causal check in a run's report: ablation.png (the effect of removing the probe's direction on the
model's own log P(target), per layer, against random directions) and a report.md section, both from
ablation.json alone (no torch)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tokenprobe.report.plot import num, save_figure

ABLATION = "ablation.json"
ABLATION_PLOT = "ablation.png"


def load_ablation(run_dir: Path) -> dict[str, Any] | None:
    """The run's ablation.json, or None when it has none (or it cannot be read)."""
    path = Path(run_dir) / ABLATION
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == "ablation" else None


def _triple(entry: dict[str, Any], key: str) -> tuple[float, float, float]:
    t = entry.get(key) or {}
    return num(t.get("mean")), num(t.get("low")), num(t.get("high"))


def _ci(t: tuple[float, float, float], digits: int = 3, sign: bool = True) -> str:
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    if math.isnan(t[0]):
        return "n/a"
    if math.isnan(t[1]):
        return fmt.format(t[0])
    return f"{fmt.format(t[0])} [{fmt.format(t[1])}, {fmt.format(t[2])}]"


def _edit_words(data: dict[str, Any]) -> str:
    if data.get("mode") == "mean":
        return "set to its training mean"
    return "projected out"


def plot_ablation(data: dict[str, Any], path: Path) -> None:
    """Change in log P(target) per layer: the probe direction's mean with its 95% interval, the random
    directions' range of means as a band; the KL elsewhere on a second panel; steering where it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = data["layers"]
    x = [e["layer"] for e in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[2, 1])
    probe = [_triple(e["probe"], "log_ratio") for e in layers]
    band_low = [num(e["random_band"]["min"]) for e in layers]
    band_high = [num(e["random_band"]["max"]) for e in layers]
    top.fill_between(x, band_low, band_high, color="0.6", alpha=0.35,
                     label=f"{data['random_directions']} random directions (range of their means)")
    top.plot(x, [p[0] for p in probe], "o-", color="C3", label=f"{data['family']} probe direction")
    top.fill_between(x, [p[1] for p in probe], [p[2] for p in probe], color="C3", alpha=0.2,
                     label="probe: 95% interval (bootstrap over chunks)")
    steered = [e for e in layers if e.get("steer")]
    if steered:
        s = [_triple(e["steer"], "log_ratio") for e in steered]
        top.plot([e["layer"] for e in steered], [v[0] for v in s], "s--", color="C2",
                 label=f"steered (+{steered[0]['steer']['alpha']:g} spreads along the direction)")
    top.axhline(0, color="black", linewidth=0.8)
    top.set_ylabel("change in log P(target)\nwhere it comes next")
    top.legend(fontsize=8, loc="best")
    top.grid(alpha=0.3)
    kl = [_triple(e["probe"], "kl") for e in layers]
    random_kl = [max(num(r["kl"]["mean"]) for r in e["random"]) for e in layers]
    bottom.plot(x, [k[0] for k in kl], "o-", color="C3", label="probe direction")
    bottom.fill_between(x, [k[1] for k in kl], [k[2] for k in kl], color="C3", alpha=0.2)
    bottom.plot(x, random_kl, ":", color="0.4", label="largest of the random directions")
    bottom.set_ylabel("KL elsewhere (nats)")
    bottom.set_xlabel("layer (0 = embedding output)")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.suptitle(f"Does {data['model']} use the probe's direction? Removing it ({_edit_words(data)}) at each "
                 f"layer\ntarget {data['target']!r}: {data['target_positions']:,} positions where it comes next, "
                 f"{data['chunks']} held-out chunks", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def ablation_markdown(data: dict[str, Any], plot_name: str = ABLATION_PLOT) -> list[str]:
    """The report.md section of a causal check."""
    layers = data["layers"]
    used = [e for e in layers if e.get("beyond_random") and e.get("direction_of_effect") == "lowers"]
    lines = ["## Does the model use the direction?", "",
             f"At each layer the {data['family']} probe's direction (unit length) was {_edit_words(data)} from the "
             f"residual stream at every position of {data['chunks']} held-out chunks ({data['tokens']:,} tokens), "
             "and the model's own next-token prediction read where the target comes next "
             f"({data['target_positions']:,} positions; clean: the target is the top prediction at "
             f"{100 * num(data['target_top1_clean']):.0f}% of them) and, for the KL divergence, at "
             f"{data['kl_positions']:,} other positions. The baseline is {data['random_directions']} random unit "
             "directions per layer, edited the same way" + (", drawn isotropic in standardised coordinates (each "
             "dimension divided by its standard deviation, as the probes are fitted), which keeps them off the "
             "few dimensions of huge variance whose removal breaks the model whatever the target"
             if data.get("random_draw") else "") + ". Intervals: 95%, bootstrap over the chunks.", ""]
    if plot_name:
        lines += [f"![ablation per layer]({plot_name})", ""]
    if used:
        strongest = min(used, key=lambda e: num(e["probe"]["log_ratio"]["mean"]))
        lines.append(f"Removing the direction lowers P(target) beyond every random direction at "
                     f"{_layers(e['layer'] for e in used)}; most at layer {strongest['layer']} "
                     f"(log P {_ci(_triple(strongest['probe'], 'log_ratio'))}, the target leaves the top "
                     f"prediction at {100 * num(strongest['probe']['top1_lost']['mean']):.0f}% of the positions "
                     f"where it led).")
    else:
        lines.append("At no layer does removing the direction lower P(target) beyond every random direction: the "
                     "model does not rely on it there (or the check has too few positions to tell).")
    lines += ["", "| layer | change in log P(target) | random directions (range of means) | beyond random | "
              "top-1 lost | KL elsewhere (nats) |" + (" steered log P |" if any(e.get("steer") for e in layers)
                                                       else ""),
              "|---|---|---|---|---|---|" + ("---|" if any(e.get("steer") for e in layers) else "")]
    for e in layers:
        band = e["random_band"]
        row = (f"| {e['layer']} | {_ci(_triple(e['probe'], 'log_ratio'))} | {num(band['min']):+.3f} to "
               f"{num(band['max']):+.3f} | {e.get('direction_of_effect') or 'no'} | "
               f"{_ci(_triple(e['probe'], 'top1_lost'), 2, sign=False)} | {_ci(_triple(e['probe'], 'kl'), 3, sign=False)} |")
        if any(x.get("steer") for x in layers):
            row += f" {_ci(_triple(e['steer'], 'log_ratio')) if e.get('steer') else 'n/a'} |"
        lines.append(row)
    lines += ["", "A specific direction lowers P(target) with little KL elsewhere; a direction whose removal "
              "raises the KL as much as it lowers P(target) breaks the model rather than one prediction.", ""]
    return lines


def _layers(layers) -> str:
    layers = sorted(layers)
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(str(layer) for layer in layers)
