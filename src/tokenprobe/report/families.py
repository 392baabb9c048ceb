"""Probe families side by side (issue 14): the terminal table, the report.md section, families.png
and families.csv, all drawn from results.json's "families" block (`FamilyEvaluation.to_dict()`).

Does capacity help? Each family is compared with the primary family at the same layer (paired 95%
interval of the difference), and, with a control task (Hewitt & Liang 2019), by its selectivity: task
balanced accuracy minus control balanced accuracy. With --mdl, the online-code compression (Voita &
Titov 2020). Reading a run folder needs no torch: everything here works on the JSON dict (null or NaN
for a missing figure, both read as NaN).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from tokenprobe.files import atomic_write_bytes, json_safe
from tokenprobe.report.plot import num, save_figure
from tokenprobe.vocabulary import best_index

FAMILIES_PLOT = "families.png"
FAMILIES_CSV = "families.csv"
METRIC = "balanced_accuracy"  # what the table, the words and the plot compare families by

# Optional, per row: the paired interval of (this family's selectivity minus the primary family's), when
# results.json carries it; without it the words say whether the two selectivity intervals overlap.
SELECTIVITY_MINUS_PRIMARY = "selectivity_minus_primary"

CONTROL_WORDS = ("every family is also trained on labels that give each current-token type a random label at the "
                 "task's positive rate, which a probe can only learn by memorising token identities")
SELECTIVITY_WORDS = ("task balanced accuracy minus control balanced accuracy on the same held-out positions{paired}: "
                     "an accurate but unselective probe owes its accuracy to its own capacity, not to the "
                     "representation")
MDL_WORDS = ("the online-code description length of the training labels, each block coded by a probe of the "
             "family trained on the blocks before it; compression = uniform bits / online bits, higher when the "
             "labels are easier to extract")


# --------------------------------------------------------------------------------------------- reading


def _nan(value: Any) -> bool:
    return math.isnan(num(value))


def _rows(families: dict[str, Any]) -> list[dict[str, Any]]:
    return list(families.get("layers", []))


def _layers(families: dict[str, Any]) -> list[int]:
    return sorted({int(r["layer"]) for r in _rows(families)})


def _order(families: dict[str, Any]) -> list[str]:
    names = list(families.get("families") or [])
    return names + [f for f in dict.fromkeys(r["family"] for r in _rows(families)) if f not in names]


def _row(families: dict[str, Any], family: str, layer: int) -> dict[str, Any] | None:
    return next((r for r in _rows(families) if r["family"] == family and int(r["layer"]) == layer), None)


def _has_control(families: dict[str, Any]) -> bool:
    return any("selectivity" in r or "control" in r for r in _rows(families))


def _has_mdl(families: dict[str, Any]) -> bool:
    return any(r.get("mdl") for r in _rows(families))


def _has_intervals(families: dict[str, Any]) -> bool:
    """Whether any bootstrap interval is there (none with --bootstrap 0)."""
    for r in _rows(families):
        if not _nan(r.get(f"{METRIC}_low")):
            return True
        if not _nan(r.get("selectivity", {}).get(METRIC, {}).get("low")):
            return True
    return False


def _selectivity(row: dict[str, Any] | None) -> dict[str, Any]:
    return (row or {}).get("selectivity", {}).get(METRIC) or {}


def _versus(row: dict[str, Any] | None) -> dict[str, Any]:
    return (row or {}).get("minus_primary", {}).get(METRIC) or {}


def _compression(row: dict[str, Any] | None) -> float:
    return num(((row or {}).get("mdl") or {}).get("compression"))


# ------------------------------------------------------------------------------------------ formatting


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    value = num(value)
    return "n/a" if math.isnan(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _bracket(low: Any, high: Any, sign: bool = False, sep: str = ", ") -> str:
    """'[0.004, 0.020]' or '' when there is no interval."""
    if _nan(low) or _nan(high):
        return ""
    return f"[{_f(low, sign=sign)}{sep}{_f(high, sign=sign)}]"


def _point_ci(value: Any, low: Any, high: Any, sign: bool = False) -> str:
    """'+0.012 [0.004, 0.020]', or just the point without an interval."""
    ci = _bracket(low, high)
    return _f(value, sign=sign) + (f" {ci}" if ci else "")


def _entry_ci(entry: dict[str, Any], metric: str = METRIC) -> str:
    return _point_ci(entry.get(metric), entry.get(f"{metric}_low"), entry.get(f"{metric}_high"))


def _diff_ci(d: dict[str, Any]) -> str:
    return _point_ci(d.get("difference"), d.get("low"), d.get("high"), sign=True)


def _direction(d: dict[str, Any]) -> int:
    """+1 / -1 when the paired interval lies above / below 0, else 0."""
    if not d or not d.get("significant") or _nan(d.get("difference")):
        return 0
    return 1 if num(d["difference"]) > 0 else -1


def _fmt_compression(value: float) -> str:
    return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.2f}")


# ---------------------------------------------------------------------------------------- the terminal


def format_families_table(families: dict[str, Any]) -> str:
    """One row per layer and family: balanced accuracy with its 95% interval, AUROC, the control task's
    balanced accuracy, selectivity with its interval, MDL compression (with --mdl), and the difference
    from the primary family at that layer, marked > or < where its paired interval excludes 0. Columns
    without figures (no control, no MDL, one family, --bootstrap 0) are left out; a legend follows."""
    rows = _rows(families)
    primary = families.get("primary") or (rows[0]["family"] if rows else "")
    control, mdl, intervals = _has_control(families), _has_mdl(families), _has_intervals(families)
    several = len(_order(families)) > 1
    width = max([6, *(len(str(r["family"])) for r in rows)])
    ci_width, sel_ci_width = 13, 15

    head = f"{'layer':>5}  {'family':<{width}}  {'bal.acc':>7}"
    head += f" {'95% CI':<{ci_width}}" if intervals else ""
    head += f"  {'AUROC':>6}"
    if control:
        head += f"  {'control':>7}  {'select.':>7}" + (f" {'95% CI':<{sel_ci_width}}" if intervals else "")
    if mdl:
        head += f"  {'MDL':>6}"
    if several:
        head += f"  {'vs ' + primary:>{max(9, 3 + len(primary))}}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sel = _selectivity(r)
        line = f"{r['layer']:>5}  {str(r['family']):<{width}}  {_f(r.get(METRIC)):>7}"
        if intervals:
            line += f" {_bracket(r.get(f'{METRIC}_low'), r.get(f'{METRIC}_high'), sep=','):<{ci_width}}"
        line += f"  {_f(r.get('auroc')):>6}"
        if control:
            line += f"  {_f((r.get('control') or {}).get(METRIC)):>7}  {_f(sel.get('difference'), sign=True):>7}"
            if intervals:
                line += f" {_bracket(sel.get('low'), sel.get('high'), sign=True, sep=','):<{sel_ci_width}}"
        if mdl:
            line += f"  {_fmt_compression(_compression(r)):>6}"
        if several and r["family"] != primary:
            d = _versus(r)
            mark = {1: " >", -1: " <", 0: "  "}[_direction(d)]
            line += f"  {_f(d.get('difference'), sign=True) + mark:>{max(9, 3 + len(primary))}}"
        lines.append(line.rstrip())
    lines[0] = lines[0].rstrip()
    legend = [("95% CI: bootstrap over held-out chunks" if intervals else "no intervals (--bootstrap 0)")
              + "; held-out balanced set"]
    if control:
        legend.append("control: bal.acc on the control task (Hewitt & Liang 2019); select. = bal.acc - control")
    if mdl:
        legend.append("MDL: online-code compression, uniform/online bits (Voita & Titov 2020)")
    if several:
        legend.append(f"vs {primary}: bal.acc minus the primary family's"
                      + (", > / < where the paired 95% CI excludes 0" if intervals else ""))
    lines.append("; ".join(legend))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the words


def _selectivity_verdict(row: dict[str, Any], base: dict[str, Any]) -> tuple[int | None, str]:
    """(+1 higher / -1 lower / 0 not told apart / None without intervals, the evidence in words) for
    this family's selectivity against the primary family's at the same layer."""
    family, primary = row["family"], base["family"]
    paired = (row.get(SELECTIVITY_MINUS_PRIMARY) or {}).get(METRIC)
    if paired and not _nan(paired.get("low")):
        return _direction(paired), f"selectivity {family} minus {primary} {_diff_ci(paired)}"
    mine, theirs = _selectivity(row), _selectivity(base)
    text = (f"selectivity {_point_ci(mine.get('difference'), mine.get('low'), mine.get('high'), True)} "
            f"vs {primary}'s {_point_ci(theirs.get('difference'), theirs.get('low'), theirs.get('high'), True)}")
    if any(_nan(v) for v in (mine.get("low"), mine.get("high"), theirs.get("low"), theirs.get("high"))):
        return None, text
    if num(mine["low"]) > num(theirs["high"]):
        return 1, text + ": the intervals do not overlap"
    if num(mine["high"]) < num(theirs["low"]):
        return -1, text + ": the intervals do not overlap"
    return 0, text + ": the intervals overlap"


def _family_clause(row: dict[str, Any], base: dict[str, Any], control: bool) -> str:
    """'mlp vs linear +0.012 [0.004, 0.020]: beyond the intervals, and it survives selectivity (...)'."""
    family, primary = row["family"], base["family"]
    d = _versus(row)
    text = f"{family} vs {primary} {_diff_ci(d)}"
    direction = None if _nan(d.get("low")) else _direction(d)
    text += {None: "", 1: ": beyond the intervals", -1: f": beyond the intervals, below {primary}",
             0: ": within the intervals"}[direction]
    if not control or not _selectivity(row) or not _selectivity(base):
        return text
    verdict, evidence = _selectivity_verdict(row, base)
    if direction == 1:
        text += {1: ", and it survives selectivity", -1: ", but it does not survive selectivity",
                 0: ", but it does not clearly survive selectivity", None: ""}[verdict]
    elif verdict:
        text += f"; its selectivity is {'higher' if verdict > 0 else 'lower'}"
    return text + (f"; {evidence}" if direction is None else f" ({evidence})")


def _single_clause(row: dict[str, Any]) -> str:
    sel = _selectivity(row)
    text = f"{row['family']}'s selectivity {_diff_ci(sel)}"
    if _nan(sel.get("low")):
        return text
    return text + {1: ": above 0 beyond the interval", -1: ": below 0 beyond the interval",
                   0: ": within the interval of 0"}[_direction(sel)]


def families_markdown(families: dict[str, Any], plot_name: str | None = FAMILIES_PLOT,
                      hidden_size: int | None = None) -> list[str]:
    """The report.md section "Probe families and the control task": a table like the terminal one, per
    layer in words whether each family's difference from the primary family is beyond the intervals and
    whether it survives selectivity, then a summary. `hidden_size` lets the sparse family's kept
    dimensions be read as a fraction."""
    rows = _rows(families)
    if not rows:
        return []
    order, layers = _order(families), _layers(families)
    primary = families.get("primary") or order[0]
    others = [f for f in order if f != primary]
    control, mdl, intervals = _has_control(families), _has_mdl(families), _has_intervals(families)
    lines = ["## Probe families and the control task", ""]
    names = ", ".join(f"{f} (primary)" if f == primary else f for f in order) if others else primary
    intro = (f"{'Families' if others else 'Family'}: {names}; {'each ' if others else ''}trained on the same "
             "training positions and scored on the same held-out "
             "balanced positions" + (" with the same chunk resamples, so differences are paired." if intervals
                                    else "; no intervals (run with --bootstrap 0), so the figures are points only."))
    lines += [intro, ""]
    explained = []
    if control:
        task = families.get("control_task") or {}
        how = ", ".join(f"{k} {v}" for k, v in task.items() if k in ("rate", "seed"))
        paired = ", with a paired 95% interval" if intervals else ""
        explained += [f"Control task (Hewitt & Liang 2019{f'; {how}' if how else ''}): {CONTROL_WORDS}.",
                      f"Selectivity = {SELECTIVITY_WORDS.format(paired=paired)}."]
    if mdl:
        explained.append(f"MDL (Voita & Titov 2020): {MDL_WORDS}.")
    if explained:
        lines += [" ".join(explained), ""]
    if plot_name:
        lines += [f"![probe families per layer]({plot_name})", ""]

    head = ["layer", "family", "bal. acc.", "AUROC"]
    if control:
        head += ["control bal. acc.", "selectivity"]
    if mdl:
        head += ["MDL compression"]
    if others:
        head += [f"bal. acc. − {primary}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["layer"]), str(r["family"]), _entry_ci(r), _entry_ci(r, "auroc")]
        if control:
            sel = _selectivity(r)
            cells += [_entry_ci(r["control"]) if r.get("control") else "n/a", _diff_ci(sel) if sel else "n/a"]
        if mdl:
            cells.append(_fmt_compression(_compression(r)))
        if others:
            d = _versus(r)
            cells.append("" if r["family"] == primary else
                         _diff_ci(d) + {1: " **above**", -1: " **below**", 0: ""}[_direction(d)])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # Per layer, in words.
    bullets = []
    for layer in layers:
        base = _row(families, primary, layer)
        if others and base:
            clauses = [_family_clause(r, base, control) for f in others if (r := _row(families, f, layer))]
        else:
            clauses = [_single_clause(r) for f in order if (r := _row(families, f, layer)) and _selectivity(r)]
        if len(clauses) == 1:
            bullets.append(f"- Layer {layer}: {clauses[0]}.")
        elif clauses:
            bullets += [f"- Layer {layer}:", *(f"  - {clause}." for clause in clauses)]
    if bullets:
        paired = ", paired 95% interval" if intervals else ", points only: no intervals"
        what = (f"Each family against {primary} at the same layer (balanced accuracy{paired})"
                + (", and whether a gain survives selectivity (a higher selectivity than "
                   f"{primary}'s)" if control else "") if others else
                f"Selectivity per layer ({paired[2:]})")
        lines += [f"{what}:", "", *bullets, ""]

    lines += [_summary(families, primary, others, layers, control, mdl, intervals, hidden_size), ""]
    return lines


def _layer_words(layers: list[int]) -> str:
    from tokenprobe.report.markdown import _layers_text  # the report's one spelling of layer lists

    return _layers_text(layers)


def _how_many(layers: list[int], of: int | None = None, what: str | None = None) -> str:
    """'none', '3 (layers 0–2)', '2 of 3 layers (layers 1, 2)', 'none of 3 layers', '1 of those (layer 2)'."""
    what = what or ("layer" if of == 1 else "layers")
    if not layers:
        return "none" if of is None else f"none of {what if what == 'those' else f'{of} {what}'}"
    count = str(len(layers)) if of is None else f"{len(layers)} of {what if what == 'those' else f'{of} {what}'}"
    return f"{count} ({_layer_words(layers)})"


def _summary(families: dict[str, Any], primary: str, others: list[str], layers: list[int], control: bool,
             mdl: bool, intervals: bool, hidden_size: int | None) -> str:
    n = len(layers)
    parts = []
    for family in others:
        pairs = [(layer, r, _row(families, primary, layer)) for layer in layers
                 if (r := _row(families, family, layer))]
        if intervals:
            above = [layer for layer, r, _ in pairs if _direction(_versus(r)) > 0]
            below = [layer for layer, r, _ in pairs if _direction(_versus(r)) < 0]
            text = (f"{family} beats {primary} beyond the intervals at {_how_many(above, n)}"
                    + f" and falls below it at {_how_many(below)}")
            if control and above:
                kept = [layer for layer, r, base in pairs if layer in above and base
                        and _selectivity_verdict(r, base)[0] == 1]
                text += f", and its gain survives selectivity at {_how_many(kept, len(above), 'those')}"
        else:
            above = [layer for layer, r, _ in pairs if num(_versus(r).get("difference")) > 0]
            text = f"{family} is above {primary} at {len(above)} of {n} layers (points only, no intervals)"
        parts.append(text)
    sentences = []
    if parts:
        sentences.append("In sum: " + "; ".join(parts) + ".")
    if control:
        scored = [r for r in _rows(families) if _selectivity(r)]
        if scored:
            top = scored[best_index([num(_selectivity(r).get("difference")) for r in scored])]
            sel = _selectivity(top)
            sentence = (f"The highest selectivity is {top['family']}'s at layer {top['layer']}, "
                        f"{_diff_ci(sel)}")
            own = [r for r in scored if r["family"] == primary]
            if own and top["family"] != primary:
                best_own = own[best_index([num(_selectivity(r).get("difference")) for r in own])]
                sentence += (f"; {primary}'s highest is at layer {best_own['layer']}, "
                             f"{_diff_ci(_selectivity(best_own))}")
            sentences.append(sentence + ".")
    if mdl:
        coded = [r for r in _rows(families) if r.get("mdl")]
        top = coded[best_index([_compression(r) for r in coded])]
        sentence = (f"The best MDL compression is {top['family']}'s at layer {top['layer']} "
                    f"({_fmt_compression(_compression(top))})")
        own = [r for r in coded if r["family"] == primary]
        if own and top["family"] != primary:
            best_own = own[best_index([_compression(r) for r in own])]
            sentence += (f"; {primary}'s best is at layer {best_own['layer']} "
                         f"({_fmt_compression(_compression(best_own))})")
        sentences.append(sentence + ".")
    for family in _order(families):
        own = [r for r in _rows(families) if r["family"] == family]
        if family != "sparse" or not own:
            continue
        best = own[best_index([num(r.get(METRIC)) for r in own])]
        kept = (best.get("fit") or {}).get("kept")
        if kept is not None:
            of = f" of {hidden_size}" if hidden_size else ""
            sentences.append(f"At its best layer ({best['layer']}, balanced accuracy {_entry_ci(best)}) the sparse "
                             f"probe keeps {kept}{of} dimensions.")
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------- the plot


def plot_families(results: dict[str, Any], path: Path, title: str | None = None) -> None:
    """families.png: balanced accuracy per layer per family with 95% bands (the control task dashed in
    the same colour); selectivity per layer per family with bands and a zero line (with a control task);
    MDL compression per layer per family (with --mdl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenprobe.report.plot import plot_title

    families = results["families"]
    order = _order(families)
    control, mdl, intervals = _has_control(families), _has_mdl(families), _has_intervals(families)
    panels = ["accuracy", *(["selectivity"] if control else []), *(["mdl"] if mdl else [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), constrained_layout=True,
                             squeeze=False)
    axes = list(axes[0])
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bands = "95% bootstrap bands over held-out chunks" if intervals else "no intervals (--bootstrap 0)"
    all_x = _layers(families)

    def band(ax, x, low, high, colour, alpha=0.18):
        if not all(math.isnan(v) for v in low):
            ax.fill_between(x, low, high, color=colour, alpha=alpha, linewidth=0)

    for ax, panel in zip(axes, panels):
        for i, family in enumerate(order):
            colour = cycle[i % len(cycle)]
            rows = sorted((r for r in _rows(families) if r["family"] == family), key=lambda r: int(r["layer"]))
            x = [int(r["layer"]) for r in rows]
            if panel == "accuracy":
                ax.plot(x, [num(r.get(METRIC)) for r in rows], "o-", color=colour, markersize=4, label=family)
                band(ax, x, [num(r.get(f"{METRIC}_low")) for r in rows],
                     [num(r.get(f"{METRIC}_high")) for r in rows], colour)
                ctrl = [r.get("control") or {} for r in rows]
                if any(ctrl):
                    ax.plot(x, [num(c.get(METRIC)) for c in ctrl], "s--", color=colour, markersize=3,
                            label=f"{family}, control task")
                    band(ax, x, [num(c.get(f"{METRIC}_low")) for c in ctrl],
                         [num(c.get(f"{METRIC}_high")) for c in ctrl], colour, alpha=0.08)
            elif panel == "selectivity":
                sel = [_selectivity(r) for r in rows]
                ax.plot(x, [num(s.get("difference")) for s in sel], "o-", color=colour, markersize=4, label=family)
                band(ax, x, [num(s.get("low")) for s in sel], [num(s.get("high")) for s in sel], colour)
            else:
                ax.plot(x, [_compression(r) for r in rows], "o-", color=colour, markersize=4, label=family)
        if panel == "accuracy":
            ax.set_ylabel("balanced accuracy (held-out, balanced)")
            ax.set_title(f"balanced accuracy per layer, {bands}", fontsize=10)
        elif panel == "selectivity":
            ax.axhline(0, color="0.45", linewidth=1)
            ax.set_ylabel("selectivity: task minus control balanced accuracy")
            ax.set_title(f"selectivity (Hewitt & Liang 2019), {bands}", fontsize=10)
        else:
            ax.axhline(1, color="0.45", linewidth=1, linestyle=":")
            ax.set_ylabel("MDL compression (uniform / online bits)")
            ax.set_title("online-code compression (Voita & Titov 2020)", fontsize=10)
        ax.set_xlabel("layer (0 = embedding output)")
        ax.grid(alpha=0.3)
        if len(all_x) <= 40:
            ax.set_xticks(all_x)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title if title is not None else plot_title([(path.parent, results)]) + ": probe families",
                 fontsize=11)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- the CSV

FLAT = ["n", "positives", "negatives", "balanced_accuracy", "balanced_accuracy_low", "balanced_accuracy_high",
        "accuracy", "accuracy_low", "accuracy_high", "auroc", "auroc_low", "auroc_high", "tp", "fp", "tn", "fn",
        "threshold"]
CONTROL_FIELDS = ["balanced_accuracy", "balanced_accuracy_low", "balanced_accuracy_high", "accuracy",
                  "auroc", "auroc_low", "auroc_high"]
PAIRED = [m + (f"_{part}" if part else "") for m in ("balanced_accuracy", "auroc")
          for part in ("", "low", "high", "significant")]
MDL_FIELDS = ["codelength_bits", "uniform_bits", "compression", "rows"]


def _paired_cells(prefix: str, block: dict[str, Any] | None) -> dict[str, Any]:
    out = {}
    for metric, d in (block or {}).items():
        out[f"{prefix}{metric}"] = d.get("difference")
        for part in ("low", "high", "significant"):
            out[f"{prefix}{metric}_{part}"] = d.get(part)
    return out


def families_csv(families: dict[str, Any]) -> str:
    """One row per layer and family: the held-out balanced metrics, the control task's, selectivity and
    the difference from the primary family (each with low, high, significant), MDL, and the scalar fit
    settings (fit_l2, fit_kept, fit_width, ...). NaN and missing figures as empty cells."""
    rows = _rows(families)
    fit_keys = list(dict.fromkeys(k for r in rows for k, v in (r.get("fit") or {}).items()
                                  if isinstance(v, (int, float, str, bool)) or v is None))
    fields = ["layer", "family", "primary", "set", "probe_file", *FLAT,
              *(f"control_{k}" for k in CONTROL_FIELDS),
              *(f"selectivity_{k}" for k in PAIRED), *(f"minus_primary_{k}" for k in PAIRED),
              *(f"mdl_{k}" for k in MDL_FIELDS), *(f"fit_{k}" for k in fit_keys)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        row: dict[str, Any] = {"layer": r["layer"], "family": r["family"],
                               "primary": r["family"] == families.get("primary"),
                               "set": families.get("set", "eval"), "probe_file": r.get("probe_file")}
        row.update({k: r.get(k) for k in FLAT})
        row.update({f"control_{k}": (r.get("control") or {}).get(k) for k in CONTROL_FIELDS})
        row.update(_paired_cells("selectivity_", r.get("selectivity")))
        row.update(_paired_cells("minus_primary_", r.get("minus_primary")))
        row.update({f"mdl_{k}": (r.get("mdl") or {}).get(k) for k in MDL_FIELDS})
        row.update({f"fit_{k}": (r.get("fit") or {}).get(k) for k in fit_keys})
        writer.writerow({k: "" if v is None else v for k, v in json_safe(row).items()})  # NaN -> empty
    return buffer.getvalue()


def write_families_csv(out_dir: Path, families: dict[str, Any]) -> Path:
    path = Path(out_dir) / FAMILIES_CSV
    atomic_write_bytes(path, families_csv(families).encode())
    return path
