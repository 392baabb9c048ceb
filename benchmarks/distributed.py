"""Benchmark: extraction throughput of one process against several (torchrun, gloo) on the same cores, and
the check that every world size gives the same run.

    python benchmarks/distributed.py                          # the default model, 1 and 2 processes
    python benchmarks/distributed.py --worlds 1,2,3 --max-tokens 20000 --repeats 1

Each world size runs `tokenprobe train` on the same slice, with the machine's cores divided between the
ranks (one process: every core as torch threads; N processes: cores / N threads each), so the total is
the same and the ratio measures what the distributed path costs (or saves). The figure is the run
record's `extraction.tokens_per_second`: every rank's computed tokens over rank 0's wall time from the
start of its share (all ranks start together, after a barrier) until the last rank's last batch is on
disk. Model loading, probes and scores are not in it. Sizes alternate (1, 2, 1, 2, ...) so drift of the
machine's speed hits both; the median of `--repeats` is reported. The issue's target: 2 ranks reach at
least 0.9 of 1 rank's throughput.

Every run's results.json, probes and results.csv are compared with the first one-process run's
(benchmarks/compare_runs.py, the `distributed` block ignored): they must be identical bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_runs import IGNORED_KEYS, compare  # noqa: E402

TARGET = 0.9


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (AVX512-BF16)" if "avx512_bf16" in flags else " (no AVX512-BF16)")
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(world: int, args: list[str], out: Path, cache: Path) -> dict:
    env = dict(os.environ)
    threads = max(1, cores() // world)
    env["OMP_NUM_THREADS"] = str(threads)
    command = ["tokenprobe", "train", *args, "--out", str(out), "--cache-dir", str(cache), "--quiet"]
    if world == 1:
        cmd = [sys.executable, "-m", "tokenprobe", *command[1:]]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "tokenprobe", *command[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"world {world} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    return {"world": world, "threads": threads, **record["extraction"],
            "seconds": record["timings"]["forward_s"], "ranks": (record.get("distributed") or {}).get("ranks")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled default model")
    parser.add_argument("--worlds", default="1,2", help="process counts to compare (default 1,2)")
    parser.add_argument("--max-tokens", type=int, default=40_000)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="a cache holding the model's ready copy (default: $TOKENPROBE_CACHE or ~/.cache/tokenprobe)")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    train_args = ["--layers", args.layers, "--max-tokens", str(args.max_tokens), "--batch-size", args.batch_size,
                  "--no-baselines", "--bootstrap", "0", "--seed", "0"]
    if args.model:
        train_args += ["--model", args.model]
    cache = args.cache_dir or Path(os.environ.get("TOKENPROBE_CACHE", Path.home() / ".cache" / "tokenprobe"))

    work = Path(tempfile.mkdtemp(prefix="tokenprobe-bench-distributed-"))
    results: dict[int, list[dict]] = {w: [] for w in worlds}
    reference = None
    same = True
    try:
        for repeat in range(args.repeats):
            for world in worlds:
                out = work / f"w{world}-{repeat}"
                results[world].append(run(world, train_args, out, cache))
                if reference is None:
                    reference = out
                elif not compare(reference, out, limit=5, ignored=IGNORED_KEYS | {"distributed"}):
                    same = False
                    print(f"world {world} (repeat {repeat}) differs from the first one-process run")
        base = statistics.median(r["tokens_per_second"] for r in results[worlds[0]])
        print(f"\nmachine: {cpu_name()}, {cores()} cores; {args.max_tokens:,} tokens sampled, layers {args.layers}, "
              f"batch size {args.batch_size}; median of {args.repeats}")
        print(f"{'processes':>9} {'threads/rank':>12} {'tokens run':>11} {'seconds':>8} {'tokens/s':>9} "
              f"{'vs ' + str(worlds[0]):>6}   per rank tokens/s")
        for world in worlds:
            rows = results[world]
            rate = statistics.median(r["tokens_per_second"] for r in rows)
            seconds = statistics.median(r["seconds"] for r in rows)
            ranks = rows[-1]["ranks"] or []
            per_rank = ", ".join(f"{r['tokens_per_second']:,.0f}" for r in ranks) or "-"
            print(f"{world:>9} {rows[0]['threads']:>12} {rows[0]['tokens']:>11,} {seconds:>8.1f} {rate:>9,.0f} "
                  f"{rate / base:>6.2f}   {per_rank}")
        if 2 in results and 1 in results:
            ratio = statistics.median(r["tokens_per_second"] for r in results[2]) / statistics.median(
                r["tokens_per_second"] for r in results[1])
            print(f"2 processes / 1 process throughput: {ratio:.2f} (target >= {TARGET})")
        print("every run identical to the first one-process run: " + ("yes" if same else "NO"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
