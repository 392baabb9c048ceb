"""The benchmark script stays runnable: its --help works and its statistics are sound (no timings asserted)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

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
    for flag in ("--tokens", "--repeats", "--memory-batch", "--startup", "--large"):
        assert flag in proc.stdout


def test_balanced_accuracy_and_interval():
    sweep = _load()
    ba, se = sweep._ba_from([True, True, False, False], [True, False, False, False])
    assert ba == 0.75
    assert se > 0
    assert sweep._ba(10, 0, 10, 0) == (1.0, 0.0)


def test_large_flag_raises_the_token_count():
    sweep = _load()
    assert sweep.parse_args(["--large"]).tokens > sweep.parse_args([]).tokens
