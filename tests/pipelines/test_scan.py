"""`tokenprobe scan`: one extraction, one probe per target and layer, each target's figures those of a
single-target `train` run on the same positions; the outputs written and readable; clean errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, load_model, load_probes, train
from tokenprobe.pipelines import scan as scan_module
from tokenprobe.pipelines import train as train_module
from tokenprobe.pipelines.scan import ScanOptions, scan
from tokenprobe.vocabulary import EVAL, MODEL, TOKEN_STATS, baseline_key, lens_key, probe_key
from cli_helpers import FAST, assert_nothing_written, error_line, run_cli


def _config(model_dir, corpus, **kw) -> RunConfig:
    base = dict(model=str(model_dir), corpus=str(corpus), layers="all", context_length=32, dtype="float32",
                device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300, max_iter=100,
                bootstrap=200, l2=0.01)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def scanned(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "run"
    config = _config(tiny_model_dirs["qwen2"], corpus_file)
    loaded = load_model(config.model, "float32", "cpu", session_cache, progress=False)
    result = scan(config, ScanOptions(top=6, positives=120), out_dir=out, loaded=loaded, cache_dir=session_cache,
                  progress=False)
    return config, loaded, result, out


def test_each_target_equals_a_single_target_train_run_on_its_positions(scanned, session_cache, monkeypatch):
    config, loaded, result, _ = scanned
    captured = {}
    real_target_run = scan_module.target_run

    # What the scan gave each target: its positions (as a run's Prepared) and its scores.
    def spy(config, loaded, pool, source, target, where, *args, **kw):
        run = real_target_run(config, loaded, pool, source, target, where, *args, **kw)
        captured[target.token_id] = (scan_module.target_view(pool, target, where), run)
        return run

    monkeypatch.setattr(scan_module, "target_run", spy)
    again = scan(config, ScanOptions(top=6, positives=120), loaded=loaded, cache_dir=session_cache, save=False,
                 progress=False)
    assert again.scan["targets"] == result.scan["targets"]  # deterministic
    for entry in result.scan["targets"][:3]:
        view, run = captured[entry["token_id"]]
        # The same positions through `train` itself: its own extraction, fitting and scoring.
        monkeypatch.setattr(train_module, "prepare", lambda *a, **k: view)
        single = train(_config(config.model, config.corpus, target=entry["text"], control=False), loaded=loaded,
                       cache_dir=session_cache, save=False, progress=False)
        for layer, probe in single.probes.items():
            mine = run.probes[layer]
            for name in ("weight", "bias", "mean", "scale"):
                torch.testing.assert_close(getattr(mine, name), getattr(probe, name), atol=2e-5, rtol=1e-4)
        for r in single.layers:
            m = run.scored.evaluation.metrics[probe_key(r.layer)][EVAL]
            assert m.balanced_accuracy == pytest.approx(r.metrics[EVAL].balanced_accuracy, abs=1e-9)
            assert m.auroc == pytest.approx(r.metrics[EVAL].auroc, abs=1e-3)
            assert run.scored.evaluation.intervals(probe_key(r.layer), EVAL)["balanced_accuracy"] == \
                pytest.approx(r.intervals[EVAL]["balanced_accuracy"], abs=1e-9)
            lens = run.scored.evaluation.metrics[lens_key(r.layer)][EVAL]
            assert lens.auroc == pytest.approx(r.logit_lens[EVAL].auroc, abs=1e-6)
        ours = {b: run.scored.evaluation.metrics[baseline_key(b)][EVAL] for b in (MODEL, TOKEN_STATS)}
        theirs = {b.name: b.metrics[EVAL] for b in single.baselines}
        assert ours[TOKEN_STATS].balanced_accuracy == theirs[TOKEN_STATS].balanced_accuracy
        # the model's own AUROC needs no threshold (the scan picks its threshold on fewer training positions)
        assert ours[MODEL].auroc == pytest.approx(theirs[MODEL].auroc, abs=1e-9)
        assert entry["best_layer"] == single.best.layer


def test_the_scan_ran_one_extraction_and_ranks_every_target(scanned):
    config, loaded, result, out = scanned
    record = json.loads((out / "run.json").read_text())
    data = json.loads((out / "scan.json").read_text())
    assert record["kind"] == data["kind"] == "scan"
    assert record["extraction"]["batches"] >= 1 and record["positions"]["pool"] == data["positions"]["pool"]
    assert [t["rank"] for t in data["targets"]] == list(range(1, 7))
    assert data["targets"][0]["text"] == " the"  # the most frequent token of the synthetic corpus
    frequencies = [t["frequency"] for t in data["targets"]]
    assert frequencies == sorted(frequencies, reverse=True)
    for t in data["targets"]:
        assert [row["layer"] for row in t["layers"]] == data["layers"] == [0, 1, 2, 3]
        best = max(t["layers"], key=lambda row: row["balanced_accuracy"])
        assert t["best"]["balanced_accuracy"] == best["balanced_accuracy"]
        assert t["first_layer_like_best"] <= t["best_layer"]
        low, high = t["best"]["balanced_accuracy_ci"]
        assert low <= t["best"]["balanced_accuracy"] <= high
        assert t["model"]["auroc"] is not None and t["token_stats"]["auroc"] is not None
        assert t["positions"]["train_positive"] <= 120 and t["positions"]["eval_positive"] <= 30
    for name in ("report.md", "scan.csv", "scan-heatmap.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "scan.csv").open(encoding="utf-8")))
    assert len(rows) == 6 * 4 and rows[0]["text"] == " the"


def test_scan_probes_load_and_predict_like_any_probe(scanned):
    config, loaded, result, out = scanned
    entry = result.scan["targets"][1]
    folder = out / entry["probe_dir"]
    probes = load_probes(folder)
    assert probes.layers == [0, 1, 2, 3]
    assert {p.meta.target for p in probes} == {entry["text"]}
    assert all(p.meta.target_ids == [entry["token_id"]] for p in probes)
    assert (folder / probes[0].meta.run_record).resolve() == (out / "run.json").resolve()
    torch.testing.assert_close(probes[2].weight, result.probes[entry["token_id"]][2].weight)
    prediction = probes.predict("The cat sat on the mat.", loaded=loaded)
    assert prediction.probabilities.shape[0] == 4 and np.isfinite(prediction.probabilities).all()


def test_auto_l2_is_chosen_once_per_target_at_the_middle_layer(tiny_model_dirs, corpus_file, session_cache):
    config = _config(tiny_model_dirs["gpt2"], corpus_file, l2="auto", layers="0,1,3", bootstrap=0)
    result = scan(config, ScanOptions(target_ids=None, top=2, positives=100), cache_dir=session_cache,
                  save=False, progress=False)
    for by_layer in result.probes.values():
        infos = [p.fit_info for p in by_layer.values()]
        assert len({i["l2"] for i in infos}) == 1 and all(i["l2_layer"] == 1 for i in infos)
        assert "chosen at layer 1" in infos[0]["l2_method"] and infos[0]["l2_path"]
    for t in result.scan["targets"]:  # --bootstrap 0: no intervals
        assert t["best"]["balanced_accuracy_ci"] == [None, None] or all(
            v is None or np.isnan(v) for v in t["best"]["balanced_accuracy_ci"])


def test_current_task_scan_skips_the_next_token_baselines(tiny_model_dirs, corpus_file, session_cache):
    config = _config(tiny_model_dirs["gemma3"], corpus_file, task="current", layers="1,2", bootstrap=0)
    result = scan(config, ScanOptions(top=2, positives=60), cache_dir=session_cache, save=False, progress=False)
    assert result.scan["baselines"] is False and "predict the next token" in result.scan["baselines_skipped"]
    for t in result.scan["targets"]:
        assert t["model"] is None and t["gap_to_model"] is None
        assert t["best"]["balanced_accuracy"] >= 0.8  # the current token is in the residual stream (15 held-out positives)


def test_cli_scan_of_named_targets(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    targets = tmp_path / "targets.txt"
    targets.write_text(" the\n a\n", encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli(["scan", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file, "--targets-file", targets,
                    "--target-ids", "5", "--layers", "1,3", "--max-tokens", "20000", "--bootstrap", "0",
                    "--positives", "60", "--out", out, "--cache-dir", session_cache, *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "scan.json").read_text())
    assert [t["text"] for t in data["targets"]][:2] == [" the", " a"] and data["targets"][2]["token_id"] == 5
    assert data["config"]["targets_file"] == str(targets) and data["config"]["top"] is None
    assert "scan written to" in proc.stdout and " the" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be at least 1"),
    (["--top", "5", "--target-ids", "3"], "not both"),
    (["--targets-file", "nope.txt"], "--targets-file nope.txt: file not found"),
    (["--positives", "2"], "--positives must be at least 8"),
    (["--task", "regex:x"], "--task must be next, current or ahead:K"),
])
def test_cli_scan_errors_before_the_model_loads(args, message, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["scan", "--model", tmp_path / "no-such-model", "--out", out, *args])
    assert message in error_line(proc)
    assert_nothing_written(out)


def test_cli_scan_target_that_is_several_tokens(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    targets = tmp_path / "targets.txt"
    targets.write_text(" the\n marketplace\n", encoding="utf-8")
    out = tmp_path / "run"
    proc = run_cli(["scan", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file, "--targets-file", targets,
                    "--out", out, "--cache-dir", session_cache, *FAST])
    line = error_line(proc)
    assert "' marketplace' is" in line and "tokens for this tokenizer" in line
    assert_nothing_written(out)
