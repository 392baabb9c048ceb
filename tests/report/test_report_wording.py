"""The words around the figures (issue 13): what a comparison plot and report.md name as shared and as
different, layer lists in the singular and plural, the AUROC bullets about the table's layer, short
lists of layer differences, and no interval headers without intervals (--bootstrap 0).

The figures themselves are those of results.json, unchanged; these tests only read the words."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from tokenprobe import RunConfig, train
from tokenprobe.report import plot as plot_module
from tokenprobe.report.markdown import build_report, render_markdown
from tokenprobe.report.results import format_table


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, corpus_file, tmp_path_factory):
    """Tiny gpt2 runs that differ in one thing each from `next`: the task, the seed, the intervals."""
    root, cache = tmp_path_factory.mktemp("wording-runs"), tmp_path_factory.mktemp("wording-cache")
    base = dict(model=str(tiny_model_dirs["gpt2"]), corpus=str(corpus_file), layers="0,1,2,3", context_length=32,
                train_positions=600, eval_positions=300, dtype="float32", device="cpu", bootstrap=200,
                control=False)  # the primary table's wording; families are tests/report/test_families_report.py's
    variants = {"next": {}, "current": {"task": "current"}, "seed1": {"seed": 1}, "nobootstrap": {"bootstrap": 0}}
    return {name: train(RunConfig(**{**base, **change}), out_dir=root / name, cache_dir=cache, progress=False)
            for name, change in variants.items()}


def _results(run) -> dict:
    return json.loads((run.out_dir / "results.json").read_text())


def _pairs(*runs) -> list[tuple[Path, dict]]:
    return [(run.out_dir, _results(run)) for run in runs]


def _drawn(monkeypatch, runs, tmp_path) -> tuple[str, list[str], list[str]]:
    """Draws the plot and returns (suptitle, the axes' titles, legend texts) as matplotlib holds them."""
    import matplotlib.figure

    seen = {}

    def savefig(fig, path, **kwargs):
        seen["title"] = fig._suptitle.get_text()
        seen["axes"] = [ax.get_title() for ax in fig.axes]
        seen["legend"] = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
        png = b"\x89PNG\r\n\x1a\n"
        path.write(png) if hasattr(path, "write") else Path(path).write_bytes(png)  # a buffer or a file

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_module.plot(runs, tmp_path / "plot.png")
    return seen["title"], seen["axes"], seen["legend"]


# ------------------------------------------------------------------------------ 1. shared vs different


def test_plot_title_names_what_runs_share_and_legend_what_differs(runs, monkeypatch, tmp_path):
    title, _, legend = _drawn(monkeypatch, _pairs(runs["next"], runs["current"]), tmp_path)
    # The runs differ in the task: the title must not name either task, the legend names each.
    assert "task" not in title and "next" not in title and "current" not in title, title
    assert title.startswith("tokenprobe: model gpt2, target ' the', ") and title.endswith("(2 runs)"), title
    assert "context 32" in title and "corpus corpus.txt" in title
    assert "task next: probe" in legend and "task current: probe" in legend, legend


def test_labels_fall_back_to_config_then_folder_names(runs):
    shared, labels = plot_module.compare_runs(_pairs(runs["next"], runs["seed1"]))
    assert shared == "model gpt2, task next ' the', corpus corpus.txt, context 32"
    assert labels == ["seed 0", "seed 1"]
    # The seed (secondary) is named only when the primary facets are not enough to tell runs apart.
    assert plot_module.compare_runs(_pairs(runs["next"], runs["seed1"], runs["current"]))[1] == [
        "task next, seed 0", "task next, seed 1", "task current, seed 0"]
    assert plot_module.compare_runs(_pairs(runs["next"], runs["nobootstrap"]))[1] == ["bootstrap 200", "bootstrap 0"]
    twins = _pairs(runs["next"], runs["next"])
    assert plot_module.compare_runs(twins)[1] == [str(runs["next"].out_dir)] * 2  # the same folder twice: its path
    assert (plot_module.plot_title(_pairs(runs["next"]))
            == "tokenprobe: model gpt2, task next ' the', corpus corpus.txt, context 32")


def test_combined_report_heading_names_what_runs_share(runs, tmp_path):
    report, _ = build_report([runs["next"].out_dir, runs["current"].out_dir], tmp_path / "cmp")
    lines = report.read_text().splitlines()
    assert lines[0] == "# tokenprobe report: 2 runs sharing model gpt2, target ' the', corpus corpus.txt, context 32"
    assert f"# task next (`{runs['next'].out_dir}`)" in lines
    assert f"# task current (`{runs['current'].out_dir}`)" in lines


# ----------------------------------------------------------------------------- 2. layer lists in words


def _with_layer_lists(results: dict, not_above: list[int], indistinguishable: list[int]) -> dict:
    """results whose per-layer token-statistics tests put exactly `not_above` at or below it."""
    results = copy.deepcopy(results)
    bal = results["comparisons"]["balanced_accuracy"]
    for layer, versus in bal["layer_minus_baselines"].items():
        versus["token_stats"].update(significant=int(layer) not in not_above, difference=0.01)
        versus["logit_lens"].update(significant=int(layer) in not_above, difference=0.01)
    bal["indistinguishable_from_best"] = indistinguishable
    results["comparisons"]["auroc"]["indistinguishable_from_best"] = indistinguishable
    return results


@pytest.mark.parametrize(("layers", "words"), [
    ([], "none"), ([0], "layer 0"), ([3], "layer 3"), ([0, 2], "layers 0, 2"), ([0, 1, 2, 3], "layers 0\u20133")])
def test_layer_lists_say_layer_layers_or_none(runs, layers, words):
    text = render_markdown(_with_layer_lists(_results(runs["next"]), layers, layers))
    line = next(x for x in text.splitlines() if "does NOT beat token statistics" in x)
    assert line.endswith(f": {words}."), line
    line = next(x for x in text.splitlines() if "beats that layer's logit lens" in x)
    assert line.endswith(f": {words}."), line
    assert f"the difference includes 0): {words}." in text
    assert f"indistinguishable from it: {words}." in text
    lists = [x for x in text.splitlines()
             if x.startswith(("Indistinguishable from it", "By AUROC the best", "- Where"))]
    assert len(lists) == 4
    assert not any(re.search(r"layers \d+\.", x) for x in lists), "a single layer in the plural"
    assert not any(re.search(r": \d", x) for x in lists), "a bare layer number after a colon"


def test_counts_agree_with_their_nouns(runs):
    results = _results(runs["next"])
    pairs = results["comparisons"]["balanced_accuracy"]["pairs"]
    results["comparisons"]["balanced_accuracy"]["pairs"] = [dict(pairs[0], significant=True, difference=0.02)]
    results["run"]["positions"]["eval"]["chunks"] = 1
    text = render_markdown(results)
    assert "The one layer pair differs beyond its interval." in text
    assert "from 1 held-out chunk," in text
    results["comparisons"]["balanced_accuracy"]["pairs"] = [dict(p, significant=i == 0) for i, p in enumerate(pairs)]
    assert f"Of {len(pairs)} layer pairs, 1 differs beyond" in render_markdown(results)


# ------------------------------------------------------------------------- 3. AUROC bullets, same layer


def test_auroc_bullets_speak_of_the_tables_layer(runs):
    results = _results(runs["next"])
    comparisons = results["comparisons"]
    best = comparisons["balanced_accuracy"]["best_layer"]
    other = next(r["layer"] for r in results["layers"] if r["layer"] != best)
    comparisons["auroc"]["best_layer"] = other  # the AUROC's best layer is another one
    comparisons["auroc"]["indistinguishable_from_best"] = [best]
    text = render_markdown(results)
    table_layer = re.search(r"\| probe, layer (\d+) \|", text).group(1)
    bullet_layers = set(re.findall(r"^- (?:balanced accuracy|AUROC): the probe at layer (\d+)", text, re.M))
    assert bullet_layers == {table_layer} == {str(best)}, bullet_layers
    for name, d in comparisons["auroc"]["layer_minus_baselines"][str(best)].items():
        assert f"({d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])" in text, name  # its own figures
    assert (f"- By AUROC alone the best layer is {other}; layer {best} (the best by balanced accuracy, compared "
            "above) is indistinguishable from it in AUROC.") in text


# --------------------------------------------------------------------------------- 4. short drop lists


def _many_drops(results: dict, layers: int = 10) -> dict:
    results = copy.deepcopy(results)
    results["comparisons"]["balanced_accuracy"]["pairs"] = [
        {"a": a, "b": b, "metric": "balanced_accuracy", "difference": 0.001 * (a + b + 1), "low": 0.0001,
         "high": 0.1, "significant": True} for a in range(layers) for b in range(a + 1, layers)]
    return results


def test_drops_line_is_a_count_and_the_largest_few(runs, tmp_path):
    text = render_markdown(_many_drops(_results(runs["next"])))
    line = next(x for x in text.splitlines() if x.startswith("- Drops"))
    assert line.startswith("- Drops, a later layer significantly below an earlier one (45; the 5 largest): "), line
    assert line.count(" below ") == 6 and line.endswith("; 40 more in results.json (comparisons)."), line
    assert "9 below 8 by 0.018 [0.000, 0.100]" in line  # the largest first, its figures as they were
    assert len(line) < 400
    assert "All 45 layer pairs differ beyond their intervals." in text
    # In a report over several runs, each run's section says it as briefly.
    for name in ("next", "current"):
        path = runs[name].out_dir / "results.json"
        original = path.read_text()
        try:
            path.write_text(json.dumps(_many_drops(json.loads(original))))
            report, _ = build_report([runs["next"].out_dir, runs["current"].out_dir], tmp_path / name)
        finally:
            path.write_text(original)
        drops = [x for x in report.read_text().splitlines() if x.startswith("- Drops")]
        assert drops and all(len(x) < 400 for x in drops), drops


# ----------------------------------------------------------------------------- 5. without intervals


def test_no_interval_columns_without_intervals(runs, monkeypatch, tmp_path):
    run = runs["nobootstrap"]
    table = run.table()
    assert "95% CI" not in table and "no intervals (--bootstrap 0)" in table
    assert "[" not in table  # no empty interval cells either
    with_intervals = runs["next"].table()
    assert with_intervals.splitlines()[0].count("95% CI") == 2 and "95% CI: bootstrap" in with_intervals
    # The same figures in the same order, with or without the interval columns.
    numbers = re.findall(r"\d\.\d{3}|\b\d+\b", table.split("\n", 2)[2])
    assert numbers == re.findall(r"\d\.\d{3}|\b\d+\b",
                                 format_table(run.layers, run.baselines).split("\n", 2)[2])
    text = (run.out_dir / "report.md").read_text()
    assert "95%" not in text and "nan" not in text.lower() and "n/a, n/a" not in text
    assert "[" not in text.split("## Per layer")[1]
    assert "No intervals (run with --bootstrap 0)." in text
    assert re.search(r"its AUROC is \d+\.\d% of the model's own\.", text)
    _, axes, _ = _drawn(monkeypatch, _pairs(run), tmp_path)
    assert all("no intervals (--bootstrap 0)" in t and "95%" not in t for t in axes), axes
