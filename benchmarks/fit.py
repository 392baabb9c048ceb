"""Benchmark: `tokenprobe fit` on a stored run against the run itself (wall time), and the check that the
refit reproduces it (probe tensors bit-identical, every figure equal).

    python benchmarks/fit.py                  # trains `--layers all --max-tokens 120000` first (minutes)
    python benchmarks/fit.py RUN              # an existing `tokenprobe train` run that kept its activations

The run's own wall time is its run.json `timings.total_s` (model load, chunks, forward pass, probes,
baselines, intervals, writing) when RUN is given, else the time of the `tokenprobe train` subprocess;
`fit` runs as a subprocess (`tokenprobe fit RUN --out ...`), timed from start to exit, imports included.
The issue's target: fit takes at most a tenth of the run's wall time. The comparison is
benchmarks/compare_runs.py's, with the keys that say where and when a refit came from ignored.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_runs import IGNORED_KEYS, compare  # noqa: E402

TARGET = 0.1


def tokenprobe(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokenprobe", *args], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=None, help="a train run with activations/")
    parser.add_argument("--max-tokens", type=int, default=120_000, help="for the run trained here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tokenprobe-bench-fit-"))
    try:
        run = args.run
        if run is None:
            run = work / "run"
            run_seconds = tokenprobe("train", "--layers", "all", "--max-tokens", str(args.max_tokens),
                                     "--keep-activations", "--quiet", "--out", str(run))
        else:
            run_seconds = json.loads((run / "run.json").read_text())["timings"]["total_s"]
        fit_seconds = tokenprobe("fit", str(run), "--quiet", "--out", str(work / "refit"))
        record = json.loads((run / "run.json").read_text())
        same = compare(run, work / "refit", ignored=IGNORED_KEYS | {"fit", "activations"})
        print(f"machine: {platform.processor() or platform.machine()}, model {record['model']['name']}, "
              f"{record['dtype']}, layers {len(record['layers'])}, "
              f"{record['activations']['bytes'] / 1024**2:.0f} MB of activations")
        print(f"train: {run_seconds:.1f} s   fit: {fit_seconds:.1f} s   ratio fit/train: {fit_seconds / run_seconds:.3f} "
              f"(target <= {TARGET})")
        print("refit identical to the run: " + ("yes" if same else "NO"))
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
