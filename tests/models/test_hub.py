"""Hub ids without a network: a clean error within seconds, or the local hub cache when it has the model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from cli_helpers import cli_env, error_line, run_cli

# A port nothing listens on: the hub "cannot be reached" at once, as on a machine without network.
NO_HUB = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


def test_unreachable_hub_fails_within_seconds_with_one_line(tmp_path):
    started = time.perf_counter()
    proc = run_cli(["train", "--model", "nosuchmodel/xyz", "--out", tmp_path / "run", "--cache-dir", tmp_path],
                   HF_HUB_CACHE=str(tmp_path / "hub"), **NO_HUB)
    elapsed = time.perf_counter() - started
    line = error_line(proc)
    assert "hub cannot be reached" in line and "pass a local model folder" in line, line
    assert "Retry" not in proc.stderr
    assert elapsed < 20, elapsed  # the hub client alone retries for ~50 s
    assert not (tmp_path / "run").exists()


def test_offline_flag_says_so(tmp_path):
    line = error_line(run_cli(["train", "--model", "nosuchmodel/xyz", "--out", tmp_path / "run"],
                              HF_HUB_CACHE=str(tmp_path / "hub")))
    assert "HF_HUB_OFFLINE is set" in line, line


def test_unreachable_hub_loads_a_cached_model(tiny_model_dirs, tmp_path):
    """A model the hub cache already holds loads from it when the hub cannot be reached."""
    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dirs["gpt2"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = ("from tokenprobe import load_model; m = load_model('someorg/tiny', 'float32', 'cpu', progress=False); "
            "print(m.num_layers, m.weights_hash)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=cli_env(HF_HUB_CACHE=str(tmp_path / "hub"), TOKENPROBE_CACHE=str(tmp_path / "cache"),
                                      **NO_HUB))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", f"hub:someorg/tiny@{'a' * 40}"]
