"""The benchmark script stays runnable: its --help works and its statistics are sound (no timings asserted)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"


def _load():
    spec = importlib.util.spec_from_file_location("sweep_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_help_runs_and_names_the_configurations():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--tokens", "--repeats", "--memory-batch", "--no-startup", "--large", "--device"):
        assert flag in proc.stdout


def test_balanced_accuracy_and_interval():
    sweep = _load()
    ba, se = sweep._ba_from([True, True, False, False], [True, False, False, False])
    assert ba == 0.75
    assert se > 0
    assert sweep._ba(10, 0, 10, 0) == (1.0, 0.0)


def test_cuda_without_a_device_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr


def test_large_flag_raises_the_token_count():
    sweep = _load()
    assert sweep.parse_args(["--large"]).tokens > sweep.parse_args([]).tokens


def test_every_configuration_runs_end_to_end_on_a_tiny_model(tiny_model_dirs, corpus_file, tmp_path):
    """The whole benchmark on a tiny Llama: every configuration, memory and startup give figures
    (their values are not asserted: timings belong to benchmark runs, not to tests)."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dirs["llama"]), "--corpus", str(corpus_file),
         "--context-length", "32", "--tokens", "2048", "--repeats", "1", "--memory-batch", "4",
         "--memory-batches", "2", "--memory-repeats", "1", "--skip", "", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    import math

    figures = json.loads(out.read_text())
    sweep = _load()
    assert set(figures["median_s"]) == set(sweep.CONFIGS)
    assert all(seconds > 0 for seconds in figures["median_s"].values())
    for ratio in ("tokenprobe / bare forward", "recipe / tokenprobe", "seed / tokenprobe",
                  "tokenprobe / bare forward, cut batches"):
        assert figures["ratios"][ratio] > 0, ratio
    runs = figures["runs"]
    # tokenprobe runs fewer tokens than the full chunks (cut after the last sampled position), and
    # exactly the tokens of the bare forward over its cut batches.
    assert runs["tokenprobe"][0]["tokens"] == runs["bare_cut"][0]["tokens"] < runs["bare"][0]["tokens"]
    assert isinstance(runs["auto"][0]["batch_size"], int)
    # the paired forward passes and the drift-free estimate built on them
    assert runs["paired"][0]["ratio"] > 0 and figures["estimated_tokenprobe_over_bare"] > 0
    # Accuracy is compared layer by layer with the recipe.
    assert set(runs["recipe"][0]["eval"]) == set(runs["tokenprobe"][0]["eval"])
    for name in ("load", "bare", "tokenprobe", "recipe"):
        assert figures["memory"][name]["peak_rss_gb"] > 0, figures["memory"][name]
    assert all(math.isfinite(t) for t in figures["startup_s"])
    assert all(t > 0 for t in figures["import_floor_s"]) and "tokenprobe's own share" in proc.stdout
    # the startup runs are stopped at their first forward pass: their checkpoints must not stay in the cache
    assert not list((tmp_path / "cache" / "extraction").glob("*"))
    assert math.isfinite(figures["startup_own_s"])
    assert "tokenprobe / recipe peak resident memory" in proc.stdout and "launch -> first forward pass" in proc.stdout


@pytest.mark.parametrize("bad", [["--corpus", "MISSING"], ["--tokens", "0"], ["--skip", "bare,nonsense"]])
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad, tiny_model_dirs, corpus_file, tmp_path):
    bad = [str(tmp_path / "missing.txt") if a == "MISSING" else a for a in bad]
    args = ["--model", str(tiny_model_dirs["llama"]), "--corpus", str(corpus_file), "--context-length", "32",
            "--no-memory", "--no-startup", "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "f.json")]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, *bad], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error:" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "f.json").exists()
