"""The sweep report in words (`report.md`), and `tokenprobe report`: both built from a run folder's
results.json alone, without torch or transformers.

`tokenprobe train` writes report.md and plot.png into each run folder; `tokenprobe report RUN_DIR
[RUN_DIR ...]` rebuilds them, and with several run folders draws them in one plot (one colour per run).
A `tokenprobe scan` folder (scan.json) is reported on its own, by tokenprobe.report.scan.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes
from tokenprobe.report.families import FAMILIES_PLOT, families_markdown, plot_families
from tokenprobe.report.plot import METRICS, PLOT, compare_runs, num, plot
from tokenprobe.vocabulary import BASELINE_LABELS, best_index

REPORT = "report.md"


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise TokenprobeError(f"{run_dir} is not a tokenprobe run folder: no results.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TokenprobeError(f"cannot read {path}: {exc}") from exc


SCAN_ALONE = ("tokenprobe report draws several runs of `train` together; a scan is reported on its own: "
              "tokenprobe report SCAN_DIR")


def is_scan(folder: Path) -> bool:
    """Whether a folder holds a `tokenprobe scan` (scan.json, and no results.json of a `train` run)."""
    return (Path(folder) / "scan.json").is_file() and not (Path(folder) / "results.json").is_file()


def load_scan(folder: Path) -> dict[str, Any]:
    """A scan folder's scan.json, with a one-line error when it is missing, unreadable or not a scan."""
    path = Path(folder) / "scan.json"
    if not path.is_file():
        raise TokenprobeError(f"{folder} is not a tokenprobe scan folder: no scan.json")
    try:
        scan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenprobeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(scan, dict) or scan.get("kind") != "scan" or not isinstance(scan.get("targets"), list):
        raise TokenprobeError(f'cannot read {path}: not a tokenprobe scan (no "kind": "scan" with a list of '
                              '"targets"); rerun tokenprobe scan')
    return scan


def _f(value: Any, digits: int = 3) -> str:
    value = num(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _with_ci(entry: dict[str, Any], metric: str) -> str:
    low, high = num(entry.get(f"{metric}_low")), num(entry.get(f"{metric}_high"))
    text = _f(entry.get(metric))
    return text if math.isnan(low) else f"{text} [{low:.3f}, {high:.3f}]"


def _signed(d: dict[str, Any]) -> str:
    return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 layer pair', '6 layer pairs', '1,204 training positions'."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def _layers_text(layers: list[int]) -> str:
    """'none', 'layer 0', 'layers 0, 4', 'layers 0\u20133, 7' (three or more consecutive as a range)."""
    layers = sorted(int(layer) for layer in layers)
    if not layers:
        return "none"
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    parts = [f"{r[0]}\u2013{r[-1]}" if len(r) >= 3 else ", ".join(map(str, r)) for r in runs]
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(parts)


def _fraction(entry: dict[str, Any] | None, percent: bool = False) -> str:
    """The probe's AUROC as a fraction of the model's own, with its interval when there is one."""
    if not entry:
        return "n/a"
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 3)
    text = _f(scale * num(entry.get("value")), digits) + unit
    low, high = num(entry.get("low")), num(entry.get("high"))
    return text if math.isnan(low) else f"{text} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


FEW = 5  # a list of layer differences longer than this shows its largest few and a count


def _few(what: str, items: list[tuple[float, str]]) -> str:
    """'what: none.', 'what (2): a; b.' or, when long, 'what (40; the 5 largest): a; ...; 35 more ...'."""
    if not items:
        return f"{what}: none."
    if len(items) <= FEW:
        return f"{what} ({len(items)}): " + "; ".join(text for _, text in items) + "."
    largest = sorted(items, key=lambda item: -abs(item[0]))[:FEW]
    return (f"{what} ({len(items)}; the {FEW} largest): " + "; ".join(text for _, text in largest)
            + f"; {len(items) - FEW} more in results.json (comparisons).")


def _versus_baselines(comparisons: dict[str, Any], metric: str, layer: int) -> dict[str, Any]:
    """The paired differences of the probe at `layer` minus each baseline, for `metric`."""
    entry = comparisons.get(metric, {})
    if entry.get("best_layer") == layer and entry.get("best_minus_baselines"):
        return entry["best_minus_baselines"]
    per_layer = entry.get("layer_minus_baselines", {})
    return per_layer.get(str(layer), per_layer.get(layer, {}))


def render_markdown(results: dict[str, Any], plot_name: str | None = PLOT, title: bool = True,
                    families_plot: str | None = FAMILIES_PLOT) -> str:
    """report.md from results.json; with a "families" block (several probe families, a control task or
    MDL) also the section "Probe families and the control task", referring to `families_plot`."""
    run, layers = results["run"], results["layers"]
    config, baselines = run["config"], results.get("baselines", {})
    comparisons = results.get("comparisons", {})
    positions = run.get("positions", {})
    lines: list[str] = []
    if title:
        lines += [f"# tokenprobe report: {run.get('sweep_name', '')}", ""]
    record = run.get("target", {})
    target = record.get("text", config.get("target"))
    task = str(config.get("task"))
    if "labels" in record:  # span labels: the run says its own question
        asked = f"{record.get('question', target)}?"
    else:
        question = {"next": "will the next token be", "current": "is this token"}.get(
            task, f"will the token {task.removeprefix('ahead:')} ahead be")
        shown = f"any of {target}" if len(record.get("token_ids", [])) > 1 else repr(target)
        asked = f"{question} {shown}?"
    resamples = comparisons.get("resamples") or run.get("intervals", {}).get("resamples") or 0
    transfer = results.get("transfer")  # `tokenprobe eval`: a run's probes on another corpus, not refitted
    lines += [
        f"Model `{run['model']['name']}` ({run.get('dtype')}), "
        + (f"probes trained on corpus `{transfer['source']['corpus']['name']}` evaluated on corpus "
           f"`{run['corpus']['name']}`, task " if transfer else f"corpus `{run['corpus']['name']}`, task ")
        + f"`{config.get('task')}`: {asked} Context {config.get('context_length')} tokens; "
        + ("" if transfer else f"{_count(positions.get('train', {}).get('positions', 0), 'training position')}; ")
        + f"{_count(positions.get('eval', {}).get('positions', 0), 'held-out position')} (balanced) from "
        f"{_count(positions.get('eval', {}).get('chunks', 0), 'held-out chunk')}, plus "
        f"{positions.get('eval_natural', {}).get('positions', 0):,} at the natural class ratio.",
        "",
        (f"Intervals are 95% bootstrap intervals over the held-out chunks ({resamples} resamples), not over "
         "positions; differences are tested pairwise on the same resamples." if resamples else
         "No intervals (run with --bootstrap 0)."),
        "",
    ]
    shared = run.get("distributed")
    if shared:  # the forward pass was split over processes (torchrun): how, and that it changes no figure
        ranks = shared.get("ranks") or []
        rate = (run.get("extraction") or {}).get("tokens_per_second")
        lines += [f"The forward pass ran on {shared.get('world_size')} processes ({shared.get('backend')}), "
                  f"{' + '.join(str(r.get('batches')) for r in ranks)} batches"
                  + (f", {rate:,.0f} tokens/s in all" if isinstance(rate, (int, float)) else "")
                  + "; rank 0 fitted and scored. Every figure is the one a single process gives "
                  "(the same batches, read back in the same order).", ""]
    if plot_name:
        lines += [f"![probe and baselines per layer]({plot_name})", ""]
    if transfer:
        from tokenprobe.report.transfer import transfer_markdown

        lines += transfer_markdown(transfer)

    by_layer = {r["layer"]: r for r in layers}
    bal = comparisons.get("balanced_accuracy", {})
    best_layer = bal.get("best_layer")
    if best_layer is None:
        best_layer = layers[best_index([r["balanced_accuracy"] for r in layers])]["layer"]
    best = by_layer[best_layer]
    fraction = best.get("auroc_fraction_of_model", {}).get("eval")
    lines += ["## Best layer", "",
              f"Layer {best_layer}: balanced accuracy {_with_ci(best, 'balanced_accuracy')}, AUROC "
              f"{_with_ci(best, 'auroc')}"
              + (f"; its AUROC is {_fraction(fraction, percent=True)} of the model's own." if fraction else "."), ""]
    auroc = comparisons.get("auroc", {})
    auroc_best = auroc.get("best_layer")
    if bal and resamples:
        lines += [f"Indistinguishable from it in balanced accuracy (the 95% interval of the difference includes 0): "
                  f"{_layers_text(bal.get('indistinguishable_from_best', []))}.",
                  f"By AUROC the best layer is {'also ' if auroc_best == best_layer else ''}{auroc_best}; "
                  f"indistinguishable from it: {_layers_text(auroc.get('indistinguishable_from_best', []))}.", ""]

    if baselines:
        lines += ["## Compared with the baselines", "", "Held-out balanced set; baseline thresholds chosen on the "
                  "training positions, probes at 0.5.", "",
                  "| predictor | balanced accuracy | AUROC |", "|---|---|---|",
                  f"| probe, layer {best_layer} | {_with_ci(best, 'balanced_accuracy')} | {_with_ci(best, 'auroc')} |"]
        lens = best.get("logit_lens", {}).get("eval")
        for name in ("model", "logit_lens", "token_stats", "majority"):
            entry = lens if name == "logit_lens" else baselines.get(name, {}).get("sets", {}).get("eval")
            if entry:
                label = BASELINE_LABELS[name] + (f", layer {best_layer}" if name == "logit_lens" else "")
                lines.append(f"| {label} | {_with_ci(entry, 'balanced_accuracy')} | {_with_ci(entry, 'auroc')} |")
        bullets_from = len(lines) + 1
        lines.append("")
        # Every bullet speaks of the table's probe (the best layer by balanced accuracy), for both metrics.
        for metric, metric_label in METRICS:
            for name, d in _versus_baselines(comparisons, metric, best_layer).items():
                verdict = ("higher than" if d["significant"] and d["difference"] > 0 else
                           "lower than" if d["significant"] else "indistinguishable from")
                lines.append(f"- {metric_label}: the probe at layer {best_layer} is {verdict} "
                             f"the {BASELINE_LABELS[name]} ({_signed(d)}).")
        if resamples and auroc_best is not None and auroc_best != best_layer:
            tie = best_layer in auroc.get("indistinguishable_from_best", [])
            lines.append(f"- By AUROC alone the best layer is {auroc_best}; layer {best_layer} (the best by balanced "
                         f"accuracy, compared above) is {'indistinguishable from it' if tie else 'below it'} in AUROC.")
        per_layer = bal.get("layer_minus_baselines", {})
        if per_layer:
            not_above = [int(k) for k, v in per_layer.items()
                         if "token_stats" in v and not (v["token_stats"]["significant"] and v["token_stats"]["difference"] > 0)]
            above_lens = [int(k) for k, v in per_layer.items()
                          if "logit_lens" in v and v["logit_lens"]["significant"] and v["logit_lens"]["difference"] > 0]
            lines += ["- Where the probe does NOT beat token statistics in balanced accuracy: "
                      f"{_layers_text(not_above)}.",
                      "- Where the probe beats that layer's logit lens in balanced accuracy: "
                      f"{_layers_text(above_lens)}."]
        if len(lines) > bullets_from:
            lines.append("")
    else:
        skipped = (run.get("baselines") or {}).get("skipped")
        why = (skipped or ("they predict the next token and this run asks about the current one"
               if config.get("task") == "current" else "the run was made with --no-baselines"))
        lines += ["## Baselines", "", f"None: {why}.", ""]

    if bal.get("pairs"):
        pairs = bal["pairs"]
        steps = [d for d in pairs if d["b"] == _next_layer(d["a"], by_layer) and d["significant"]]
        drops = [d for d in pairs if d["a"] < d["b"] and d["significant"] and d["difference"] > 0]
        differ = sum(d["significant"] for d in pairs)
        lines += ["## Which layer differences are real", "",
                  "Differences in balanced accuracy whose paired 95% interval excludes 0.", "",
                  "- " + _few("Steps between neighbouring layers", [
                      (d["difference"], f"{d['a']}→{d['b']} {-d['difference']:+.3f}") for d in steps]),
                  "- " + _few("Drops, a later layer significantly below an earlier one", [
                      (d["difference"], f"{d['b']} below {d['a']} by {d['difference']:.3f} "
                                        f"[{d['low']:.3f}, {d['high']:.3f}]") for d in drops]),
                  "- " + (("The one layer pair differs beyond its interval." if differ else
                           "The one layer pair is indistinguishable.") if len(pairs) == 1 else
                          f"None of the {len(pairs)} layer pairs differs beyond its interval." if not differ else
                          f"All {len(pairs)} layer pairs differ beyond their intervals." if differ == len(pairs) else
                          f"Of {len(pairs)} layer pairs, {differ} {'differs' if differ == 1 else 'differ'} beyond "
                          "the interval; the rest are indistinguishable."), ""]

    if results.get("families"):
        lines += families_markdown(results["families"], families_plot, run.get("model", {}).get("hidden_size"))

    lines += ["## Per layer", "", "| layer | probe bal. acc. | probe AUROC | AUROC / model's | logit lens bal. acc. "
              "| logit lens AUROC | natural-ratio AUROC |", "|---|---|---|---|---|---|---|"]
    for r in layers:
        frac = r.get("auroc_fraction_of_model", {}).get("eval")
        lens = r.get("logit_lens", {}).get("eval", {})
        nat = r.get("sets", {}).get("eval_natural", {})
        lines.append(
            f"| {r['layer']} | {_with_ci(r, 'balanced_accuracy')} | {_with_ci(r, 'auroc')} | "
            + _fraction(frac) + " | "
            + (f"{_with_ci(lens, 'balanced_accuracy')} | {_with_ci(lens, 'auroc')}" if lens else "n/a | n/a")
            + f" | {_with_ci(nat, 'auroc')} |")
    for name in ("model", "token_stats", "majority"):
        entry = baselines.get(name, {}).get("sets", {})
        if entry.get("eval"):
            lines.append(f"| {BASELINE_LABELS[name]} | {_with_ci(entry['eval'], 'balanced_accuracy')} | "
                         f"{_with_ci(entry['eval'], 'auroc')} | | | | {_with_ci(entry.get('eval_natural', {}), 'auroc')} |")
    lines.append("")
    return "\n".join(lines)


def _next_layer(layer: int, by_layer: dict[int, Any]) -> int | None:
    later = [other for other in by_layer if other > layer]
    return min(later) if later else None


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Writes report.md and plot.png into one run folder, from its results.json (and families.png when
    it has a "families" block)."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    plot([(run_dir, results)], run_dir / PLOT)
    if results.get("families"):
        plot_families(results, run_dir / FAMILIES_PLOT)
    atomic_write_bytes(run_dir / REPORT, _with_ablation(render_markdown(results), run_dir, run_dir).encode("utf-8"))
    return run_dir / REPORT, run_dir / PLOT


def _with_ablation(markdown: str, run_dir: Path, out: Path) -> str:
    """The report with the run's causal check (`tokenprobe ablate`), when it has one; its plot drawn into `out`."""
    from tokenprobe.report.ablation import ABLATION_PLOT, ablation_markdown, load_ablation, plot_ablation

    data = load_ablation(run_dir)
    if data is None:
        return markdown
    plot_ablation(data, Path(out) / ABLATION_PLOT)
    return markdown.rstrip("\n") + "\n\n" + "\n".join(ablation_markdown(data)) + "\n"


def build_report(run_dirs: list[Path], out: Path | None = None) -> tuple[Path, Path]:
    """One run: rebuilds its report (into `out`, default the run folder). Several: one combined report
    and plot in `out` (default ./tokenprobe-report), with a section per run; each run with probe families
    gets its own families-<n>.png (n: its place among the runs).

    A scan folder (scan.json, no results.json) is reported on its own: its scan.csv, scan-heatmap.png and
    report.md are rebuilt (into `out`, default the folder), and (report, heatmap) returned."""
    run_dirs = [Path(d) for d in run_dirs]
    scans = [d for d in run_dirs if is_scan(d)]
    if scans and len(run_dirs) > 1:
        raise TokenprobeError(f"{SCAN_ALONE} (scan{'s' if len(scans) > 1 else ''}: "
                              f"{', '.join(str(d) for d in scans)})")
    if scans:
        from tokenprobe.report.scan import write_scan_outputs

        folder = run_dirs[0]
        scan = load_scan(folder)
        out = Path(out) if out else folder
        same = out.resolve() == folder.resolve()
        _, heatmap, report = write_scan_outputs(out, scan, "scan.json" if same else str(folder / "scan.json"))
        return report, heatmap
    runs = [(d, load_results(d)) for d in run_dirs]
    if len(runs) == 1:
        out = Path(out) if out else run_dirs[0]
        out.mkdir(parents=True, exist_ok=True)
        plot(runs, out / PLOT)
        if runs[0][1].get("families"):
            plot_families(runs[0][1], out / FAMILIES_PLOT)
        atomic_write_bytes(out / REPORT, _with_ablation(render_markdown(runs[0][1]), run_dirs[0], out).encode("utf-8"))
        return out / REPORT, out / PLOT
    out = Path(out) if out else Path("tokenprobe-report")
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / PLOT)
    shared, labels = compare_runs(runs)
    parts = [f"# tokenprobe report: {len(runs)} runs" + (f" sharing {shared}" if shared else ""), "",
             "Each section is one run, named by what differs between them.", "",
             f"![probe and baselines per layer]({PLOT})", ""]
    from tokenprobe.report.transfer import transfer_section

    parts += transfer_section(runs, out)  # runs and evals of one model and task: trained-on x evaluated-on
    from tokenprobe.report.depth import depth_section

    parts += depth_section(runs, labels, out)  # models of different depths: relative depth, depth.png
    for i, ((run_dir, results), label) in enumerate(zip(runs, labels), 1):
        # A run with probe families gets its own families plot, numbered by its place in the report.
        families_plot = f"families-{i}.png" if results.get("families") else None
        if families_plot:
            plot_families(results, out / families_plot, title=f"{label}: probe families")
        parts += [f"# {label} (`{run_dir}`)", "",
                  render_markdown(results, plot_name=None, title=False, families_plot=families_plot)]
    atomic_write_bytes(out / REPORT, "\n".join(parts).encode("utf-8"))
    return out / REPORT, out / PLOT
