"""Probe families side by side (issue 14): the terminal table, report.md's section, families.png and
families.csv, drawn from results.json's "families" block (`FamilyEvaluation.to_dict()`).

The block is hand-made, on top of a tiny real run's results.json, so every figure, interval and verdict
below is known in advance; a run without the block must render as it did before."""

from __future__ import annotations

import copy
import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from tokenprobe import RunConfig, train
from tokenprobe.report import families as fam
from tokenprobe.report.families import FAMILIES_CSV, FAMILIES_PLOT, families_markdown, format_families_table
from tokenprobe.report.markdown import build_report, render_markdown, write_report
from tokenprobe.report.results import write_results

NAN = float("nan")
FAMILIES = ("linear", "mlp", "mean-diff", "sparse")
# layer -> family -> (task balanced accuracy, control balanced accuracy). The intervals are +-0.02 around
# each figure, +-0.015 around each difference from linear, +-0.025 around each selectivity: so mlp is
# above linear beyond the intervals at layers 1 and 2, mean-diff below it at every layer, sparse within.
FIGURES = {
    0: {"linear": (0.700, 0.640), "mlp": (0.705, 0.690), "mean-diff": (0.650, 0.560), "sparse": (0.690, 0.600)},
    1: {"linear": (0.800, 0.560), "mlp": (0.840, 0.560), "mean-diff": (0.760, 0.540), "sparse": (0.795, 0.550)},
    2: {"linear": (0.820, 0.570), "mlp": (0.850, 0.640), "mean-diff": (0.790, 0.540), "sparse": (0.815, 0.560)},
}


def _flat(value: float, intervals: bool, n: int = 300) -> dict:
    auroc = value + 0.07
    out = {"n": n, "positives": n // 2, "negatives": n // 2, "balanced_accuracy": value, "accuracy": value,
           "auroc": auroc, "tp": 120, "fp": 30, "tn": 120, "fn": 30, "threshold": 0.5}
    for metric, v in (("balanced_accuracy", value), ("accuracy", value), ("auroc", auroc)):
        out[f"{metric}_low"], out[f"{metric}_high"] = (v - 0.02, v + 0.02) if intervals else (NAN, NAN)
    return out


def _paired(difference: float, half: float, intervals: bool) -> dict:
    low, high = (difference - half, difference + half) if intervals else (NAN, NAN)
    return {"difference": difference, "low": low, "high": high, "significant": bool(low > 0 or high < 0)}


def families_block(intervals: bool = True, control: bool = True, mdl: bool = True,
                   families: tuple[str, ...] = FAMILIES, figures: dict | None = None) -> dict:
    """A `FamilyEvaluation.to_dict()` as the analysis writes it (NaN where there is no interval)."""
    figures = figures or FIGURES
    rows = []
    for layer, by_family in figures.items():
        for family in families:
            task, ctrl = by_family[family]
            row = {"family": family, "layer": layer, "probe_file": f"probes/{family}/layer{layer:02d}.safetensors",
                   **_flat(task, intervals),
                   "sets": {"eval": _flat(task, intervals), "eval_natural": _flat(task - 0.01, intervals),
                            "train": _flat(task + 0.05, intervals)},
                   "fit": ({"l2": 0.1} if family == "linear" else {"width": 256, "epochs": 12} if family == "mlp"
                           else {"l1": 0.01, "kept": 10 + layer, "kept_dims": [3, 1, 2]} if family == "sparse"
                           else {})}
            if control:
                row["control"] = _flat(ctrl, intervals)
                row["selectivity"] = {"balanced_accuracy": _paired(task - ctrl, 0.025, intervals),
                                      "auroc": _paired(task - ctrl, 0.03, intervals)}
            if family != families[0]:
                diff = task - by_family[families[0]][0]
                row["minus_primary"] = {"balanced_accuracy": _paired(diff, 0.015, intervals),
                                        "auroc": _paired(diff, 0.015, intervals)}
            if mdl:
                row["mdl"] = {"codelength_bits": 600 / (1.5 * (task + 0.2)), "uniform_bits": 600.0,
                              "compression": 1.5 * (task + 0.2), "block_bits": [1.0, 2.0], "rows": 600}
            rows.append(row)
    return {"primary": families[0], "families": list(families),
            "control_task": {"rate": 0.5, "seed": 0, "labels": "per current-token type, uniform draw < rate"}
            if control else None, "set": "eval", "layers": rows}


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, corpus_file, tmp_path_factory):
    """Two tiny gpt2 runs (one family, no control: no "families" block), with and without intervals."""
    root, cache = tmp_path_factory.mktemp("families-runs"), tmp_path_factory.mktemp("families-cache")
    base = dict(model=str(tiny_model_dirs["gpt2"]), corpus=str(corpus_file), layers="0,1,2", context_length=32,
                train_positions=600, eval_positions=300, dtype="float32", device="cpu", bootstrap=200,
                control=False)
    return {name: train(RunConfig(**{**base, **change}), out_dir=root / name, cache_dir=cache, progress=False)
            for name, change in {"boot": {}, "noboot": {"bootstrap": 0}}.items()}


def _results(run) -> dict:
    return json.loads((run.out_dir / "results.json").read_text())


def _with_families(run, block: dict) -> dict:
    results = _results(run)
    assert "families" not in results  # one family, no control, no MDL: no block, as before issue 14
    results["families"] = block
    return results


def _copy_run(run, tmp_path: Path, block: dict | None, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run.out_dir, target)
    if block is not None:
        results = _results(run)
        results["families"] = json.loads(json.dumps(block).replace("NaN", "null"))  # as write_json stores it
        (target / "results.json").write_text(json.dumps(results))
    for stale in ("report.md", "plot.png"):
        (target / stale).unlink()
    return target


def _section(text: str) -> str:
    start = text.index("## Probe families and the control task")
    return text[start:text.index("\n## ", start + 1) + 1]


# ------------------------------------------------------------------------------------------- 1. table


def test_table_has_a_row_per_layer_and_family_with_markers():
    table = format_families_table(families_block())
    lines = table.splitlines()
    head, rule, rows, legend = lines[0], lines[1], lines[2:-1], lines[-1]
    assert set(rule) == {"-"} and len(rule) == len(head)
    assert len(rows) == 12 and len(lines) == 15
    for column in ("layer", "family", "bal.acc", "95% CI", "AUROC", "control", "select.", "MDL", "vs linear"):
        assert column in head, column
    assert head.count("95% CI") == 2
    order = [(int(r.split()[0]), r.split()[1]) for r in rows]
    assert order == [(layer, f) for layer in (0, 1, 2) for f in FAMILIES]  # by layer, then family
    row = next(r for r in rows if r.split()[:2] == ["1", "mlp"])
    assert row.split() == ["1", "mlp", "0.840", "[0.820,0.860]", "0.910", "0.560", "+0.280", "[+0.255,+0.305]",
                           "1.56", "+0.040", ">"]
    marks = {(int(r.split()[0]), r.split()[1]): r.split()[-1] for r in rows}
    for (layer, family), last in marks.items():
        expected = (">" if family == "mlp" and layer in (1, 2) else "<" if family == "mean-diff" else None)
        if expected:
            assert last == expected, (layer, family, last)
        else:
            assert last not in (">", "<"), (layer, family, last)
    linear = [r for r in rows if r.split()[1] == "linear"]
    assert all(len(r) < len(head) - 5 for r in linear)  # no difference column for the primary family itself
    # Aligned: each column's figures end where its header does.
    for column, sample in (("bal.acc", "0.840"), ("AUROC", "0.910"), ("select.", "+0.280")):
        assert head.index(column) + len(column) == row.index(sample) + len(sample), column
    assert "Hewitt & Liang 2019" in legend and "Voita & Titov 2020" in legend and "> / <" in legend


def test_table_without_intervals_has_no_interval_columns_or_markers():
    table = format_families_table(families_block(intervals=False))
    assert "95% CI" not in table and "[" not in table and "nan" not in table.lower()
    assert "no intervals (--bootstrap 0)" in table.splitlines()[-1]
    rows = table.splitlines()[2:-1]
    assert not any(r.rstrip().endswith((">", "<")) for r in rows)
    assert next(r for r in rows if r.split()[:2] == ["1", "mlp"]).split() == [
        "1", "mlp", "0.840", "0.910", "0.560", "+0.280", "1.56", "+0.040"]


def test_table_leaves_out_what_the_run_did_not_measure():
    head = format_families_table(families_block(control=False, mdl=False, families=("linear", "mlp"))).split("\n")[0]
    assert "control" not in head and "select." not in head and "MDL" not in head and "vs linear" in head
    head = format_families_table(families_block(mdl=False, families=("linear",))).split("\n")[0]
    assert "select." in head and "vs linear" not in head and "MDL" not in head


# ------------------------------------------------------------------------------------------ 2. words


def test_report_says_beyond_or_within_the_intervals(runs):
    text = render_markdown(_with_families(runs["boot"], families_block()))
    section = _section(text)
    assert section.index("| layer | family | bal. acc. | AUROC | control bal. acc. | selectivity | MDL compression |")
    assert "| 1 | mlp | 0.840 [0.820, 0.860] |" in section
    assert "mlp vs linear +0.040 [0.025, 0.055]: beyond the intervals," in section
    assert "mlp vs linear +0.005 [-0.010, 0.020]: within the intervals" in section
    assert "sparse vs linear -0.005 [-0.020, 0.010]: within the intervals" in section
    assert "mean-diff vs linear -0.050 [-0.065, -0.035]: beyond the intervals, below linear" in section
    assert re.search(r"^- Layer 1:$\n  - mlp vs linear", section, re.M)
    # Summary: counts per family and where selectivity is highest; sparse's kept dimensions.
    assert "mlp beats linear beyond the intervals at 2 of 3 layers (layers 1, 2) and falls below it at none" in section
    assert ("mean-diff beats linear beyond the intervals at none of 3 layers and falls below it at 3 "
            "(layers 0\u20132)") in section
    assert "The highest selectivity is mlp's at layer 1, +0.280 [0.255, 0.305]" in section
    assert "linear's highest is at layer 2, +0.250 [0.225, 0.275]" in section
    hidden = _results(runs["boot"])["run"]["model"]["hidden_size"]
    assert f"At its best layer (2, balanced accuracy 0.815 [0.795, 0.835]) the sparse probe keeps 12 of {hidden} " \
           "dimensions." in section
    assert "(Hewitt & Liang 2019" in section and "(Voita & Titov 2020)" in section
    assert "nan" not in section.lower() and "n/a" not in section


def _mlp_selectivity(mlp_control_at_1: float) -> dict:
    """The block with mlp's control accuracy at layer 1 set, its gain over linear there unchanged (+0.040)."""
    figures = copy.deepcopy(FIGURES)
    figures[1]["mlp"] = (0.840, mlp_control_at_1)
    return families_block(figures=figures, families=("linear", "mlp"), mdl=False)


@pytest.mark.parametrize(("control", "verdict", "overlap"), [
    (0.500, "and it survives selectivity", "do not overlap"),  # selectivity 0.340 against linear's 0.240
    (0.700, "but it does not survive selectivity", "do not overlap"),  # 0.140 against 0.240
    (0.570, "but it does not clearly survive selectivity", "overlap"),  # 0.270 against 0.240
])
def test_a_gain_survives_selectivity_or_not(runs, control, verdict, overlap):
    section = _section(render_markdown(_with_families(runs["boot"], _mlp_selectivity(control))))
    line = next(x for x in section.splitlines() if x.startswith("- Layer 1:"))
    sel = 0.840 - control
    assert line == (f"- Layer 1: mlp vs linear +0.040 [0.025, 0.055]: beyond the intervals, {verdict} "
                    f"(selectivity +{sel:.3f} [{sel - 0.025:.3f}, {sel + 0.025:.3f}] vs linear's +0.240 "
                    f"[0.215, 0.265]: the intervals {overlap}).")
    kept = "1 of those (layer 1)" if control == 0.500 else "none of those"
    assert f"and its gain survives selectivity at {kept}" in section


def test_a_paired_selectivity_difference_is_used_when_present(runs):
    block = _mlp_selectivity(0.570)  # the intervals overlap, but the paired difference is clear
    row = next(r for r in block["layers"] if r["family"] == "mlp" and r["layer"] == 1)
    row[fam.SELECTIVITY_MINUS_PRIMARY] = {"balanced_accuracy": _paired(0.030, 0.012, True)}
    line = next(x for x in _section(render_markdown(_with_families(runs["boot"], block))).splitlines()
                if x.startswith("- Layer 1:"))
    assert line == ("- Layer 1: mlp vs linear +0.040 [0.025, 0.055]: beyond the intervals, and it survives "
                    "selectivity (selectivity mlp minus linear +0.030 [0.018, 0.042]).")


def test_without_intervals_no_interval_words(runs):
    text = render_markdown(_with_families(runs["noboot"], families_block(intervals=False)))
    section = _section(text)
    figures = section.replace(f"![probe families per layer]({FAMILIES_PLOT})", "")
    assert "95%" not in text and "[" not in figures and "nan" not in text.lower() and "n/a" not in section
    assert "beyond the intervals" not in section and "within the intervals" not in section
    assert "- Layer 1:\n  - mlp vs linear +0.040; selectivity +0.280 vs linear's +0.240." in section
    assert "mlp is above linear at 3 of 3 layers (points only, no intervals)" in section
    assert "no intervals (run with --bootstrap 0)" in section


def test_one_family_with_a_control_task_speaks_of_selectivity_alone(runs):
    section = _section(render_markdown(_with_families(runs["boot"], families_block(families=("linear",), mdl=False))))
    assert "vs linear" not in section and "MDL" not in section and "Family: linear;" in section
    assert "- Layer 0: linear's selectivity +0.060 [0.035, 0.085]: above 0 beyond the interval." in section


# ------------------------------------------------------------------------------------ 3. files, plot


def test_families_plot_written_and_referenced(runs, tmp_path):
    run_dir = _copy_run(runs["boot"], tmp_path, families_block())
    report, _ = write_report(run_dir)
    assert (run_dir / FAMILIES_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![probe families per layer]({FAMILIES_PLOT})" in report.read_text()
    # Several runs: each run with families gets its own numbered plot, referenced in its own section.
    plain = _copy_run(runs["noboot"], tmp_path, None, "plain")
    combined, _ = build_report([plain, run_dir], tmp_path / "both")
    text = combined.read_text()
    assert (tmp_path / "both" / "families-2.png").is_file() and not (tmp_path / "both" / "families-1.png").exists()
    assert text.count("![probe families per layer]") == 1 and "(families-2.png)" in text


def test_families_plot_panels(monkeypatch, tmp_path):
    import matplotlib.figure

    seen = {}

    def savefig(fig, path, **kwargs):
        seen["axes"] = [ax.get_title() for ax in fig.axes]
        seen["legend"] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        seen["lines"] = [[(line.get_linestyle(), line.get_color()) for line in ax.get_lines()] for ax in fig.axes]
        png = b"\x89PNG\r\n\x1a\n"
        path.write(png) if hasattr(path, "write") else Path(path).write_bytes(png)  # a buffer or a file

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    results = {"run": {"model": {"name": "m"}, "corpus": {"name": "c"}, "config": {}}, "layers": []}
    fam.plot_families({**results, "families": families_block()}, tmp_path / "f.png")
    assert len(seen["axes"]) == 3
    assert "balanced accuracy" in seen["axes"][0] and "selectivity" in seen["axes"][1] and "MDL" not in seen["axes"][0]
    assert "compression" in seen["axes"][2] and all("95%" in t for t in seen["axes"][:2])
    assert seen["legend"][0] == [x for f in FAMILIES for x in (f, f"{f}, control task")]
    task, control = seen["lines"][0][0], seen["lines"][0][1]
    assert task[0] == "-" and control[0] == "--" and task[1] == control[1]  # dashed, the same colour
    assert ("-", "0.45") in seen["lines"][1]  # the zero line
    fam.plot_families({**results, "families": families_block(mdl=False, intervals=False)}, tmp_path / "f.png")
    assert len(seen["axes"]) == 2 and all("no intervals" in t and "95%" not in t for t in seen["axes"])
    fam.plot_families({**results, "families": families_block(control=False, mdl=False)}, tmp_path / "f.png")
    assert len(seen["axes"]) == 1 and seen["legend"][0] == list(FAMILIES)


def test_families_csv_rows(runs, tmp_path):
    run = runs["boot"]
    write_results(tmp_path, {"model": "m"}, run.layers, run.baselines,
                  {"comparisons": {}, "families": families_block(intervals=False)})
    rows = list(csv.DictReader((tmp_path / FAMILIES_CSV).open()))
    assert [(r["layer"], r["family"]) for r in rows] == [(str(layer), f) for layer in (0, 1, 2) for f in FAMILIES]
    mlp = next(r for r in rows if r["layer"] == "1" and r["family"] == "mlp")
    assert float(mlp["balanced_accuracy"]) == 0.84 and mlp["balanced_accuracy_low"] == ""  # NaN as empty
    assert float(mlp["control_balanced_accuracy"]) == 0.56
    assert math.isclose(float(mlp["selectivity_balanced_accuracy"]), 0.28)
    assert math.isclose(float(mlp["minus_primary_balanced_accuracy"]), 0.04)
    assert mlp["minus_primary_balanced_accuracy_significant"] == "False"
    assert math.isclose(float(mlp["mdl_compression"]), 1.56) and mlp["fit_width"] == "256" and mlp["primary"] == "False"
    linear = next(r for r in rows if r["layer"] == "1" and r["family"] == "linear")
    assert linear["minus_primary_balanced_accuracy"] == "" and linear["primary"] == "True"
    assert next(r for r in rows if r["family"] == "sparse" and r["layer"] == "2")["fit_kept"] == "12"
    assert "fit_kept_dims" not in rows[0]  # lists stay in results.json
    assert all("nan" not in v.lower() for r in rows for v in r.values())
    assert json.loads((tmp_path / "results.json").read_text())["families"]["primary"] == "linear"
    # Without the block, no families.csv.
    write_results(tmp_path / "plain", {"model": "m"}, run.layers, run.baselines, {"comparisons": {}})
    assert not (tmp_path / "plain" / FAMILIES_CSV).exists()


# ------------------------------------------------------------------------------------ 4. as before


def test_a_run_without_families_renders_as_before(runs, tmp_path):
    for name in ("boot", "noboot"):
        results = _results(runs[name])
        plain = render_markdown(results)
        assert "Probe families" not in plain and "families.png" not in plain
        # The block only inserts its section: everything else is the same, character for character.
        with_block = render_markdown(_with_families(runs[name], families_block(intervals=name == "boot")))
        section = _section(with_block)
        assert with_block.replace(section, "") == plain
        assert plain == (runs[name].out_dir / "report.md").read_text()
        run_dir = _copy_run(runs[name], tmp_path, None, name)
        write_report(run_dir)
        assert not (run_dir / FAMILIES_PLOT).exists() and not (run_dir / FAMILIES_CSV).exists()
    assert families_markdown({"layers": []}) == []
