"""The activation store and `tokenprobe fit`: a run keeps its sampled activations, and `fit` retrains and
rescores from them without the model, reproducing the run exactly with the run's own options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenprobe import RunConfig, train
from tokenprobe.extract.store import StoreSource, open_store
from tokenprobe.pipelines.fit import fit_run
from cli_helpers import FAST, assert_nothing_written, error_line, run_cli

# Keys that differ between a run and its refit by design: when and how fast, and where things came from.
VARYING = {"timings", "created", "versions", "tokens_per_second", "chunks_from_cache", "fit", "activations"}


def _config(model_dir, corpus, **kw) -> RunConfig:
    base = dict(model=str(model_dir), corpus=str(corpus), layers="all", context_length=32, dtype="float32",
                device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300, max_iter=50)
    return RunConfig(**{**base, **kw})


def _strip(tree):
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if k not in VARYING}
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((run / "probes").glob("*.safetensors"))}


def _same_probes(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)


@pytest.fixture(scope="module")
def kept_run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kept") / "run"
    train(_config(tiny_model_dirs["gemma3"], corpus_file, probe="linear,mean-diff", control=True), out_dir=out,
          cache_dir=session_cache, progress=False)
    return out


def test_a_run_keeps_its_activations_and_nothing_stays_in_the_cache(kept_run, session_cache):
    record = json.loads((kept_run / "run.json").read_text())
    assert record["activations"]["kept"] and record["activations"]["path"] == "activations"
    stored = open_store(kept_run / "activations")
    assert stored.source.layers == [0, 1, 2, 3, 4] and stored.record["probed_layers"] == [0, 1, 2, 3, 4]
    assert stored.record["bytes"] == record["activations"]["bytes"] > 0
    n = sum(v["positions"] for v in record["positions"].values())
    assert len(stored.label) == n and stored.source.keep.all()
    # the baselines' scores are there, in the order the run scored them, with their thresholds
    assert list(stored.baseline_scores)[:5] == [f"logit_lens/{layer}" for layer in range(5)]
    assert {"model", "token_stats", "majority"} <= set(stored.baseline_scores)
    assert record["baselines"]["thresholds"]["model"] == stored.baseline_scores["model"][1]
    # the checkpoint moved into the run: no copy is left in the cache
    assert not any((session_cache / "extraction").glob(f"*/{record['extraction']['batch_size']}"))
    assert not [p for p in (session_cache / "extraction").glob("*") if (p / "info.json").is_file()
                and json.loads((p / "info.json").read_text())["layers"] == [0, 1, 2, 3, 4]
                and json.loads((p / "info.json").read_text())["model"] == record["model"]["source"]]


def test_the_store_reads_one_layer_at_a_time_and_gives_back_the_extracted_values(kept_run, tiny_model_dirs):
    """Each layer read from the shards equals the model's own hidden states at those positions."""
    from tokenprobe import load_model

    stored = open_store(kept_run / "activations")
    source: StoreSource = stored.source
    loaded = load_model(str(tiny_model_dirs["gemma3"]), "float32", "cpu")
    rows = np.flatnonzero(stored.chunk == stored.chunk[0])[:3]
    chunk_ids = json.loads((kept_run / "run.json").read_text())  # noqa: F841 (the run's corpus is the fixture's)
    first = source.layer(2)
    assert source.layer(2) is first  # kept until another layer is read
    second = source.layer(3)
    assert source._last[0] == 3 and first.shape == second.shape == (len(stored.label), loaded.hidden_size)
    # the token at each stored position is the one the probes were trained on (the control task's input)
    assert stored.token.shape == stored.label.shape and stored.token.min() >= 0
    assert not torch.equal(first[rows], second[rows])


def test_fit_with_the_runs_options_reproduces_it_exactly(kept_run, tmp_path):
    out = tmp_path / "refit"
    result = fit_run(kept_run, out_dir=out, progress=False)
    assert result.out_dir == out
    _same_probes(kept_run, out)
    a = json.loads((kept_run / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert _strip(a) == _strip(b)
    assert (kept_run / "results.csv").read_text() == (out / "results.csv").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["fit"]["from"] == str(kept_run.resolve()) and record["fit"]["changed"] == {}
    assert (out / "report.md").is_file() and (out / "plot.png").is_file() and not (out / "activations").exists()


def test_fit_with_other_options_changes_only_what_they_decide(kept_run, tmp_path):
    out = tmp_path / "other"
    fit_run(kept_run, {"layers": "1,3", "probe": "mean-diff", "l2": 0.01, "bootstrap": 200}, out_dir=out,
            progress=False)
    a = {r["layer"]: r for r in json.loads((kept_run / "results.json").read_text())["layers"]}
    b = {r["layer"]: r for r in json.loads((out / "results.json").read_text())["layers"]}
    assert sorted(b) == [1, 3]
    for layer in b:
        # the same held-out positions and the same logit lens; mean-diff is the run's second family
        assert b[layer]["n"] == a[layer]["n"]
        assert b[layer]["logit_lens"]["eval"]["auroc"] == a[layer]["logit_lens"]["eval"]["auroc"]
    run_families = json.loads((kept_run / "results.json").read_text())["families"]["layers"]
    mean_diff = {r["layer"]: r for r in run_families if r["family"] == "mean-diff"}
    for layer in b:
        assert b[layer]["balanced_accuracy"] == mean_diff[layer]["balanced_accuracy"]
    assert sorted(p.name for p in (out / "probes").iterdir()) == ["layer01.safetensors", "layer03.safetensors"]
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["probe"] == "mean-diff" and record["intervals"]["resamples"] == 200
    # a refit of the refit reads the original store
    again = fit_run(out, out_dir=tmp_path / "again", progress=False)
    assert [r.layer for r in again.layers] == [1, 3]
    _same_probes(out, tmp_path / "again")


def test_fit_cli_errors_are_one_line_and_write_nothing(kept_run, tiny_model_dirs, corpus_file, tmp_path):
    out = tmp_path / "x"
    line = error_line(run_cli(["fit", kept_run, "--layers", "7", "--out", out, "--quiet"]))
    assert "--layers 7 out of range" in line
    assert_nothing_written(out)
    line = error_line(run_cli(["fit", tmp_path, "--out", out, "--quiet"]))
    assert "not a tokenprobe run folder" in line
    # a damaged shard is found before anything is fitted
    broken = tmp_path / "broken"
    shutil.copytree(kept_run, broken)
    shard = next((broken / "activations").glob("bs*/batch*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = error_line(run_cli(["fit", broken, "--out", out, "--quiet"]))
    assert "damaged" in line and shard.name in line
    assert_nothing_written(out)
    # a run that did not keep its activations says so, and how to keep them
    dropped = tmp_path / "dropped"
    proc = run_cli(["train", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file, "--layers", "1",
                    "--no-keep-activations", "--out", dropped, *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (dropped / "activations").exists()
    line = error_line(run_cli(["fit", dropped, "--out", out, "--quiet"]))
    assert "--no-keep-activations" in line and "--keep-activations" in line
    assert_nothing_written(out)
    # layers the store does not hold
    kept = tmp_path / "kept"
    proc = run_cli(["train", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file, "--layers", "1",
                    "--no-baselines", "--out", kept, *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = error_line(run_cli(["fit", kept, "--layers", "1,2", "--out", out, "--quiet"]))
    assert "hold layers 1, not 2" in line
    assert_nothing_written(out)


def test_fit_cli_reproduces_and_prints_the_table(kept_run, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli(["fit", kept_run, "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best layer" in proc.stdout and f"run written to {out}" in proc.stdout
    assert "Activations of" in proc.stderr
    _same_probes(kept_run, out)
