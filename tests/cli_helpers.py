"""Running the real `tokenprobe` CLI as a subprocess, and checking that an error is a clean one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
FAULT_CLI = TESTS / "fault_cli.py"

# Small, fast settings for the tiny models: ~400 chunks of 32 tokens are run through the model.
FAST = ["--context-length", "32", "--batch-size", "8", "--train-positions", "1000", "--eval-positions", "400",
        "--dtype", "float32", "--device", "cpu", "--quiet"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def command(args: list[str], faults: bool = False) -> list[str]:
    """`tokenprobe ARGS` through the installed entry point's module, or through the fault injector."""
    if faults:
        return [sys.executable, str(FAULT_CLI), *map(str, args)]
    entry_point = Path(sys.executable).with_name("tokenprobe")
    if entry_point.exists():
        return [str(entry_point), *map(str, args)]
    return [sys.executable, "-m", "tokenprobe.cli", *map(str, args)]


def run_cli(args: list, faults: bool = False, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, faults), capture_output=True, text=True, env=cli_env(**env), timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `tokenprobe: error:` line; fails unless the error is clean (one line, no traceback)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected a failure, got exit 0:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tokenprobe: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(lines[0]), "the error must be the last thing printed"
    if os.environ.get("TP_RECORD_ERRORS"):  # collects the real messages for docs/errors.md
        with open(os.environ["TP_RECORD_ERRORS"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "line": lines[0]}) + "\n")
    return lines[0]


def assert_nothing_written(out_dir: Path) -> None:
    """No run folder, no staging folder, no lock file: nothing half-written for a later run to trust."""
    assert not out_dir.exists(), f"{out_dir} was left behind"
    if out_dir.parent.exists():
        leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
        assert not leftovers, leftovers
