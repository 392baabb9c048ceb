"""The transfer matrix of `tokenprobe report RUN EVAL ...` (rows: trained on, columns: evaluated on, each
cell a folder's best-layer balanced accuracy), and the difference of two independent figures."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest

from tokenprobe import RunConfig, load_model, train
from tokenprobe.cli import main
from tokenprobe.pipelines.evaluate import evaluate_run
from tokenprobe.report.transfer import independent_difference, transfer_matrices
from tiny_models import synthetic_text


@pytest.fixture(scope="module")
def folders(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> dict[str, Path]:
    """Runs on two corpora and evals across three: a/b trained on corpus.txt/other.txt, a-on-other,
    a-on-salad and b-on-corpus evaluated."""
    root = tmp_path_factory.mktemp("transfer")
    other, salad = root / "other.txt", root / "salad.txt"
    other.write_text(synthetic_text(3000, seed=99), encoding="utf-8")
    words = synthetic_text(3000, seed=5).split()
    random.Random(3).shuffle(words)
    salad.write_text(" ".join(words), encoding="utf-8")
    loaded = load_model(str(tiny_model_dirs["gpt2"]), "float32", "cpu", session_cache, progress=False)
    out = {}
    for name, corpus in (("a", corpus_file), ("b", other)):
        config = RunConfig(model=str(tiny_model_dirs["gpt2"]), corpus=str(corpus), layers="0,2", context_length=32,
                           dtype="float32", device="cpu", max_tokens=20_000, train_positions=600,
                           eval_positions=300, max_iter=50, control=False, bootstrap=200)
        out[name] = train(config, out_dir=root / name, loaded=loaded, cache_dir=session_cache, progress=False).out_dir
    for name, run, corpus in (("a-on-other", "a", other), ("a-on-salad", "a", salad), ("b-on-corpus", "b", corpus_file)):
        out[name] = evaluate_run(out[run], str(corpus), out_dir=root / name, loaded=loaded, cache_dir=session_cache,
                                 progress=False).out_dir
    return out


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _best_cell(folder: Path) -> str:
    """The cell a folder should fill: its best layer's balanced accuracy with its interval."""
    results = _results(folder)
    best = results["comparisons"]["balanced_accuracy"]["best_layer"]
    entry = next(r for r in results["layers"] if r["layer"] == best)
    assert entry["balanced_accuracy"] == max(r["balanced_accuracy"] for r in results["layers"])
    return (f"{entry['balanced_accuracy']:.3f} [{entry['balanced_accuracy_low']:.3f}, "
            f"{entry['balanced_accuracy_high']:.3f}] (layer {best})")


def _table(report: str) -> dict[tuple[str, str], str]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| trained on \\ evaluated on |"))
    columns = [c.strip().strip("`") for c in lines[start].strip("|").split("|")[1:]]
    cells = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        row, *values = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(row.strip("`"), column): value for column, value in zip(columns, values)})
    return cells


def test_report_of_a_run_and_its_evals_has_the_transfer_matrix(folders, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(folders["a"]), str(folders["a-on-other"]), str(folders["a-on-salad"]),
                 "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Transfer between corpora" in report and "![transfer matrix](transfer.png)" in report
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = _table(report)
    assert cells == {("corpus.txt", "corpus.txt"): _best_cell(folders["a"]),
                     ("corpus.txt", "other.txt"): _best_cell(folders["a-on-other"]),
                     ("corpus.txt", "salad.txt"): _best_cell(folders["a-on-salad"])}
    # each eval's own section shows its in/out table, and the section order follows the folders given
    assert report.count("## In corpus and out of corpus") == 2


def test_two_runs_and_three_evals_fill_a_matrix_with_a_gap(folders, tmp_path):
    out = tmp_path / "report"
    names = ["a", "b", "a-on-other", "a-on-salad", "b-on-corpus"]
    assert main(["report", *(str(folders[n]) for n in names), "--out", str(out)]) == 0
    cells = _table((out / "report.md").read_text())
    expected = {("corpus.txt", "corpus.txt"): "a", ("corpus.txt", "other.txt"): "a-on-other",
                ("corpus.txt", "salad.txt"): "a-on-salad", ("other.txt", "corpus.txt"): "b-on-corpus",
                ("other.txt", "other.txt"): "b"}
    assert {k: v for k, v in cells.items() if v != "–"} == {k: _best_cell(folders[v]) for k, v in expected.items()}
    assert cells[("other.txt", "salad.txt")] == "–"  # b was never evaluated there


def test_no_matrix_without_an_eval_or_across_models(folders, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(folders["a"]), str(folders["b"]), "--out", str(out)]) == 0
    assert "Transfer between corpora" not in (out / "report.md").read_text()
    assert not (out / "transfer.png").exists()
    runs = [(folders[n], _results(folders[n])) for n in ("a", "a-on-other")]
    assert len(transfer_matrices(runs)) == 1
    moved = copy.deepcopy(runs[1][1])
    moved["run"]["model"]["weights_hash"] = "another model"
    assert transfer_matrices([runs[0], (runs[1][0], moved)]) == []


def test_an_eval_report_rebuilt_keeps_its_in_and_out_table(folders, tmp_path):
    out = tmp_path / "one"
    assert main(["report", str(folders["a-on-other"]), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## In corpus and out of corpus" in text and "normal approximation" in text
    assert text == (folders["a-on-other"] / "report.md").read_text()


def test_the_difference_of_two_independent_figures():
    inside = {"auroc": 0.8, "auroc_low": 0.76, "auroc_high": 0.84}
    outside = {"auroc": 0.7, "auroc_low": 0.66, "auroc_high": 0.74}
    d = independent_difference(inside, outside, "auroc")
    se = math.sqrt(2) * 0.08 / 3.919927969080108
    assert d["difference"] == pytest.approx(-0.1) and d["se"] == pytest.approx(se)
    assert (d["low"], d["high"]) == pytest.approx((-0.1 - 1.959963984540054 * se, -0.1 + 1.959963984540054 * se))
    assert d["significant"] is True
    no_interval = independent_difference({"auroc": 0.8, "auroc_low": None, "auroc_high": None}, outside, "auroc")
    assert no_interval["difference"] == pytest.approx(-0.1) and math.isnan(no_interval["low"])
    assert no_interval["significant"] is False
