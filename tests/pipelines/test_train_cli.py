"""`tokenprobe train` and `tokenprobe inspect` end to end on tiny models, through the CLI and the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, load_model, load_probe, train
from tokenprobe.config import parse_layers, run_name, sweep_name
from tokenprobe.errors import TokenprobeError


def _cli(*args, cache, cwd=None):
    env = {**os.environ, "TOKENPROBE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tokenprobe.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def test_layers_and_names():
    assert parse_layers("auto", 18) == [0, 4, 9, 14, 18]
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert parse_layers("5, 0,17", 18) == [0, 5, 17]
    with pytest.raises(TokenprobeError, match="layers 0 to 18"):
        parse_layers("19", 18)
    with pytest.raises(TokenprobeError, match="malformed"):
        parse_layers("1-3", 18)
    config = RunConfig()
    assert run_name(config, 5, "gemma-3-270m") == "probe-layer5-ctx256-all-next-gemma-3-270m"
    assert sweep_name(RunConfig(max_tokens=200_000, task="current"), "gemma-3-270m") == \
        "sweep-ctx256-200k-current-gemma-3-270m"


def test_cli_train_writes_a_complete_run(tiny_model_dirs, corpus_file, tmp_path, session_cache):
    out = tmp_path / "run"
    result = _cli("train", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file, "--layers", "all",
                  "--context-length", "64", "--train-positions", "600", "--eval-positions", "300",
                  "--dtype", "float32", "--out", out, "--quiet", cache=session_cache)
    assert result.returncode == 0, result.stderr
    assert "bal.acc" in result.stdout and "best layer" in result.stdout
    assert "Loading weights" not in result.stderr and "it/s" not in result.stderr  # --quiet: no bars, ours or transformers'
    # the next-token task trains a control task by default: its table, plot and CSV come too
    assert sorted(p.name for p in out.iterdir()) == ["activations", "families.csv", "families.png", "plot.png",
                                                     "probes", "report.md", "results.csv", "results.json", "run.json"]
    assert (out / "activations" / "store.json").is_file()  # kept: a small run's store is under 2 GB
    assert "select." in result.stdout and "control" in result.stdout
    results = json.loads((out / "results.json").read_text())
    layers = results["layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2, 3]
    for r in layers:
        assert {"balanced_accuracy", "accuracy", "auroc", "tp", "fp", "tn", "fn", "n", "positives"} <= set(r)
        assert r["tp"] + r["fp"] + r["tn"] + r["fn"] == r["n"]
        assert r["positives"] == r["negatives"]  # the primary evaluation set is balanced
        assert r["run_name"] == f"probe-layer{r['layer']}-ctx64-all-next-llama"
        assert set(r["sets"]) == {"eval", "eval_natural", "train"}
    record = results["run"]
    assert record["target"]["text"] == " the" and record["dtype"] == "float32"
    assert record["positions"]["train"]["positive"] * 2 == record["positions"]["train"]["positions"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    # 4 layers x 3 sets for the probes, 4 x 2 for the logit lens, 3 baselines x 2 held-out sets.
    assert csv_lines[0].startswith("layer,set,scorer,n,") and len(csv_lines) == 1 + 4 * 3 + 4 * 2 + 3 * 2

    probe_file = out / "probes" / "layer02.safetensors"
    meta = load_probe(probe_file).metadata
    assert meta["layer"] == 2 and meta["task"] == "next" and meta["target_ids"] == [record["target"]["token_id"]]
    assert meta["context_length"] == 64 and meta["model_source"] == str(tiny_model_dirs["llama"])

    shown = _cli("inspect", probe_file, cache=session_cache)
    assert shown.returncode == 0 and "layer              2" in shown.stdout and "eval_natural" in shown.stdout

    again = _cli("train", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file, "--out", out, "--quiet",
                 cache=session_cache)
    assert again.returncode != 0 and "holds another run" in again.stderr and "Traceback" not in again.stderr


def test_current_task_at_the_embedding_is_nearly_perfect(tiny_model_dir, corpus_file, session_cache):
    """Reading the current token off its embedding is trivial: a working pipeline gets ~1.0."""
    config = RunConfig(model=str(tiny_model_dir), corpus=str(corpus_file), task="current", layers="0",
                       context_length=64, train_positions=600, eval_positions=300, dtype="float32")
    result = train(config, cache_dir=session_cache, save=False, progress=False)
    assert result.layers[0].primary.balanced_accuracy > 0.97
    assert result.layers[0].metrics["eval_natural"].balanced_accuracy > 0.97
    # The baselines predict the next token, so a current-token run has none (and no extra layer).
    assert result.baselines == [] and result.record["layers"] == [0]


def test_api_probes_reproduce_reported_metrics(tiny_model_dirs, corpus_file, session_cache):
    """A saved probe applied to freshly extracted activations gives the same probabilities."""
    loaded = load_model(str(tiny_model_dirs["gemma3"]), "float32", "cpu", session_cache)
    config = RunConfig(model=str(tiny_model_dirs["gemma3"]), corpus=str(corpus_file), layers="1,4",
                       context_length=64, train_positions=400, eval_positions=200)
    first = train(config, loaded=loaded, cache_dir=session_cache, save=False, progress=False)
    second = train(config, loaded=loaded, cache_dir=session_cache, save=False, progress=False)
    for a, b in zip(first.layers, second.layers):  # same seed, same model: the same numbers
        assert a.primary == b.primary
    assert first.record["corpus"]["chunks_from_cache"] in (True, False)
    assert second.record["corpus"]["chunks_from_cache"] is True
    probe = first.probes[4]
    probe.check_compatible(loaded)
    hidden = torch.randn(3, loaded.hidden_size)
    assert probe.predict_proba(hidden).shape == (3,)
    assert np.isfinite(first.layers[0].primary.auroc)


def test_unbalanced_training_uses_capped_pos_weight(tiny_model_dirs, corpus_file, session_cache):
    config = RunConfig(model=str(tiny_model_dirs["gpt2"]), corpus=str(corpus_file), layers="0", balance="none",
                       context_length=64, train_positions=600, eval_positions=200, dtype="float32")
    result = train(config, cache_dir=session_cache, save=False, progress=False)
    counts = result.record["positions"]["train"]
    expected = min(5.0, ((counts["positions"] - counts["positive"]) / counts["positive"]) ** 0.5)
    assert counts["positive"] < counts["positions"] / 4
    assert result.record["pos_weight"] == pytest.approx(expected)


def test_a_run_folder_is_readable_by_others_under_umask_022(tmp_path, tiny_model_dirs, corpus_file):
    """Every file of a run (record, results, report, plot, probes) is 0644 under the usual umask 022."""
    import stat

    code = ("import os, sys; os.umask(0o022); from tokenprobe.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--model", str(tiny_model_dirs["gpt2"]), "--corpus",
                           str(corpus_file), "--context-length", "32", "--layers", "1", "--train-positions", "400",
                           "--eval-positions", "100", "--bootstrap", "0", "--out", str(out), "--cache-dir",
                           str(tmp_path / "cache"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "results.json", "results.csv", "report.md", "plot.png",
                                        "layer01.safetensors"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o644)}
