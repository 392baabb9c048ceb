"""`tokenprobe eval`: a run's saved probes on another corpus, nothing refitted. On the training corpus the
figures are the run's own, exactly; on another they differ and the report puts both side by side; a
model other than the probes' is refused; every family is evaluated; bad input fails before the model loads."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprobe import RunConfig, train
from tokenprobe.errors import TokenprobeError
from tokenprobe.pipelines import evaluate as evaluate_module
from tokenprobe.pipelines.evaluate import evaluate_run
from tokenprobe.report.transfer import Z95
from cli_helpers import assert_nothing_written, error_line, run_cli
from tiny_models import synthetic_text

FAMILIES = ["linear", "mean-diff"]
HELD_OUT = ("eval", "eval_natural")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source_run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-source") / "run"
    config = RunConfig(model=str(tiny_model_dirs["llama"]), corpus=str(corpus_file), layers="all",
                       context_length=32, dtype="float32", device="cpu", batch_size=8, max_tokens=20_000,
                       train_positions=600, eval_positions=300, max_iter=50, probe=",".join(FAMILIES), bootstrap=200)
    train(config, out_dir=out, cache_dir=session_cache, progress=False)
    return out


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other-corpus") / "other.txt"
    path.write_text(synthetic_text(3000, seed=99), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def same_eval(source_run, corpus_file, session_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-same") / "eval"
    evaluate_run(source_run, str(corpus_file), out_dir=out, cache_dir=session_cache, progress=False)
    return out


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_eval_on_the_training_corpus_is_the_run_itself(source_run, same_eval):
    run, ev = _results(source_run), _results(same_eval)
    assert [r["layer"] for r in ev["layers"]] == [r["layer"] for r in run["layers"]] == [0, 1, 2, 3]
    for a, b in zip(run["layers"], ev["layers"]):
        assert set(b["sets"]) == set(HELD_OUT)  # no probe was trained here: no "train" figures
        for subset in HELD_OUT:
            assert b["sets"][subset] == a["sets"][subset], (a["layer"], subset)  # metrics and intervals
        assert b["logit_lens"] == a["logit_lens"] and b["auroc_fraction_of_model"] == a["auroc_fraction_of_model"]
        assert b["probe_file"] == str((source_run / a["probe_file"]).resolve())
    assert ev["baselines"] == run["baselines"]
    assert ev["comparisons"] == run["comparisons"]
    run_rows = {(r["family"], r["layer"]): r for r in run["families"]["layers"]}
    for row in ev["families"]["layers"]:
        twin = run_rows[(row["family"], row["layer"])]
        for subset in HELD_OUT:
            assert row["sets"][subset] == twin["sets"][subset]
        assert row.get("minus_primary") == twin.get("minus_primary")
        assert "control" not in row  # nothing is fitted: no control task
    transfer = ev["transfer"]
    assert transfer["same_corpus"] and transfer["source"]["run"] == str(source_run.resolve())
    assert all(r["difference"][m]["difference"] == 0 for r in transfer["layers"] for m in ("balanced_accuracy", "auroc"))
    record = json.loads((same_eval / "run.json").read_text())
    assert record["kind"] == "eval" and record == ev["run"]
    assert record["source"]["sweep_name"] == run["run"]["sweep_name"] == "sweep-ctx32-20k-next-llama"
    assert record["sweep_name"] == f"eval-{run['run']['sweep_name']}-on-corpus.txt"
    assert record["corpus"]["sha256"] == run["run"]["corpus"]["sha256"]
    assert record["config"]["probe"] == "linear,mean-diff" and record["config"]["control"] is False
    assert sorted(p.name for p in same_eval.iterdir()) == ["families.csv", "families.png", "plot.png", "report.md",
                                                           "results.csv", "results.json", "run.json"]


def test_every_family_is_evaluated(source_run, same_eval):
    ev = _results(same_eval)
    assert ev["families"]["families"] == FAMILIES and ev["transfer"]["families"] == FAMILIES
    files = sorted((source_run / "probes").glob("*.safetensors"))
    assert len(files) == len(FAMILIES) * 4
    pairs = {(r["family"], r["layer"]) for r in ev["transfer"]["layers"]}
    assert pairs == {(f, layer) for f in FAMILIES for layer in range(4)}
    assert {Path(r["probe_file"]).resolve() for r in ev["families"]["layers"]} == {f.resolve() for f in files}
    report = (same_eval / "report.md").read_text()
    assert "### linear probes (the primary family)" in report and "### mean-diff probes" in report


def test_eval_on_another_corpus_differs_and_reports_in_and_out(source_run, other_corpus, session_cache, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli(["eval", source_run, "--corpus", other_corpus, "--out", out, "--cache-dir", session_cache,
                    "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluated on other.txt" in proc.stdout and "out - in" in proc.stdout and f"eval written to {out}" in proc.stdout
    run, ev = _results(source_run), _results(out)
    assert ev["run"]["corpus"]["name"] == str(other_corpus) and not ev["transfer"]["same_corpus"]
    assert any(a["sets"]["eval"] != b["sets"]["eval"] for a, b in zip(run["layers"], ev["layers"]))
    for row in ev["transfer"]["layers"]:
        for metric in ("balanced_accuracy", "auroc"):
            inside, outside, d = row["in"], row["out"], row["difference"][metric]
            assert d["difference"] == pytest.approx(outside[metric] - inside[metric])
            se = math.hypot((inside[f"{metric}_high"] - inside[f"{metric}_low"]) / (2 * Z95),
                            (outside[f"{metric}_high"] - outside[f"{metric}_low"]) / (2 * Z95))
            assert (d["low"], d["high"]) == pytest.approx((d["difference"] - Z95 * se, d["difference"] + Z95 * se))
            assert d["significant"] == (d["low"] > 0 or d["high"] < 0)
    primary = {r["layer"]: r for r in run["layers"]}
    for row in (r for r in ev["transfer"]["layers"] if r["family"] == "linear"):
        assert row["in"]["balanced_accuracy"] == primary[row["layer"]]["balanced_accuracy"]
    report = (out / "report.md").read_text()
    assert "## In corpus and out of corpus" in report and "normal approximation" in report
    assert "| layer | bal. acc. in `corpus.txt` | bal. acc. on `other.txt` | difference |" in report
    first = next(r for r in ev["transfer"]["layers"] if r["family"] == "linear")
    d = first["difference"]["balanced_accuracy"]
    assert f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" in report
    best_in = ev["transfer"]["best"]["linear"]["in"]["balanced_accuracy"]
    best_out = ev["transfer"]["best"]["linear"]["out"]["balanced_accuracy"]
    assert best_in == run["comparisons"]["balanced_accuracy"]["best_layer"]
    assert best_out == ev["comparisons"]["balanced_accuracy"]["best_layer"]
    assert f"Best layer by balanced accuracy: in-corpus layer {best_in} (" in report
    assert f"out-of-corpus layer {best_out} (" in report
    assert "training positions" not in report.split("##")[0]  # nothing was trained on this corpus


def test_another_model_is_refused_and_nothing_is_written(source_run, tiny_model_dirs, corpus_file, session_cache,
                                                         tmp_path):
    copy = tmp_path / "copied-run"
    shutil.copytree(source_run, copy)
    record = json.loads((copy / "run.json").read_text())
    record["config"]["model"] = str(tiny_model_dirs["gemma3"])  # the same tokenizer (it adds BOS), other weights
    (copy / "run.json").write_text(json.dumps(record))
    out = tmp_path / "eval"
    line = error_line(run_cli(["eval", copy, "--corpus", corpus_file, "--out", out, "--cache-dir", session_cache,
                               "--quiet"]))
    assert "probe was trained on model llama" in line and "gemma3" in line
    assert_nothing_written(out)


def test_a_missing_corpus_is_a_clean_error(source_run, session_cache, tmp_path):
    out = tmp_path / "eval"
    line = error_line(run_cli(["eval", source_run, "--corpus", tmp_path / "nowhere.txt", "--out", out,
                               "--cache-dir", session_cache, "--quiet"]))
    assert "corpus not found" in line and "nowhere.txt" in line
    assert_nothing_written(out)


@pytest.fixture()
def no_model(monkeypatch):
    """Loading the model fails the test: the errors below must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(evaluate_module, "load_stage", refuse)


def test_bad_input_is_found_before_the_model_loads(no_model, source_run, corpus_file, tmp_path):
    out = tmp_path / "eval"

    def refused(sources, corpus=str(corpus_file), match: str = "") -> None:
        with pytest.raises(TokenprobeError, match=match):
            evaluate_run(sources, corpus, out_dir=out, progress=False)
        assert_nothing_written(out)

    refused(tmp_path / "missing", match="neither a run folder nor a probe file")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", match="not a tokenprobe run folder: no run.json")
    refused(source_run, corpus=str(tmp_path / "nowhere.jsonl"), match="corpus not found")
    twin = tmp_path / "twin"
    shutil.copytree(source_run, twin)
    refused([source_run / "probes" / "layer00.safetensors", twin / "probes" / "layer01.safetensors"],
            match="the probes come from 2 different runs")
    (twin / "run.json").write_text(json.dumps({**json.loads((twin / "run.json").read_text()), "created": "other"}))
    refused(twin, match="does not belong to the run")
    with pytest.raises(TokenprobeError, match="is the run being evaluated"):
        evaluate_run(source_run, str(corpus_file), out_dir=source_run, overwrite=True, progress=False)
    assert (source_run / "results.json").is_file()


def test_an_eval_is_not_evaluated_again(no_model, same_eval, corpus_file, tmp_path):
    with pytest.raises(TokenprobeError, match="is an eval, not a training run"):
        evaluate_run(same_eval, str(corpus_file), out_dir=tmp_path / "again", progress=False)


def test_make_corpora_writes_deduplicated_jsonl(tmp_path):
    out = tmp_path / "corpora"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_corpora.py"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "python-docs.jsonl" in proc.stdout and "documents" in proc.stdout and "characters" in proc.stdout
    docs = [json.loads(line)["text"] for line in (out / "python-docs.jsonl").read_text().splitlines()]
    assert len(docs) > 20 and all(len(d) >= 500 for d in docs)
    assert len({" ".join(d.lower().split()) for d in docs}) == len(docs)
    for name in ("package-readmes.jsonl", "licenses.jsonl"):  # from this environment's packages
        assert (out / name).stat().st_size > 10_000
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_corpora import unique
    finally:
        sys.path.remove(str(REPO / "scripts"))
    words = [f"word{i}" for i in range(300)]
    random.Random(0).shuffle(words)
    text = " ".join(words)
    assert unique([text, "Copyright 2024 someone\n" + text, text.upper(), "short"], min_chars=100) == [text]
