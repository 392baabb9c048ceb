"""A tiny end-to-end run: results.json (null, never NaN), results.csv, report.md and plot.png, and
`tokenprobe report` rebuilding them for one run and drawing several in one plot."""

from __future__ import annotations

import csv
import json

import pytest

from tokenprobe import RunConfig, train
from tokenprobe.cli import main
from tokenprobe.report.markdown import render_markdown


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"bare {name} in results.json")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dirs, corpus_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    runs = {}
    for task in ("next", "current"):
        config = RunConfig(model=str(tiny_model_dirs["gpt2"]), corpus=str(corpus_file), task=task, layers="0,2",
                           context_length=32, train_positions=600, eval_positions=300, dtype="float32",
                           device="cpu", bootstrap=200)
        runs[task] = train(config, out_dir=root / task, cache_dir=cache, progress=False)
    return runs


def test_run_folder_has_baselines_intervals_report_and_plot(tiny_runs):
    result = tiny_runs["next"]
    out = result.out_dir
    assert {"results.json", "results.csv", "report.md", "plot.png", "run.json", "probes"} <= {p.name for p in out.iterdir()}
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = _strict_json((out / "results.json").read_text())
    assert set(results["baselines"]) == {"model", "token_stats", "majority"}
    # Layers 0 and 2 of 3 were probed: the model's own prediction came from the extra last layer.
    for layer in results["layers"]:
        for metric in ("balanced_accuracy", "auroc"):
            low, high = layer[f"{metric}_low"], layer[f"{metric}_high"]
            assert low <= layer[metric] <= high
            lens = layer["logit_lens"]["eval"]
            assert lens[f"{metric}_low"] <= lens[metric] <= lens[f"{metric}_high"]
        fraction = layer["auroc_fraction_of_model"]["eval"]
        assert fraction["value"] == pytest.approx(layer["auroc"] / results["baselines"]["model"]["sets"]["eval"]["auroc"])
    assert results["baselines"]["majority"]["sets"]["eval"]["balanced_accuracy"] == 0.5
    assert results["comparisons"]["balanced_accuracy"]["best_layer"] in (0, 2)
    # CSV: a row per layer, set and scorer; NaN written as an empty cell.
    rows = list(csv.DictReader((out / "results.csv").open()))
    scorers = {(r["layer"], r["scorer"]) for r in rows}
    assert {("0", "probe"), ("2", "logit_lens"), ("", "model"), ("", "token_stats"), ("", "majority")} <= scorers
    assert all("nan" not in v.lower() for r in rows for v in r.values())
    report = (out / "report.md").read_text()
    assert "## Best layer" in report and "token statistics" in report and "model's own prediction" in report
    assert "Indistinguishable from it" in report


def test_nan_is_written_as_null(tiny_runs, tmp_path):
    results = json.loads((tiny_runs["current"].out_dir / "results.json").read_text())
    # A one-class set gives a NaN AUROC; force one and write it the way tokenprobe writes results.json.
    results["layers"][0]["sets"]["train"]["auroc"] = float("nan")
    from tokenprobe.files import write_json
    write_json(tmp_path / "results.json", results)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and '"auroc": null' in text
    assert _strict_json(text)["layers"][0]["sets"]["train"]["auroc"] is None


def test_report_command_rebuilds_one_run_and_combines_several(tiny_runs, tmp_path, capsys):
    one = tiny_runs["next"].out_dir
    (one / "report.md").unlink()
    (one / "plot.png").unlink()
    assert main(["report", str(one)]) == 0
    assert (one / "report.md").exists() and (one / "plot.png").exists()
    combined = tmp_path / "combined"
    assert main(["report", str(one), str(tiny_runs["current"].out_dir), "--out", str(combined)]) == 0
    text = (combined / "report.md").read_text()
    assert "2 runs sharing" in text and "# task next (" in text and "# task current (" in text
    assert (combined / "plot.png").stat().st_size > 10_000


def test_report_words_follow_the_figures(tiny_runs):
    for run in tiny_runs.values():
        results = json.loads((run.out_dir / "results.json").read_text())
        best = results["comparisons"]["balanced_accuracy"]["best_layer"]
        assert f"Layer {best}: balanced accuracy" in render_markdown(results)
    # The current-token task has no baselines (they predict the next token), and the report says why.
    current = json.loads((tiny_runs["current"].out_dir / "results.json").read_text())
    assert not current.get("baselines")
    text = render_markdown(current)
    assert "## Compared with the baselines" not in text and "None: they predict the next token" in text
    # Next-token task: the layers listed as not beating token statistics are exactly those whose paired
    # interval of the difference does not lie above zero.
    results = json.loads((tiny_runs["next"].out_dir / "results.json").read_text())
    per_layer = results["comparisons"]["balanced_accuracy"]["layer_minus_baselines"]
    not_above = sorted(int(k) for k, v in per_layer.items()
                       if not (v["token_stats"]["significant"] and v["token_stats"]["difference"] > 0))
    line = next(x for x in render_markdown(results).splitlines() if "does NOT beat token statistics" in x)
    listed = line.split(":", 1)[1].strip(" .")
    assert listed == ("none" if not not_above else f"layer {not_above[0]}" if len(not_above) == 1
                      else "layers " + ", ".join(map(str, not_above)))
