"""Benchmark: peak memory of `tokenprobe train --layers all` against the model's weights, for a small and a
large number of sampled positions. With the activation store the run holds one layer of its positions at a
time, so the peak should stay near the weights (the issue's bound: weights in the compute dtype + 1.5 GB)
whatever the number of positions; held in memory, every layer of every position would add
positions x (layers + 1) x width x bytes.

    python benchmarks/memory.py                      # the Qwen2.5-Coder 1.5B GGUF if fetched, else the default model
    python benchmarks/memory.py --model PATH --max-tokens 16000 --positions 2000,12000

Each run is a fresh `tokenprobe train` subprocess (`--balance none`, so the positions are the natural
sample and their number is what --train-positions says), measured by the kernel's peak RSS of the child
(`resource.getrusage(RUSAGE_CHILDREN)` read in a wrapper process per run, so the runs do not mix). The
model is loaded once beforehand so its converted copy is cached and no run pays for the first load.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1024**3
BOUND = 1.5 * GB
QWEN_15B = Path("~/.cache/tokenprobe/models/qwen2.5-coder-1.5b.gguf").expanduser()

WRAPPER = r"""
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(code)
"""


def peak_rss(args: list[str]) -> int:
    """Peak resident memory, in bytes, of `tokenprobe ARGS` run as its own process."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", "tokenprobe", *args],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(QWEN_15B) if QWEN_15B.is_file() else "gemma-3-270m")
    parser.add_argument("--max-tokens", type=int, default=16_000)
    parser.add_argument("--positions", default="2000,12000", help="training positions of the two runs")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tokenprobe-bench-memory-"))
    try:
        # Converts (first load) and caches the chunks, so both measured runs start alike.
        subprocess.run([sys.executable, "-m", "tokenprobe", "train", "--model", args.model, "--dtype", args.dtype,
                        "--layers", "0", "--max-tokens", "2048", "--no-baselines", "--bootstrap", "0", "--quiet",
                        "--no-keep-activations", "--out", str(work / "warm")], check=True)
        rows = []
        for n in (int(x) for x in args.positions.split(",")):
            out = work / f"run{n}"
            rss = peak_rss(["train", "--model", args.model, "--dtype", args.dtype, "--layers", "all",
                            "--max-tokens", str(args.max_tokens), "--balance", "none", "--train-positions", str(n),
                            "--eval-positions", str(n // 4), "--no-keep-activations", "--quiet", "--out", str(out)])
            record = json.loads((out / "run.json").read_text())
            positions = sum(v["positions"] for v in record["positions"].values())
            layers = len(record["layers"]) + (1 if record["model"]["num_layers"] not in record["layers"] else 0)
            element = 2 if record["dtype"] in ("bfloat16", "float16") else 4
            held = positions * layers * record["model"]["hidden_size"] * element
            weights = record["model"]["parameter_bytes"]
            rows.append((positions, rss, weights, held))
            print(f"{positions:>7,} positions x {layers} layers: peak RSS {rss / GB:.2f} GB = weights "
                  f"{weights / GB:.2f} GB + {(rss - weights) / GB:.2f} GB (bound: + {BOUND / GB:.1f} GB; all layers "
                  f"held in memory would be {held / GB:.2f} GB)", flush=True)
        record = json.loads((work / f"run{args.positions.split(',')[-1]}" / "run.json").read_text())
        print(f"machine: {platform.processor() or platform.machine()}; model {record['model']['name']} "
              f"({record['model']['num_layers']} blocks, width {record['model']['hidden_size']}), {record['dtype']}, "
              f"{args.max_tokens:,} tokens")
        (p0, r0, _, h0), (p1, r1, _, h1) = rows[0], rows[-1]
        print(f"growth: {(r1 - r0) / GB:+.2f} GB of peak RSS for {p1 - p0:,} more positions "
              f"({(h1 - h0) / GB:.2f} GB more if every layer were held)")
        ok = all(rss - weights <= BOUND for _, rss, weights, _ in rows)
        print("within the bound: " + ("yes" if ok else "NO"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
