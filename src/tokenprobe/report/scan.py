"""What `tokenprobe scan` leaves for people: scan.csv (one row per target and layer), scan-heatmap.png
(targets by layers, coloured by AUROC as a fraction of the model's own) and report.md (the ranking in
words and as a table), all drawn from scan.json alone (no torch: `tokenprobe report SCAN_DIR` stays fast).

A scan is one forward pass and one probe per target token at every layer ("will the next token be ' the'?",
"... ' of'?", ...). Its targets are ranked by the balanced accuracy of their best layer, and ordered in the
heatmap by how early they become predictable: the first layer whose balanced accuracy is indistinguishable
from the target's best (paired bootstrap), then by the best AUROC as a fraction of the model's own.
Figures may be null (NaN, no interval, no baseline): they read as NaN and show as "n/a" or empty cells.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
import warnings
from pathlib import Path
from typing import Any

from tokenprobe.files import atomic_write_bytes, json_safe
from tokenprobe.report.plot import num, save_figure

SCAN_CSV = "scan.csv"
SCAN_HEATMAP = "scan-heatmap.png"
SCAN_JSON = "scan.json"
SCAN_REPORT = "report.md"  # the name `tokenprobe train` gives its report too
FEW = 5  # tokens named in each sentence of "In words"

# Fixed colour scales, so that heatmaps of different runs compare at a glance; values outside are clipped
# (the colour bar's arrows). Scan probes mostly reach 0.85-1 of the model's AUROC (Gemma 3 270M, default
# corpus): the fraction scale spreads that range, and leaves room above 1 (a probe can beat the model).
FRACTION_SCALE = (0.8, 1.05)
AUROC_SCALE = (0.5, 1.0)

CSV_FIELDS = ["rank", "text", "token_id", "layer", "balanced_accuracy", "balanced_accuracy_low",
              "balanced_accuracy_high", "auroc", "auroc_low", "auroc_high", "auroc_fraction_of_model",
              "auroc_fraction_low", "auroc_fraction_high", "logit_lens_auroc", "model_auroc", "token_stats_auroc",
              "frequency", "eval_positions"]


# --------------------------------------------------------------------------------------------- reading


def _nan(value: Any) -> bool:
    return math.isnan(num(value))


def _pair(value: Any) -> tuple[float, float]:
    """An interval [low, high] as two floats (NaN where null or missing)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return float("nan"), float("nan")
    return num(value[0]), num(value[1])


def scanned(scan: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets that were scanned (no error), in scan.json's order."""
    return [t for t in scan.get("targets", []) if not t.get("error")]


def failed(scan: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets that could not be scanned (an error sentence each)."""
    return [t for t in scan.get("targets", []) if t.get("error")]


def _has_baselines(scan: dict[str, Any]) -> bool:
    return bool(scan.get("baselines"))


def _has_intervals(scan: dict[str, Any]) -> bool:
    return bool((scan.get("intervals") or {}).get("resamples"))


def _best(target: dict[str, Any]) -> dict[str, Any]:
    return target.get("best") or {}


def _colour_key(scan: dict[str, Any]) -> str:
    """What the heatmap's colour and the predictability order's tie-break read: the AUROC as a fraction
    of the model's own, or plain AUROC without baselines."""
    return "auroc_fraction_of_model" if _has_baselines(scan) else "auroc"


def _descending(value: Any) -> float:
    """A sort key putting larger values first and missing ones last."""
    value = num(value)
    return math.inf if math.isnan(value) else -value


def _ascending(value: Any) -> float:
    value = num(value)
    return math.inf if math.isnan(value) else value


def predictability_order(scan: dict[str, Any]) -> list[dict[str, Any]]:
    """The scanned targets ordered by how early they become predictable: the first layer indistinguishable
    from their best ascending, then their best AUROC as a fraction of the model's own (plain AUROC without
    baselines) descending, then frequency rank. The heatmap's rows, top to bottom."""
    key = _colour_key(scan)
    return sorted(scanned(scan), key=lambda t: (_ascending(t.get("first_layer_like_best")),
                                                _descending(_best(t).get(key)), _ascending(t.get("rank"))))


def ranking(scan: dict[str, Any]) -> list[dict[str, Any]]:
    """The scanned targets by their best layer's balanced accuracy, highest first (ties by AUROC, then by
    frequency rank): the ranking table's order."""
    return sorted(scanned(scan), key=lambda t: (_descending(_best(t).get("balanced_accuracy")),
                                                _descending(_best(t).get("auroc")), _ascending(t.get("rank"))))


# ------------------------------------------------------------------------------------------ formatting


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    value = num(value)
    return "n/a" if math.isnan(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _ci(value: Any, interval: Any, sign: bool = False) -> str:
    """'0.903 [0.895, 0.910]', or the point alone without an interval ('n/a' without a point)."""
    low, high = _pair(interval)
    text = _f(value, sign=sign)
    if text == "n/a" or math.isnan(low) or math.isnan(high):
        return text
    return f"{text} [{_f(low, sign=sign)}, {_f(high, sign=sign)}]"


def _percent(value: Any) -> str:
    """A share as a percentage: '4.12%', '0.031%'."""
    value = 100 * num(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}%" if value >= 0.1 or value == 0 else f"{value:.2g}%"


def _shown(text: Any, limit: int | None = None) -> str:
    """A token as Python writes it (' the' keeps its space, a newline shows as \\n), cut at `limit`."""
    shown = repr(str(text))
    if limit and len(shown) > limit:
        shown = shown[: limit - 1] + "\u2026"
    return shown


def _code(text: str) -> str:
    """`text` as a Markdown code span, fenced with more backticks than it holds in a row."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    return f"{fence}{padded}{fence}"


def _token(target: dict[str, Any], table: bool = False) -> str:
    """A target in Markdown: its repr in a code span; in a table cell with `|` escaped."""
    shown = _shown(target.get("text", ""))
    return _code(shown.replace("|", "\\|") if table else shown)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _count(n: int, noun: str, plural: str | None = None) -> str:
    from tokenprobe.report.markdown import _count as count  # the report's one spelling of counts

    return count(n, noun, plural)


def _layer_words(layers: list[int]) -> str:
    from tokenprobe.report.markdown import _layers_text  # the report's one spelling of layer lists

    return _layers_text(layers)


def _task_words(task: Any) -> str:
    """'next token', 'current token', 'token 3 ahead'."""
    task = str(task)
    if task in ("next", "current"):
        return f"{task} token"
    if task.startswith("ahead:"):
        return f"token {task.removeprefix('ahead:')} ahead"
    return task


def _range(values: list[int]) -> str:
    """'1,000' when all equal, else 'from 120 to 1,000'."""
    if not values:
        return "0"
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"from {low:,} to {high:,}"


def _head_and_tail(items: list[dict[str, Any]], k: int = FEW) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first `k` items, and the last `k` (last first) that are not among them."""
    head = items[:k]
    return head, list(reversed(items[max(len(head), len(items) - k):]))


# ----------------------------------------------------------------------------------------------- CSV


def scan_csv(scan: dict[str, Any]) -> str:
    """One row per scanned target and layer (see CSV_FIELDS): the probe's held-out balanced accuracy, AUROC
    and AUROC as a fraction of the model's own with their intervals, that layer's logit lens AUROC, the
    target's model and token-statistics AUROC, its frequency and held-out positions. Null or NaN figures as
    empty cells; texts quoted by the csv module wherever they need it (commas, quotes, newlines)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, restval="")
    writer.writeheader()
    for target in scanned(scan):
        model, stats = target.get("model") or {}, target.get("token_stats") or {}
        for entry in target.get("layers") or []:
            bal_low, bal_high = _pair(entry.get("balanced_accuracy_ci"))
            auroc_low, auroc_high = _pair(entry.get("auroc_ci"))
            fraction_low, fraction_high = _pair(entry.get("auroc_fraction_of_model_ci"))
            row = {"rank": target.get("rank"), "text": target.get("text"), "token_id": target.get("token_id"),
                   "layer": entry.get("layer"), "balanced_accuracy": entry.get("balanced_accuracy"),
                   "balanced_accuracy_low": bal_low, "balanced_accuracy_high": bal_high,
                   "auroc": entry.get("auroc"), "auroc_low": auroc_low, "auroc_high": auroc_high,
                   "auroc_fraction_of_model": entry.get("auroc_fraction_of_model"),
                   "auroc_fraction_low": fraction_low, "auroc_fraction_high": fraction_high,
                   "logit_lens_auroc": entry.get("logit_lens_auroc"), "model_auroc": model.get("auroc"),
                   "token_stats_auroc": stats.get("auroc"), "frequency": target.get("frequency"),
                   "eval_positions": (target.get("positions") or {}).get("eval")}
            writer.writerow({k: "" if v is None else v for k, v in json_safe(row).items()})  # NaN -> empty
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- heatmap


def _row_label(target: dict[str, Any]) -> str:
    rank = target.get("rank")
    return f"{_shown(target.get('text', ''), 24)} #{rank if rank is not None else '?'}"


def plot_scan_heatmap(scan: dict[str, Any], path: Path) -> list[str]:
    """scan-heatmap.png: a row per scanned target (predictability order, earliest at the top), a column
    per layer, coloured by the probe's held-out AUROC as a fraction of the model's own on a fixed scale
    (plain AUROC without baselines); a dot marks each target's best layer (balanced accuracy), an outline
    its first layer indistinguishable from the best. Returns the rows' texts, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    order = predictability_order(scan)
    layers = [int(layer) for layer in scan.get("layers") or sorted(
        {int(e["layer"]) for t in order for e in t.get("layers") or []})]
    column = {layer: i for i, layer in enumerate(layers)}
    key = _colour_key(scan)
    if _has_baselines(scan):
        (vmin, vmax), meaning = FRACTION_SCALE, "probe AUROC as a fraction of the model's own"
    else:
        (vmin, vmax), meaning = AUROC_SCALE, "probe AUROC (no baselines)"
    values = np.full((len(order), len(layers)), np.nan)
    for i, target in enumerate(order):
        for entry in target.get("layers") or []:
            if int(entry["layer"]) in column:
                values[i, column[int(entry["layer"])]] = num(entry.get(key))

    model = (scan.get("model") or {}).get("name", "")
    title = (f"tokenprobe scan: {model}, {_task_words(scan.get('task'))}, {_count(len(order), 'target')}"
             f"\ncolour: {meaning}")
    width = 3.6 + 0.3 * max(len(layers), 4)
    height = 2.2 + 0.125 * max(len(order), 8)
    fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(values if len(order) else np.full((1, max(len(layers), 1)), np.nan), aspect="auto",
                      interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    bar = fig.colorbar(image, ax=ax, extend="both" if _has_baselines(scan) else "min", fraction=0.05,
                       pad=0.02, aspect=30, shrink=min(1.0, 8 / height), extendfrac=0.03)
    bar.set_label(f"{meaning}\n(fixed scale {vmin:g}\u2013{vmax:g}, clipped; grey: n/a)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if _has_baselines(scan) and vmin < 1 < vmax:
        bar.ax.axhline(1.0, color="white", linewidth=1)

    if order:
        best_x, best_y = [], []
        for i, target in enumerate(order):
            if target.get("best_layer") in column:
                best_x.append(column[target["best_layer"]])
                best_y.append(i)
            if target.get("first_layer_like_best") in column:
                ax.add_patch(Rectangle((column[target["first_layer_like_best"]] - 0.5, i - 0.5), 1, 1, fill=False,
                                       edgecolor="crimson", linewidth=1.0))
        ax.plot(best_x, best_y, "o", markersize=3, markerfacecolor="white", markeredgecolor="black",
                markeredgewidth=0.5, linestyle="none")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([_row_label(t) for t in order], fontsize=6.5, parse_math=False)
        ax.set_ylabel("target (#: frequency rank), earliest predictable at the top", fontsize=8)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no target could be scanned", transform=ax.transAxes, ha="center", va="center")
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_xticks(range(0, len(layers), step))
    ax.set_xticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
    ax.tick_params(top=True, labeltop=True)  # the layer numbers above the first rows too
    ax.set_xlabel("layer (0 = embedding output)", fontsize=8)
    handles = [Line2D([], [], marker="o", linestyle="none", markersize=4, markerfacecolor="white",
                      markeredgecolor="black", label="best layer (balanced accuracy)"),
               Line2D([], [], marker="s", linestyle="none", markersize=7, markerfacecolor="none",
                      markeredgecolor="crimson", label="first layer indistinguishable from the best")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10, parse_math=False)
    with warnings.catch_warnings():  # a token the font cannot draw shows as a box; report.md names it
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        save_figure(fig, Path(path))
    return [str(t.get("text", "")) for t in order]


# ------------------------------------------------------------------------------------------- report.md


def _why_no_baselines(scan: dict[str, Any]) -> str:
    if scan.get("baselines_skipped"):  # the scan's own reason (the task is not the next token)
        return str(scan["baselines_skipped"])
    if str(scan.get("task")) == "current":
        return "they predict the next token and this scan asks about the current one"
    return "the scan was run without them (--no-baselines)"


def _which_targets(scan: dict[str, Any]) -> str:
    config = scan.get("config") or {}
    if config.get("targets_file"):
        return f"the tokens listed in `{config['targets_file']}`"
    if config.get("scan_target_ids"):
        return "the token ids given"
    if config.get("top"):
        return f"the {config['top']:,} most frequent tokens of the training chunks"
    return ""


def _intro(scan: dict[str, Any]) -> list[str]:
    model = scan.get("model") or {}
    config = scan.get("config") or {}
    targets, done, problems = scan.get("targets", []), scanned(scan), failed(scan)
    layers = [int(layer) for layer in scan.get("layers") or []]
    question = scan.get("question") or f"the {_task_words(scan.get('task'))}"
    which = _which_targets(scan)
    sentence = (f"Model `{model.get('name', '')}`" + (f" ({scan['dtype']})" if scan.get("dtype") else "")
                + (f", corpus `{Path(str(config['corpus'])).name}`" if config.get("corpus") else "")
                + (f", context {config['context_length']} tokens" if config.get("context_length") else "")
                + f", task `{scan.get('task')}`, asking \"{question} X?\" for each of "
                  f"{_count(len(targets), 'target token')} X"
                + (f" ({which})" if which else "")
                + f", one probe per target at each of {_count(len(layers), 'layer')} "
                  f"({_layer_words(layers)}; 0 = embedding output), all from one forward pass.")
    if problems:
        sentence += (f" {_count(len(done), 'target was', 'targets were')} scanned; "
                     f"{len(problems)} could not be (listed at the end).")
    lines = [sentence, ""]

    positions = scan.get("positions") or {}
    parts = []
    if positions.get("tokens") is not None:
        parts.append(f"{_count(int(positions['tokens']), 'token')}" + (
            f" in {_count(int(positions['chunks']), 'chunk')}" if positions.get("chunks") is not None else ""))
    if positions.get("train_natural") is not None and positions.get("eval_natural") is not None:
        parts.append(f"a shared sample of {int(positions['train_natural']):,} training and "
                     f"{int(positions['eval_natural']):,} held-out positions at the natural class ratio")
    if positions.get("pool") is not None:
        parts.append(f"{_count(int(positions['pool']), 'position')} through the model in all")
    counts = [t.get("positions") or {} for t in done]
    train = [int(c["train"]) for c in counts if c.get("train") is not None]
    held = [int(c["eval"]) for c in counts if c.get("eval") is not None]
    text = ("Positions: " + "; ".join(parts) + "." if parts else "")
    if train and held:
        text += (f" Each target's probes are trained on its positives and as many negatives ({_range(train)} "
                 f"training positions per target) and scored on a balanced held-out set ({_range(held)} per target).")
    if text:
        lines += [text.strip(), ""]

    intervals = scan.get("intervals") or {}
    resamples = int(intervals.get("resamples") or 0)
    if resamples:
        level = num(intervals.get("level", 0.95))
        level_text = f"{100 * level:g}%" if not math.isnan(level) else "bootstrap"
        lines += [f"Intervals are {level_text} bootstrap intervals over the {intervals.get('unit', 'held-out chunks')} "
                  f"({resamples:,} resamples), not over positions. A layer is indistinguishable from a target's best "
                  f"when the paired {level_text} interval of their difference in balanced accuracy includes 0.", ""]
    else:
        lines += ["No intervals (run with --bootstrap 0): every figure is a point, and each target's first layer "
                  "indistinguishable from its best is its best layer.", ""]
    if _has_baselines(scan):
        lines += ["Each target's probes are compared with the model's own prediction of that target and with "
                  "token statistics, scored on the same held-out positions; \"AUROC / model's\" is the probe's "
                  "AUROC as a fraction of the model's own.", ""]
    else:
        lines += [f"No baselines: {_why_no_baselines(scan)}. The heatmap's colour is plain probe AUROC, and there "
                  "is no comparison with the model's own prediction or with token statistics.", ""]
    return lines


def _heatmap_words(scan: dict[str, Any], heatmap_name: str) -> list[str]:
    if _has_baselines(scan):
        colour = (f"the probe's held-out AUROC as a fraction of the model's own (fixed scale "
                  f"{FRACTION_SCALE[0]:g}\u2013{FRACTION_SCALE[1]:g}; 1 = as good as the model)")
        tie = "its best AUROC as a fraction of the model's own"
    else:
        colour = f"the probe's held-out AUROC (fixed scale {AUROC_SCALE[0]:g}\u2013{AUROC_SCALE[1]:g})"
        tie = "its best AUROC"
    return [f"![targets by layers: {'AUROC as a fraction of the model' if _has_baselines(scan) else 'AUROC'}]"
            f"({heatmap_name})", "",
            f"Each row is a target (its token and frequency rank), each column a layer; the colour is {colour}. "
            "A dot marks each target's best layer by balanced accuracy, an outline the first layer "
            "indistinguishable from it. Rows run from the earliest predictable target (the smallest first layer "
            f"indistinguishable from its best) to the latest, ties by {tie}.", ""]


def _named(target: dict[str, Any]) -> str:
    """'`' the'` 0.912 [0.905, 0.920] at layer 14'."""
    best = _best(target)
    return f"{_token(target)} {_ci(best.get('balanced_accuracy'), best.get('balanced_accuracy_ci'))} " \
           f"at layer {target.get('best_layer')}"


def _from_layer(target: dict[str, Any]) -> str:
    """'`' the'` from layer 9 (best 14)'."""
    first, best = target.get("first_layer_like_best"), target.get("best_layer")
    return f"{_token(target)} from layer {first}" + ("" if first == best else f" (best {best})")


def _in_words(scan: dict[str, Any]) -> list[str]:
    ranked, order = ranking(scan), predictability_order(scan)
    if not ranked:
        return ["## In words", "", "No target could be scanned.", ""]
    n = len(ranked)
    bullets = []
    top, bottom = _head_and_tail(ranked)
    if n == 1:
        bullets.append(f"The one target scanned: {_named(top[0])} (balanced accuracy at its best layer).")
    else:
        bullets.append("Most predictable (by the balanced accuracy at the best layer, highest first): "
                       + "; ".join(_named(t) for t in top) + ".")
        if bottom:
            bullets.append(f"Least predictable{', lowest first' if len(bottom) > 1 else ''}: "
                           + "; ".join(_named(t) for t in bottom) + ".")
    like = "first layer indistinguishable from its best" if _has_intervals(scan) else "best layer (no intervals)"
    early, late = _head_and_tail(order)
    if n > 1:
        bullets.append(f"Predictable earliest (by the {like}): " + "; ".join(_from_layer(t) for t in early) + ".")
        if late:
            bullets.append(f"Predictable latest{', latest first' if len(late) > 1 else ''}: "
                           + "; ".join(_from_layer(t) for t in late) + ".")
        firsts = [int(t["first_layer_like_best"]) for t in ranked if t.get("first_layer_like_best") is not None]
        if firsts:
            median = statistics.median_low(firsts)
            bullets.append(f"By layer {median} (the median {like}), {sum(f <= median for f in firsts)} of "
                           f"{len(firsts)} targets are predictable.")
    if _has_baselines(scan):
        gaps = [t["gap_to_model"] for t in ranked if t.get("gap_to_model") and not _nan(t["gap_to_model"].get("auroc"))]
        if gaps:
            if _has_intervals(scan) and all(not _nan(g.get("low")) for g in gaps):
                ahead = sum(num(g["low"]) > 0 for g in gaps)
                behind = sum(num(g["high"]) < 0 for g in gaps)
                bullets.append(f"Against the model's own prediction (AUROC, the model minus the best layer's probe, "
                               f"paired interval): the model is ahead beyond the interval for {ahead} of {len(gaps)} "
                               f"targets, the probe for {behind}, and the two are indistinguishable for "
                               f"{len(gaps) - ahead - behind}.")
            else:
                ahead = sum(num(g["auroc"]) > 0 for g in gaps)
                bullets.append(f"Against the model's own prediction (AUROC, points only): the model's is higher for "
                               f"{ahead} of {len(gaps)} targets, the best layer's probe's for {len(gaps) - ahead}.")
    the = next((t for t in scan.get("targets", []) if t.get("text") == " the"), None)
    if the is not None and the.get("error"):
        error = str(the["error"]).strip()
        bullets.append(f"{_token(the)} could not be scanned: {error}" + ("" if error.endswith(".") else "."))
    elif the is not None:
        place = next(i for i, t in enumerate(ranked, 1) if t is the)
        best = _best(the)
        bullets.append(f"{_token(the)} is {_ordinal(place)} of {n} by balanced accuracy: best layer "
                       f"{the.get('best_layer')}, balanced accuracy "
                       f"{_ci(best.get('balanced_accuracy'), best.get('balanced_accuracy_ci'))}, predictable from "
                       f"layer {the.get('first_layer_like_best')}.")
    return ["## In words", "", *(f"- {b}" for b in bullets), ""]


def _table(scan: dict[str, Any]) -> list[str]:
    ranked = ranking(scan)
    if not ranked:
        return []
    baselines = _has_baselines(scan)
    head = ["#", "token", "frequency", "best layer", "first layer like best", "bal. acc.", "AUROC"]
    if baselines:
        head += ["AUROC / model's", "gap to model", "token stats AUROC"]
    lines = ["## Ranking", "",
             "All scanned targets by the balanced accuracy of their best layer (held-out, balanced; ties by AUROC). "
             + ("Gap to model: the model's own AUROC minus the best layer probe's, with its paired interval. "
                if baselines else "Without baselines there are no columns comparing with the model. ")
             + "Frequency: the share of the training chunks' usable positions where the answer is yes.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for place, target in enumerate(ranked, 1):
        best = _best(target)
        cells = [str(place), _token(target, table=True), _percent(target.get("frequency")),
                 str(target.get("best_layer", "n/a")), str(target.get("first_layer_like_best", "n/a")),
                 _ci(best.get("balanced_accuracy"), best.get("balanced_accuracy_ci")),
                 _ci(best.get("auroc"), best.get("auroc_ci"))]
        if baselines:
            gap = target.get("gap_to_model") or {}
            stats = target.get("token_stats") or {}
            cells += [_ci(best.get("auroc_fraction_of_model"), best.get("auroc_fraction_of_model_ci")),
                      _ci(gap.get("auroc"), [gap.get("low"), gap.get("high")], sign=True),
                      _ci(stats.get("auroc"), stats.get("auroc_ci"))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _failures(scan: dict[str, Any]) -> list[str]:
    problems = failed(scan)
    if not problems:
        return []
    lines = ["## Targets that could not be scanned", ""]
    for target in problems:
        about = [f"id {target['token_id']}"] if target.get("token_id") is not None else []
        about += [f"frequency {_percent(target.get('frequency'))}"] if target.get("frequency") is not None else []
        error = str(target["error"]).strip()
        lines.append(f"- {_token(target)}" + (f" ({', '.join(about)})" if about else "")
                     + f": {error}" + ("" if error.endswith(".") else "."))
    return [*lines, ""]


def scan_markdown(scan: dict[str, Any], heatmap_name: str = SCAN_HEATMAP, scan_json: str = SCAN_JSON) -> str:
    """report.md of a scan: what was asked and on what, the heatmap and how to read it, the ranking in words
    and as a table, the targets that could not be scanned, and where the figures are (`scan_json`: the
    path the closing line names for scan.json)."""
    model = (scan.get("model") or {}).get("name", "")
    lines = [f"# tokenprobe scan: {model}, {_task_words(scan.get('task'))}", "", *_intro(scan)]
    lines += _heatmap_words(scan, heatmap_name)
    lines += _in_words(scan)
    lines += _table(scan)
    lines += _failures(scan)
    probe_dir = next((t.get("probe_dir") for t in scanned(scan) if t.get("probe_dir")), None)
    lines += [f"Every figure per target and layer is in `{SCAN_CSV}`; everything, with the run's options and "
              f"timings, in `{scan_json}`" + (f"; each target's probes in its own folder (e.g. `{probe_dir}`)."
                                             if probe_dir else "."), ""]
    return "\n".join(lines)


def write_scan_outputs(folder: Path, scan: dict[str, Any], scan_json: str = SCAN_JSON) -> list[Path]:
    """Writes scan.csv, scan-heatmap.png and report.md into `folder`, each atomically; returns their paths
    in that order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / SCAN_CSV, folder / SCAN_HEATMAP, folder / SCAN_REPORT]
    atomic_write_bytes(paths[0], scan_csv(scan).encode("utf-8"))
    plot_scan_heatmap(scan, paths[1])
    atomic_write_bytes(paths[2], scan_markdown(scan, SCAN_HEATMAP, scan_json).encode("utf-8"))
    return paths
