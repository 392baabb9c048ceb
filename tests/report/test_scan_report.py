"""What `tokenprobe scan` leaves for people (scan.csv, scan-heatmap.png, report.md), drawn from scan.json
alone, and `tokenprobe report SCAN_DIR` rebuilding them.

The scan dicts are hand-made, so every figure, order and sentence below is known in advance: each
target's best balanced accuracy comes from a fixed permutation (so the ranking differs from the frequency
order), several targets share their first layer like the best (so the heatmap's tie-break counts), and one
target could not be scanned."""

from __future__ import annotations

import ast
import csv
import io
import json
import re

import pytest

from tokenprobe.cli import main
from tokenprobe.files import write_json
from tokenprobe.report.markdown import build_report, load_scan
from tokenprobe.report.scan import (SCAN_CSV, SCAN_HEATMAP, SCAN_REPORT, plot_scan_heatmap, predictability_order,
                                    scan_csv, scan_markdown, write_scan_outputs)

PNG = b"\x89PNG\r\n\x1a\n"
# Frequency order. ' a, b' (comma, leading space), '\n', '|' and '`x`' test quoting and escaping; '$$' would
# be read as mathtext by matplotlib.
TEXTS = [" the", ",", " of", "\n", " and", " a, b", "|", " to", ".", "$$", "`x`", " in"]
PERMUTATION = [7, 2, 11, 0, 9, 4, 1, 10, 5, 3, 8, 6]  # target i's best balanced accuracy: 0.60 + 0.03 * this
FIRST_LIKE = [3, 1, 3, 0, 1, 3, 5, 1, 0, 2, 5, 3]  # ties at 0, 1, 3 and 5
ERROR = "too rare: 3 positive training positions (at least 10 needed)"


def make_scan(n: int = len(TEXTS), num_layers: int = 6, baselines: bool = True, resamples: int = 1000,
              error: bool = True) -> dict:
    """A scan.json dict with `n` scanned targets over layers 0..num_layers-1 (plus one too-rare target):
    target i's balanced accuracy peaks at its best layer (num_layers - 1 - i % 3) and falls 0.02 a layer
    from it; AUROC is 0.05 above it; the model's AUROC is 0.95 - 0.005 i."""
    intervals = resamples > 0

    def ci(value, half=0.02):
        return [round(value - half, 6), round(value + half, 6)] if intervals else [None, None]

    layers = list(range(num_layers))
    targets = []
    for i in range(n):
        best_layer = num_layers - 1 - i % 3
        first = min(best_layer, FIRST_LIKE[i % len(FIRST_LIKE)])
        peak = 0.60 + 0.03 * PERMUTATION[i % len(PERMUTATION)] - 0.0001 * (i // len(PERMUTATION))
        model_auroc = 0.95 - 0.005 * i
        rows = []
        for layer in layers:
            bal = round(peak - 0.02 * abs(layer - best_layer), 6)
            auroc = round(bal + 0.05, 6)
            fraction = auroc / model_auroc if baselines else None
            rows.append({"layer": layer, "balanced_accuracy": bal, "balanced_accuracy_ci": ci(bal),
                         "auroc": auroc, "auroc_ci": ci(auroc),
                         "auroc_fraction_of_model": fraction,
                         "auroc_fraction_of_model_ci": ci(fraction) if baselines else [None, None],
                         "logit_lens_auroc": round(0.5 + 0.01 * layer, 6) if baselines else None, "l2": 0.1})
        best = rows[best_layer]
        text = TEXTS[i] if i < len(TEXTS) else f" tok{i}"
        targets.append({
            "rank": i + 1, "text": text, "token_id": 500 + i, "token": text.replace(" ", "\u2581"),
            "frequency": round(0.05 / (i + 1), 6),
            "positions": {"train": 1000 - 10 * i, "train_positive": 500 - 5 * i, "eval": 250 - 2 * i,
                          "eval_positive": 125 - i},
            "probe_dir": f"probes/t{500 + i:06d}", "layers": rows,
            "model": {"balanced_accuracy": 0.9, "balanced_accuracy_ci": ci(0.9), "auroc": model_auroc,
                      "auroc_ci": ci(model_auroc)} if baselines else None,
            "token_stats": {"balanced_accuracy": 0.7, "balanced_accuracy_ci": ci(0.7), "auroc": 0.75,
                            "auroc_ci": ci(0.75)} if baselines else None,
            "best_layer": best_layer,
            "first_layer_like_best": first if intervals else best_layer,
            "indistinguishable_from_best": list(range(first, best_layer)) if intervals else [],
            "best": {k: best[k] for k in ("balanced_accuracy", "balanced_accuracy_ci", "auroc", "auroc_ci",
                                          "auroc_fraction_of_model", "auroc_fraction_of_model_ci")},
            "gap_to_model": {"auroc": model_auroc - best["auroc"],
                             "low": model_auroc - best["auroc"] - 0.02 if intervals else None,
                             "high": model_auroc - best["auroc"] + 0.02 if intervals else None}
            if baselines else None,
            "error": None,
        })
    if error:
        targets.append({"rank": n + 1, "text": " zzz", "token_id": 9999, "token": "\u2581zzz", "frequency": 1e-5,
                        "positions": {"train": 0, "train_positive": 0, "eval": 0, "eval_positive": 0},
                        "probe_dir": None, "layers": [], "model": None, "token_stats": None, "best_layer": None,
                        "first_layer_like_best": None, "indistinguishable_from_best": [], "best": None,
                        "gap_to_model": None, "error": ERROR})
    return {
        "kind": "scan",
        "config": {"top": n + (1 if error else 0), "targets_file": None, "scan_target_ids": None, "positives": 500},
        "model": {"name": "gemma-3-270m", "num_layers": num_layers - 1, "hidden_size": 640},
        "task": "next", "question": "will the next token be", "layers": layers, "dtype": "bfloat16",
        "baselines": baselines,
        "intervals": {"level": 0.95, "resamples": resamples, "unit": "held-out chunks"},
        "positions": {"pool": 61234, "train_natural": 10000, "eval_natural": 3000, "chunks": 2000, "tokens": 512000},
        "timings": {"forward": 1.0},
        "targets": targets,
    }


def _scanned(scan):
    return [t for t in scan["targets"] if not t["error"]]


def _by_balanced_accuracy(scan):
    return sorted(_scanned(scan), key=lambda t: -t["best"]["balanced_accuracy"])


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _bullet(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"- {start}"))


def _named_tokens(line: str) -> list[str]:
    """The tokens a sentence names, as the repr in each code span."""
    spans = re.findall(r"(?<!`)(`+)('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\1(?!`)", line)
    return [ast.literal_eval(shown) for _, shown in spans]


# ------------------------------------------------------------------------------------------------ CSV


def test_csv_parses_back_with_every_target_and_layer():
    scan = make_scan()
    rows = list(csv.DictReader(io.StringIO(scan_csv(scan), newline="")))
    assert len(rows) == len(_scanned(scan)) * len(scan["layers"])  # the too-rare target has no rows
    assert list(rows[0]) == ["rank", "text", "token_id", "layer", "balanced_accuracy", "balanced_accuracy_low",
                             "balanced_accuracy_high", "auroc", "auroc_low", "auroc_high", "auroc_fraction_of_model",
                             "auroc_fraction_low", "auroc_fraction_high", "logit_lens_auroc", "model_auroc",
                             "token_stats_auroc", "frequency", "eval_positions"]
    texts = {r["text"] for r in rows}
    assert {" the", " a, b", "\n", "|", "`x`"} <= texts and " zzz" not in texts  # leading space, comma, newline
    the = [r for r in rows if r["text"] == " the"]
    target = scan["targets"][0]
    assert [int(r["layer"]) for r in the] == scan["layers"]
    for r, entry in zip(the, target["layers"]):
        assert float(r["balanced_accuracy"]) == entry["balanced_accuracy"]
        assert [float(r["balanced_accuracy_low"]), float(r["balanced_accuracy_high"])] == entry["balanced_accuracy_ci"]
        assert float(r["auroc_fraction_of_model"]) == pytest.approx(entry["auroc_fraction_of_model"])
        assert float(r["model_auroc"]) == target["model"]["auroc"] and r["eval_positions"] == "250"
        assert r["rank"] == "1" and r["token_id"] == "500"


def test_csv_leaves_null_figures_empty():
    rows = list(csv.DictReader(io.StringIO(scan_csv(make_scan(baselines=False, resamples=0)), newline="")))
    for r in rows:
        for field in ("balanced_accuracy_low", "auroc_high", "auroc_fraction_of_model", "auroc_fraction_low",
                      "logit_lens_auroc", "model_auroc", "token_stats_auroc"):
            assert r[field] == ""
        assert r["balanced_accuracy"] and r["auroc"]


# ------------------------------------------------------------------------------------------ the order


def test_predictability_order_is_first_layer_like_best_then_fraction_of_model():
    scan = make_scan()
    expected = sorted(_scanned(scan), key=lambda t: (t["first_layer_like_best"],
                                                     -t["best"]["auroc_fraction_of_model"]))
    order = predictability_order(scan)
    assert [t["text"] for t in order] == [t["text"] for t in expected]
    assert all(t["error"] is None for t in order)
    firsts = [t["first_layer_like_best"] for t in order]
    assert firsts == sorted(firsts) and len(set(firsts)) < len(firsts)  # the tie-break was needed
    # Without baselines the tie-break is the plain best AUROC.
    plain = make_scan(baselines=False)
    expected = sorted(_scanned(plain), key=lambda t: (t["first_layer_like_best"], -t["best"]["auroc"]))
    assert [t["text"] for t in predictability_order(plain)] == [t["text"] for t in expected]


# -------------------------------------------------------------------------------------------- heatmap


def test_heatmap_is_a_png_whose_rows_follow_the_predictability_order(tmp_path):
    scan = make_scan()
    path = tmp_path / SCAN_HEATMAP
    rows = plot_scan_heatmap(scan, path)
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    assert rows == [t["text"] for t in predictability_order(scan)]


def test_heatmap_draws_labels_marks_and_colour_meaning(tmp_path, monkeypatch):
    """The figure as matplotlib holds it: the row labels in order, one best-layer dot and one outline per
    row at the right cells, the colour bar's meaning and fixed scale, the title."""
    import matplotlib.figure
    from matplotlib.patches import Rectangle

    seen = {}

    def savefig(fig, target, **kwargs):
        heat, bar = fig.axes[0], fig.axes[1]
        seen["labels"] = [t.get_text() for t in heat.get_yticklabels()]
        seen["outlines"] = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in heat.patches if isinstance(p, Rectangle)]
        seen["dots"] = [tuple(zip(*line.get_data())) for line in heat.get_lines()]
        seen["clim"] = heat.images[0].get_clim()
        seen["bar"] = bar.get_ylabel()
        seen["title"] = fig._suptitle.get_text()
        target.write(PNG)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    for baselines in (True, False):
        scan = make_scan(baselines=baselines)
        order = predictability_order(scan)
        plot_scan_heatmap(scan, tmp_path / f"heat-{baselines}.png")
        assert seen["labels"] == [f"{t['text']!r} #{t['rank']}" for t in order]
        assert "'\\n' #4" in seen["labels"]  # a newline token is visible
        assert seen["outlines"] == [(t["first_layer_like_best"], i) for i, t in enumerate(order)]
        assert [(int(x), int(y)) for x, y in seen["dots"][0]] == [(t["best_layer"], i) for i, t in enumerate(order)]
        assert "gemma-3-270m" in seen["title"] and "next token" in seen["title"] and "12 targets" in seen["title"]
        if baselines:
            assert seen["clim"] == (0.8, 1.05) and "fraction of the model's own" in seen["bar"]
            assert "fraction of the model's own" in seen["title"]
        else:
            assert seen["clim"] == (0.5, 1.0) and "fraction" not in seen["bar"] + seen["title"]
        assert "fixed scale" in seen["bar"]


def test_heatmap_of_many_targets_and_of_none(tmp_path):
    many = make_scan(n=100, num_layers=19)
    rows = plot_scan_heatmap(many, tmp_path / "many.png")
    assert len(rows) == 100 and (tmp_path / "many.png").read_bytes()[:8] == PNG
    none = make_scan(n=0)
    assert plot_scan_heatmap(none, tmp_path / "none.png") == []
    assert (tmp_path / "none.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------ report.md


def test_ranking_table_follows_balanced_accuracy():
    scan = make_scan()
    text = scan_markdown(scan)
    table = [line for line in _section(text, "Ranking").splitlines() if line.startswith("| ") and
             line[2:3].isdigit()]
    expected = _by_balanced_accuracy(scan)
    assert len(table) == len(expected)
    points = [float(re.split(r" \| ", line)[5].split(" ")[0]) for line in table]
    assert points == sorted(points, reverse=True)
    assert [int(line.split(" | ")[0].strip("| ")) for line in table] == list(range(1, len(expected) + 1))
    first = expected[0]
    best = first["best"]
    assert table[0].startswith(f"| 1 | `{first['text']!r}` | ")
    assert (f"| {first['best_layer']} | {first['first_layer_like_best']} | {best['balanced_accuracy']:.3f} "
            f"[{best['balanced_accuracy_ci'][0]:.3f}, {best['balanced_accuracy_ci'][1]:.3f}] |") in table[0]
    gap = first["gap_to_model"]
    assert f"{gap['auroc']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]" in table[0]
    # A `|` token is escaped so the table keeps its columns, a backtick token gets a longer fence.
    assert any("| ``'`x`'`` |" in line for line in table)
    pipe = next(line for line in table if "'\\|'" in line)
    assert len(re.split(r"(?<!\\)\|", pipe)) == len(re.split(r"(?<!\\)\|", table[0]))
    assert " zzz" not in _section(text, "Ranking")


def test_in_words_names_the_most_and_least_predictable_and_where_the_stands():
    scan = make_scan()
    text = scan_markdown(scan)
    words = _section(text, "In words")
    ranked = _by_balanced_accuracy(scan)
    assert _named_tokens(_bullet(words, "Most predictable")) == [t["text"] for t in ranked[:5]]
    assert _named_tokens(_bullet(words, "Least predictable")) == [t["text"] for t in ranked[::-1][:5]]
    top = ranked[0]
    assert (f"`{top['text']!r}` {top['best']['balanced_accuracy']:.3f} [{top['best']['balanced_accuracy_ci'][0]:.3f}, "
            f"{top['best']['balanced_accuracy_ci'][1]:.3f}] at layer {top['best_layer']}") in words
    order = predictability_order(scan)
    assert _named_tokens(_bullet(words, "Predictable earliest")) == [t["text"] for t in order[:5]]
    assert _named_tokens(_bullet(words, "Predictable latest")) == [t["text"] for t in order[::-1][:5]]
    the = scan["targets"][0]
    place = [t["text"] for t in ranked].index(" the") + 1
    assert place == 5  # permutation value 7 of 0..11: the 5th highest
    assert _bullet(words, "`' the'`") == (
        f"- `' the'` is 5th of 12 by balanced accuracy: best layer {the['best_layer']}, balanced accuracy "
        f"{the['best']['balanced_accuracy']:.3f} [{the['best']['balanced_accuracy_ci'][0]:.3f}, "
        f"{the['best']['balanced_accuracy_ci'][1]:.3f}], predictable from layer {the['first_layer_like_best']}.")
    gaps = [t["gap_to_model"] for t in ranked]
    ahead, behind = sum(g["low"] > 0 for g in gaps), sum(g["high"] < 0 for g in gaps)
    assert (ahead, behind) == (8, 2)  # ' of' and ' to' beat the model; ' and' and '`x`' are within 0.02 of it
    assert (f"the model is ahead beyond the interval for {ahead} of 12 targets, the probe for {behind}, and the two "
            f"are indistinguishable for {12 - ahead - behind}.") in words


def test_intro_failures_and_closing_line():
    scan = make_scan()
    text = scan_markdown(scan)
    assert text.startswith("# tokenprobe scan: gemma-3-270m, next token\n")
    assert '"will the next token be X?" for each of 13 target tokens X' in text
    assert "6 layers (layers 0\u20135; 0 = embedding output)" in text
    assert "12 targets were scanned; 1 could not be" in text
    assert "95% bootstrap intervals over the held-out chunks (1,000 resamples)" in text
    assert f"![targets by layers: AUROC as a fraction of the model]({SCAN_HEATMAP})" in text
    assert f"- `' zzz'` (id 9999, frequency 0.001%): {ERROR}." in _section(text, "Targets that could not be scanned")
    assert text.rstrip().splitlines()[-1].startswith("Every figure per target and layer is in `scan.csv`")
    assert "`scan.json`" in text.rstrip().splitlines()[-1]


def test_report_without_baselines_has_no_model_figures_and_says_why():
    text = scan_markdown(make_scan(baselines=False))
    assert "No baselines: the scan was run without them (--no-baselines)" in text
    header = next(line for line in _section(text, "Ranking").splitlines() if line.startswith("| #"))
    assert header == "| # | token | frequency | best layer | first layer like best | bal. acc. | AUROC |"
    for absent in ("AUROC / model", "gap to model", "token stats", "Against the model's own prediction",
                   "fraction of the model"):
        assert absent not in text
    current = make_scan(baselines=False)
    current["task"], current["question"] = "current", "is this token"
    assert "No baselines: they predict the next token and this scan asks about the current one" in \
        scan_markdown(current)


def test_report_without_intervals_shows_points_only():
    scan = make_scan(resamples=0)
    text = scan_markdown(scan)
    assert "No intervals (run with --bootstrap 0)" in text
    assert not re.search(r"\d \[", _section(text, "Ranking"))  # no interval after any figure
    assert "points only" in _bullet(_section(text, "In words"), "Against the model's own prediction")


def test_few_targets_are_named_once():
    scan = make_scan(n=3, error=False)
    words = _section(scan_markdown(scan), "In words")
    named = _named_tokens(_bullet(words, "Most predictable")) + _named_tokens(_bullet(words, "Least predictable")
                                                                             if "- Least" in words else "")
    assert sorted(named) == sorted(TEXTS[:3])
    one = scan_markdown(make_scan(n=1, error=False))
    assert "- The one target scanned: `' the'`" in one
    assert "No target could be scanned." in scan_markdown(make_scan(n=0))


# --------------------------------------------------------------------------------- files and the CLI


def test_write_scan_outputs_writes_the_three_files(tmp_path):
    scan = make_scan()
    paths = write_scan_outputs(tmp_path, scan)
    assert paths == [tmp_path / SCAN_CSV, tmp_path / SCAN_HEATMAP, tmp_path / SCAN_REPORT]
    assert (tmp_path / SCAN_REPORT).read_text() == scan_markdown(scan)
    with (tmp_path / SCAN_CSV).open(newline="") as f:
        assert any(r["text"] == " the" for r in csv.DictReader(f))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_command_rebuilds_a_scan(tmp_path, capsys):
    scan = make_scan()
    folder = tmp_path / "scan"
    write_json(folder / "scan.json", scan)
    assert main(["report", str(folder)]) == 0
    assert (folder / SCAN_REPORT).read_text() == scan_markdown(json.loads((folder / "scan.json").read_text()))
    assert (folder / SCAN_HEATMAP).read_bytes()[:8] == PNG
    assert len(list(csv.DictReader((folder / SCAN_CSV).open(newline="")))) == 12 * 6
    assert str(folder / SCAN_REPORT) in capsys.readouterr().out
    # Into another folder: the closing line points back to the scan's own scan.json.
    report, heatmap = build_report([folder], tmp_path / "elsewhere")
    assert report == tmp_path / "elsewhere" / SCAN_REPORT and heatmap.read_bytes()[:8] == PNG
    assert f"`{folder / 'scan.json'}`" in report.read_text()


def test_report_refuses_to_mix_a_scan_with_train_runs(tmp_path, capsys):
    scan_dir, train_dir = tmp_path / "scan", tmp_path / "train"
    write_json(scan_dir / "scan.json", make_scan())
    # A train run folder as `tokenprobe report` tells one apart: its results.json.
    write_json(train_dir / "results.json", {"run": {}, "layers": []})
    for order in ([scan_dir, train_dir], [train_dir, scan_dir], [scan_dir, scan_dir]):
        capsys.readouterr()
        assert main(["report", *map(str, order)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            "tokenprobe: error: tokenprobe report draws several runs of `train` together; a scan is reported on "
            "its own: tokenprobe report SCAN_DIR")
        assert str(scan_dir) in err
    assert not (scan_dir / SCAN_REPORT).exists() and not (train_dir / "report.md").exists()


def test_unreadable_scan_json_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "scan.json").write_text('{"kind": "scan", "targets": [')
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read {folder / 'scan.json'}" in err
    (folder / "scan.json").write_text('{"kind": "something else"}')
    with pytest.raises(Exception, match="not a tokenprobe scan"):
        load_scan(folder)
