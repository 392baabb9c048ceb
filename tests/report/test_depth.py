"""Runs of models with different depths in one report (tokenprobe.report.depth): the table per run (best
layer, intervals, the model's own AUROC, the fraction recovered, where the plateau starts in relative
depth) and depth.png; a report of runs of one model gains nothing. results.json is faked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenprobe.report.depth import DEPTH_PLOT, depth_row, plateau_layer
from tokenprobe.report.markdown import build_report

PNG = b"\x89PNG\r\n\x1a\n"


def _layer(layer: int, bal: float, auroc: float, model_auroc: float | None) -> dict:
    entry = {"layer": layer, "balanced_accuracy": bal, "balanced_accuracy_low": bal - 0.02,
             "balanced_accuracy_high": bal + 0.02, "auroc": auroc, "auroc_low": auroc - 0.01,
             "auroc_high": auroc + 0.01, "sets": {"eval_natural": {"auroc": auroc}}}
    if model_auroc:
        entry["auroc_fraction_of_model"] = {"eval": {"value": auroc / model_auroc, "low": auroc / model_auroc - 0.02,
                                                     "high": auroc / model_auroc + 0.02}}
    return entry


def _results(model: str, num_layers: int, scores: dict[int, tuple[float, float]], best: int, ties: list[int],
             model_auroc: float | None = 0.95, seed: int = 0) -> dict:
    baselines = ({"model": {"sets": {"eval": {"balanced_accuracy": 0.88, "auroc": model_auroc,
                                               "auroc_low": model_auroc - 0.01, "auroc_high": model_auroc + 0.01}}}}
                 if model_auroc else {})
    return {
        "run": {"sweep_name": f"sweep-{model}", "dtype": "float32",
                "model": {"name": model, "num_layers": num_layers, "hidden_size": 64},
                "config": {"task": "next", "target": " the", "context_length": 32, "seed": seed},
                "corpus": {"name": "corpus.txt"}, "target": {"text": " the", "token_ids": [1]},
                "layers": sorted(scores),
                "positions": {"train": {"positions": 600}, "eval": {"positions": 300, "chunks": 20},
                              "eval_natural": {"positions": 900}}},
        "layers": [_layer(layer, bal, auroc, model_auroc) for layer, (bal, auroc) in sorted(scores.items())],
        "baselines": baselines,
        "comparisons": {"resamples": 200,
                        "balanced_accuracy": {"best_layer": best, "indistinguishable_from_best": ties, "pairs": []},
                        "auroc": {"best_layer": best, "indistinguishable_from_best": ties, "pairs": []}},
    }


SMALL = dict(model="small-18", num_layers=18,
             scores={0: (0.60, 0.65), 6: (0.80, 0.85), 9: (0.84, 0.90), 12: (0.85, 0.91), 18: (0.83, 0.89)},
             best=12, ties=[9, 18])
LARGE = dict(model="large-24", num_layers=24,
             scores={0: (0.62, 0.66), 6: (0.78, 0.84), 12: (0.86, 0.92), 18: (0.88, 0.93), 24: (0.87, 0.93)},
             best=18, ties=[24], model_auroc=0.96)


def _run(tmp_path: Path, name: str, results: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_plateau_and_row_figures():
    small, large = _results(**SMALL), _results(**LARGE)
    assert plateau_layer(small) == 9 and plateau_layer(large) == 18
    row = depth_row(small)
    assert row["best_layer"] == 12 and row["best_depth"] == pytest.approx(12 / 18)
    assert row["plateau_depth"] == pytest.approx(0.5) and row["model"]["auroc"] == 0.95
    assert row["fraction"]["value"] == pytest.approx(0.91 / 0.95)
    assert depth_row(large)["plateau_depth"] == pytest.approx(0.75)
    # A best layer that is also the first of its plateau; no intervals: the best layer.
    assert plateau_layer(_results(**{**SMALL, "ties": [18]})) == 12
    assert plateau_layer(_results(**{**SMALL, "ties": []})) == 12


def test_report_of_two_depths_has_the_table_and_depth_plot(tmp_path):
    a = _run(tmp_path, "a", _results(**SMALL))
    b = _run(tmp_path, "b", _results(**{**LARGE, "model_auroc": None}))  # no baselines: no ceiling
    report, _ = build_report([a, b], tmp_path / "out")
    text = report.read_text()
    assert (tmp_path / "out" / DEPTH_PLOT).read_bytes()[:8] == PNG
    assert "## Across model depths" in text and f"![probe per relative depth]({DEPTH_PLOT})" in text
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| model ")}
    assert rows["model small-18"] == ["model small-18", "18", "12 (0.67)", "0.850 [0.830, 0.870]",
                                      "0.910 [0.900, 0.920]", "0.950 [0.940, 0.960]", "95.8% [93.8, 97.8]", "9 (0.50)"]
    assert rows["model large-24"] == ["model large-24", "24", "18 (0.75)", "0.880 [0.860, 0.900]",
                                      "0.930 [0.920, 0.940]", "n/a", "n/a", "18 (0.75)"]
    # The per-run sections follow, as before.
    assert text.index("## Across model depths") < text.index("# model small-18")


def test_no_intervals_footnote(tmp_path):
    small = _results(**{**SMALL, "ties": []})
    small["comparisons"]["resamples"] = 0
    a, b = _run(tmp_path, "a", small), _run(tmp_path, "b", _results(**LARGE))
    text = build_report([a, b], tmp_path / "out")[0].read_text()
    assert "| 12 (0.67) ¹ |" in text and "¹ no intervals (--bootstrap 0)" in text


def test_runs_of_one_model_get_nothing_added(tmp_path):
    a = _run(tmp_path, "a", _results(**SMALL))
    b = _run(tmp_path, "b", _results(**SMALL, seed=1))
    text = build_report([a, b], tmp_path / "out")[0].read_text()
    assert "Across model depths" not in text and not (tmp_path / "out" / DEPTH_PLOT).exists()
    assert "# seed 0" in text and "# seed 1" in text
