"""Probes on another corpus: in-corpus and out-of-corpus figures side by side, and the transfer matrix.

`tokenprobe eval` stores a "transfer" block in its results.json (:func:`transfer_block`): per family and
layer, the probe's balanced accuracy and AUROC on the held-out balanced set of the corpus it was trained
on (the source run's own figures) and of the corpus it was evaluated on, and the difference (out minus
in) with a 95% interval. The two figures come from different corpora, independent samples with no
shared resamples, so the difference cannot be bootstrapped pairwise as a run's layer differences are:
its interval is a normal approximation, each figure's standard error read off its stored 95% interval
((high - low) / 3.92) and the two combined in quadrature.

`tokenprobe report` over several run and eval folders that share model, task and primary probe family
adds a transfer matrix (:func:`transfer_section`): rows the corpus the probes were trained on, columns
the corpus they were evaluated on (a training run counts as evaluated on its own corpus), each cell the
best layer's balanced accuracy with its interval, as a markdown table and a heatmap (transfer.png).

Everything here reads results.json dicts only (no torch), null or NaN for a missing figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenprobe.report.plot import num, save_figure
from tokenprobe.vocabulary import COMPARED_METRICS, PRIMARY_SET, best_index

TRANSFER_PLOT = "transfer.png"
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
WIDTH95 = 2 * Z95  # a normal 95% interval spans 3.92 standard errors
METRIC_LABELS = {"balanced_accuracy": "balanced accuracy", "auroc": "AUROC"}
DIFFERENCE_METHOD = (
    "out minus in; 95% normal-approximation interval: the two figures come from different corpora "
    "(independent samples, no shared bootstrap resamples), so each one's standard error is read off its "
    "stored 95% interval as (high - low) / 3.92 and the two are combined in quadrature: "
    "difference +/- 1.96 * sqrt(se_in^2 + se_out^2)")
FIGURES = ("n", "positives", *(f"{m}{end}" for m in COMPARED_METRICS for end in ("", "_low", "_high")))


# ------------------------------------------------------------------------------------- the difference


def standard_error(low: Any, high: Any) -> float:
    """The standard error a symmetric normal 95% interval [low, high] implies: (high - low) / 3.92."""
    return (num(high) - num(low)) / WIDTH95


def independent_difference(inside: dict[str, Any], outside: dict[str, Any], metric: str) -> dict[str, Any]:
    """`outside` minus `inside` on `metric`, with the 95% interval of a normal approximation for two
    independent estimates (see the module); NaN bounds when either figure has no interval."""
    a, b = num(inside.get(metric)), num(outside.get(metric))
    se = math.hypot(standard_error(inside.get(f"{metric}_low"), inside.get(f"{metric}_high")),
                    standard_error(outside.get(f"{metric}_low"), outside.get(f"{metric}_high")))
    value = b - a
    low, high = value - Z95 * se, value + Z95 * se
    return {"difference": value, "low": low, "high": high, "se": se,
            "significant": bool(low > 0 or high < 0)}  # False when NaN


# ------------------------------------------------------------------------------------ the eval's block


def _figures(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if entry is None else {k: entry.get(k) for k in FIGURES}


def source_entry(results: dict[str, Any], family: str, layer: int) -> dict[str, Any] | None:
    """A run's figures of one family's probe at one layer, on the held-out balanced set: its `layers`
    for its primary family, its `families` block for the others."""
    families = results.get("families") or {}
    primary = families.get("primary") or str(results["run"]["config"].get("probe", "linear")).split(",")[0].strip()
    if family == primary:
        return next((r for r in results.get("layers", []) if int(r["layer"]) == layer), None)
    return next((r for r in families.get("layers", []) if r["family"] == family and int(r["layer"]) == layer), None)


def _best(rows: list[dict[str, Any]], side: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for metric in COMPARED_METRICS:
        values = [num((r[side] or {}).get(metric)) for r in rows]
        out[metric] = None if all(math.isnan(v) for v in values) else rows[best_index(values)]["layer"]
    return out


def transfer_block(source_dir: Path, source_results: dict[str, Any], record: dict[str, Any],
                   layers: list[dict[str, Any]], families: dict[str, Any] | None) -> dict[str, Any]:
    """results.json's "transfer" block of an eval: the source run's figures (`source_results`) and the
    eval's (`layers`, its primary family's LayerResult dicts; `families`, FamilyEvaluation's dict or None)
    side by side per family and layer, with each difference and the best layers."""
    eval_rows: dict[tuple[str, int], dict[str, Any]] = {}
    primary = families["primary"] if families else record["config"]["probe"].split(",")[0].strip()
    for r in layers:
        eval_rows[(primary, int(r["layer"]))] = r
    for r in (families or {}).get("layers", []):
        eval_rows.setdefault((r["family"], int(r["layer"])), r)
    order = list(dict.fromkeys([primary, *(families or {}).get("families", [])]))
    rows = []
    for family in order:
        for layer in sorted(layer for f, layer in eval_rows if f == family):
            inside = _figures(source_entry(source_results, family, layer))
            outside = _figures(eval_rows[(family, layer)])
            rows.append({"family": family, "layer": layer, "in": inside, "out": outside,
                         "difference": {m: independent_difference(inside, outside, m) for m in COMPARED_METRICS}
                         if inside is not None else None})
    source_run = source_results["run"]
    corpus = {k: record["corpus"].get(k) for k in ("name", "sha256")}
    trained_on = {k: source_run["corpus"].get(k) for k in ("name", "sha256")}
    return {
        "source": {"run": str(source_dir), "sweep_name": source_run.get("sweep_name"), "corpus": trained_on,
                   "created": source_run.get("created")},
        "corpus": corpus,
        "same_corpus": corpus["sha256"] == trained_on["sha256"],
        "set": PRIMARY_SET,
        "primary": primary,
        "families": order,
        "difference_method": DIFFERENCE_METHOD,
        "layers": rows,
        "best": {family: {side: _best([r for r in rows if r["family"] == family and r[side] is not None], side)
                          for side in ("in", "out")} for family in order},
    }


# ---------------------------------------------------------------------------------- the eval's report


def _f(value: Any, digits: int = 3, sign: bool = False) -> str:
    value = num(value)
    return "n/a" if math.isnan(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _with_ci(entry: dict[str, Any] | None, metric: str) -> str:
    if not entry:
        return "n/a"
    low, high = num(entry.get(f"{metric}_low")), num(entry.get(f"{metric}_high"))
    text = _f(entry.get(metric))
    return text if math.isnan(low) else f"{text} [{low:.3f}, {high:.3f}]"


def _diff(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    text = _f(d["difference"], sign=True)
    if math.isnan(num(d.get("low"))):
        return text
    return f"{text} [{_f(d['low'], sign=True)}, {_f(d['high'], sign=True)}]" + (" *" if d["significant"] else "")


def _short(name: str) -> str:
    return Path(name).name or name if name.startswith(("/", "./", "../", "~")) else name


def _best_words(transfer: dict[str, Any], family: str, metric: str) -> str:
    best = transfer["best"].get(family, {})
    rows = {r["layer"]: r for r in transfer["layers"] if r["family"] == family}

    def at(side: str) -> str:
        layer = best.get(side, {}).get(metric)
        return "n/a" if layer is None else f"layer {layer} ({_f((rows[layer][side] or {}).get(metric))})"

    same = best.get("in", {}).get(metric) == best.get("out", {}).get(metric)
    return (f"Best layer by {METRIC_LABELS[metric]}: in-corpus {at('in')}, out-of-corpus {at('out')}"
            + (" (the same layer)." if same else "."))


def transfer_markdown(transfer: dict[str, Any]) -> list[str]:
    """The eval report's section: per family a table of each layer's in-corpus and out-of-corpus balanced
    accuracy and AUROC with their intervals and the differences, which layer is best in each, and how the
    difference's interval is computed."""
    source, primary = transfer["source"], transfer["primary"]
    trained, evaluated = _short(source["corpus"]["name"]), _short(transfer["corpus"]["name"])
    lines = ["## In corpus and out of corpus", "",
             f"The saved probes of run `{source['run']}` ({source.get('sweep_name')}), trained on `{trained}`, "
             f"evaluated unchanged (nothing refitted) on `{evaluated}`, with the run's own held-out sampling "
             "(same seed, split and position counts). \"In\" is the run's own figure on its held-out balanced "
             f"set (its results.json), \"out\" the figure on `{evaluated}`'s; difference = out minus in.", ""]
    if transfer.get("same_corpus"):
        lines += ["Both are the same corpus: with the run's own --max-tokens the positions, and so the figures, "
                  "are the run's own and the difference is 0; its interval (below) assumes independent samples "
                  "and means nothing here.", ""]
    lines += ["The difference's 95% interval is a normal approximation, not a bootstrap: the two figures come from "
              "different corpora (independent samples that share no resamples), so it cannot be paired as the "
              "run's layer comparisons are. Each figure's standard error is read off its stored 95% interval "
              "as se = (high - low) / 3.92, the two are combined in quadrature, and the interval is "
              "difference ± 1.96 · sqrt(se_in² + se_out²). * marks an interval that excludes 0.", ""]
    for family in transfer["families"]:
        rows = [r for r in transfer["layers"] if r["family"] == family]
        if not rows:
            continue
        if len(transfer["families"]) > 1:
            lines += [f"### {family} probes" + (" (the primary family)" if family == primary else ""), ""]
        lines += [f"| layer | bal. acc. in `{trained}` | bal. acc. on `{evaluated}` | difference | "
                  f"AUROC in `{trained}` | AUROC on `{evaluated}` | difference |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            d = r["difference"] or {}
            lines.append(f"| {r['layer']} | {_with_ci(r['in'], 'balanced_accuracy')} | "
                         f"{_with_ci(r['out'], 'balanced_accuracy')} | {_diff(d.get('balanced_accuracy'))} | "
                         f"{_with_ci(r['in'], 'auroc')} | {_with_ci(r['out'], 'auroc')} | {_diff(d.get('auroc'))} |")
        lines += ["", *(f"- {_best_words(transfer, family, m)}" for m in COMPARED_METRICS), ""]
    return lines


def transfer_table(transfer: dict[str, Any]) -> str:
    """The terminal's version of the primary family's side-by-side table."""
    primary = transfer["primary"]
    head = (f"{'layer':>5}  {'bal.acc in':>10} {'out':>6} {'out - in [95% CI]':>26}   "
            f"{'AUROC in':>8} {'out':>6} {'out - in [95% CI]':>26}")
    lines = [f"{primary} probes trained on {_short(transfer['source']['corpus']['name'])}, evaluated on "
             f"{_short(transfer['corpus']['name'])} (held-out balanced set)", head, "-" * len(head)]
    for r in (r for r in transfer["layers"] if r["family"] == primary):
        d = r["difference"] or {}
        cells = []
        for metric, width in (("balanced_accuracy", 10), ("auroc", 8)):
            cells.append(f"{_f((r['in'] or {}).get(metric)):>{width}} {_f(r['out'].get(metric)):>6} "
                         f"{_diff(d.get(metric)):>26}")
        lines.append(f"{r['layer']:>5}  " + "   ".join(cells))
    lines += [_best_words(transfer, primary, m) for m in COMPARED_METRICS]
    lines.append("out - in: 95% normal approximation from the two independent intervals (different corpora); "
                 "* excludes 0")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- the transfer matrix


def _primary_family(results: dict[str, Any]) -> str:
    families = results.get("families") or {}
    return families.get("primary") or str(results["run"]["config"].get("probe", "linear")).split(",")[0].strip()


def _group_key(results: dict[str, Any]) -> tuple:
    run = results["run"]
    config = run.get("config", {})
    target = run.get("target", {})
    return (run["model"].get("name"), run["model"].get("weights_hash"), str(config.get("task")),
            str(target.get("text", config.get("target"))), tuple(target.get("token_ids") or ()),
            config.get("context_length"), _primary_family(results))


def _corpora(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trained on, evaluated on): name and sha256 of each; a training run's two are its own corpus."""
    evaluated = {k: results["run"]["corpus"].get(k) for k in ("name", "sha256")}
    transfer = results.get("transfer")
    trained = transfer["source"]["corpus"] if transfer else evaluated
    return {k: trained.get(k) for k in ("name", "sha256")}, evaluated


def best_figure(results: dict[str, Any]) -> dict[str, Any]:
    """A folder's best layer (primary family, balanced accuracy on the held-out balanced set) and its figure."""
    layers = results["layers"]
    best = (results.get("comparisons") or {}).get("balanced_accuracy", {}).get("best_layer")
    entry = next((r for r in layers if r["layer"] == best), None) if best is not None else None
    if entry is None:
        entry = layers[best_index([num(r.get("balanced_accuracy")) for r in layers])]
    return {"layer": entry["layer"], "balanced_accuracy": num(entry.get("balanced_accuracy")),
            "low": num(entry.get("balanced_accuracy_low")), "high": num(entry.get("balanced_accuracy_high"))}


@dataclass
class TransferMatrix:
    """One model, task and primary family: best-layer balanced accuracy by (trained on, evaluated on)."""

    key: tuple
    corpora: list[str]  # corpus sha256 in order of first appearance
    names: dict[str, str]  # sha256 -> the name shown
    rows: list[str]  # trained-on corpora (sha256)
    columns: list[str]  # evaluated-on corpora (sha256)
    cells: dict[tuple[str, str], dict[str, Any]]  # (row, column) -> best_figure + "folder" + "kind"
    also: list[tuple[tuple[str, str], dict[str, Any]]] = field(default_factory=list)  # folders of a taken cell

    @property
    def family(self) -> str:
        return self.key[-1]

    def value(self, row: str, column: str) -> float:
        cell = self.cells.get((row, column))
        return float("nan") if cell is None else cell["balanced_accuracy"]


def transfer_matrices(runs: list[tuple[Path, dict[str, Any]]]) -> list[TransferMatrix]:
    """The matrices of a multi-folder report: one per model, task and primary family shared by at least
    two folders one of which is an eval; a cell two folders fill shows the first given (the other is
    listed under `also`)."""
    groups: dict[tuple, list[tuple[Path, dict[str, Any]]]] = {}
    for folder, results in runs:
        groups.setdefault(_group_key(results), []).append((folder, results))
    matrices = []
    for key, members in groups.items():
        if len(members) < 2 or not any(results.get("transfer") for _, results in members):
            continue
        names: dict[str, str] = {}
        rows: list[str] = []
        columns: list[str] = []
        cells: dict[tuple[str, str], dict[str, Any]] = {}
        also = []
        for folder, results in members:
            trained, evaluated = _corpora(results)
            for corpus in (trained, evaluated):
                names.setdefault(corpus["sha256"], str(corpus["name"]))
            rows += [trained["sha256"]] if trained["sha256"] not in rows else []
            columns += [evaluated["sha256"]] if evaluated["sha256"] not in columns else []
            cell = {**best_figure(results), "folder": str(folder),
                    "kind": "eval" if results.get("transfer") else "train"}
            at = (trained["sha256"], evaluated["sha256"])
            if at in cells:
                also.append((at, cell))
            else:
                cells[at] = cell
        corpora = list(names)
        short = {sha: _short(name) for sha, name in names.items()}
        if len(set(short.values())) == len(short):
            names = short
        if len(set(names.values())) < len(names):  # two corpora of one name (edited between runs)
            names = {sha: f"{name} ({sha[:8]})" for sha, name in names.items()}
        order = {sha: i for i, sha in enumerate(corpora)}
        rows.sort(key=order.get)
        columns.sort(key=order.get)
        matrices.append(TransferMatrix(key, corpora, names, rows, columns, cells, also))
    return matrices


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    value, low, high = cell["balanced_accuracy"], cell["low"], cell["high"]
    text = _f(value) + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]")
    return f"{text} (layer {cell['layer']})"


def matrix_markdown(matrix: TransferMatrix, plot_name: str | None, heading: str = "## Transfer between corpora"
                    ) -> list[str]:
    model, _, task, target = matrix.key[:4]
    lines = [heading, "",
             f"Model `{model}`, task `{task}` {target!r}, {matrix.family} probes (each folder's primary family). "
             "Each cell is the best layer's balanced accuracy on the held-out balanced set of the column's "
             "corpus, with its 95% bootstrap interval over held-out chunks; rows: the corpus the probes were "
             "trained on; columns: the corpus they were evaluated on (a training run counts as evaluated on its "
             "own corpus; `tokenprobe eval` gives the others). The best layer is chosen on the column's corpus "
             "itself.", ""]
    if plot_name:
        lines += [f"![transfer matrix]({plot_name})", ""]
    lines += ["| trained on \\ evaluated on | " + " | ".join(f"`{matrix.names[c]}`" for c in matrix.columns) + " |",
              "|---|" + "---|" * len(matrix.columns)]
    for row in matrix.rows:
        lines.append(f"| `{matrix.names[row]}` | "
                     + " | ".join(_cell_text(matrix.cells.get((row, c))) for c in matrix.columns) + " |")
    lines.append("")
    lines += [f"- `{matrix.names[r]}` → `{matrix.names[c]}`: `{cell['folder']}` ({cell['kind']})"
              for (r, c), cell in matrix.cells.items()]
    lines += [f"- also `{matrix.names[r]}` → `{matrix.names[c]}`: `{cell['folder']}` ({cell['kind']}), "
              f"{_cell_text(cell)}; the table shows the folder given first" for (r, c), cell in matrix.also]
    lines.append("")
    return lines


def plot_transfer(matrix: TransferMatrix, path: Path) -> None:
    """The matrix as a heatmap (0.5, chance, to 1), each cell annotated with its figure and interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[matrix.value(r, c) for c in matrix.columns] for r in matrix.rows], dtype=float)
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(matrix.columns), 1.6 + 1.0 * len(matrix.rows)),
                           constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.5, vmax=1.0, aspect="auto")
    for i, row in enumerate(matrix.rows):
        for j, column in enumerate(matrix.columns):
            cell = matrix.cells.get((row, column))
            if cell is None:
                ax.text(j, i, "not evaluated", ha="center", va="center", fontsize=8, color="0.35")
                continue
            low, high = cell["low"], cell["high"]
            text = _f(cell["balanced_accuracy"]) + ("" if math.isnan(low) else f"\n[{low:.3f}, {high:.3f}]")
            text += f"\nlayer {cell['layer']}"
            dark = math.isnan(values[i, j]) or values[i, j] < 0.8
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(matrix.columns)), [matrix.names[c] for c in matrix.columns], rotation=20, ha="right")
    ax.set_yticks(range(len(matrix.rows)), [matrix.names[r] for r in matrix.rows])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained on")
    model, _, task, target = matrix.key[:4]
    ax.set_title(f"best-layer balanced accuracy, {matrix.family} probes\n{model}, task {task} {target!r}",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="balanced accuracy")
    save_figure(fig, path)


def transfer_section(runs: list[tuple[Path, dict[str, Any]]], out: Path) -> list[str]:
    """The combined report's transfer matrices (none unless two folders of one model, task and primary
    family include an eval): their markdown, each drawn into `out` (transfer.png, then transfer-2.png ...)."""
    lines: list[str] = []
    matrices = transfer_matrices(runs)
    for i, matrix in enumerate(matrices, 1):
        name = TRANSFER_PLOT if i == 1 else f"transfer-{i}.png"
        plot_transfer(matrix, Path(out) / name)
        heading = "## Transfer between corpora" + (f" ({i} of {len(matrices)})" if len(matrices) > 1 else "")
        lines += matrix_markdown(matrix, name, heading)
    return lines
