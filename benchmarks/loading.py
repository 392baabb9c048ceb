"""Benchmark: loading only what is probed, and the memory of a GGUF model's first load.

1. partial    ``tokenprobe train --layers 0,4 --no-baselines`` against ``--layers all --no-baselines`` on a
              model of 24 blocks or more (the Qwen2.5-Coder 0.5B GGUF: 24 blocks), each run in a fresh
              subprocess, the two taking turns ``--repeats`` times on a warm ready copy. Reported: each
              run's peak resident memory (the child's own ``ru_maxrss``, from ``wait4``) and its model load
              time (``timings.load_model_s`` of its run.json), and the ratios partial / all, the median of
              the ratios within a repeat (issue 16's targets: at most 60% of the memory, at most half the
              load time). That load time includes importing transformers' modeling code (about 4 s
              here, the same for both), so the load itself is also timed apart: ``load_model`` with and
              without ``blocks=4`` in turns, in one process whose imports are done.
2. first load ``load_model(GGUF, dtype=bfloat16)`` in a fresh subprocess with an empty cache (the GGUF is
              dequantised tensor by tensor into the bfloat16 ready copy, then loaded), against the model's
              bfloat16 size (its parameters times 2 bytes; target: at most that plus 2 GB). On the 1.5B GGUF.

A model file that is not there is skipped with a message (``scripts/fetch_models.py`` assembles them).

    python benchmarks/loading.py                       # both parts, about 10 minutes on 2 CPU cores
    python benchmarks/loading.py --skip-first-load     # part 1 only
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = Path(os.environ.get("TOKENPROBE_CACHE", Path.home() / ".cache" / "tokenprobe")) / "models"
PARTIAL_MODEL = MODELS / "qwen2.5-coder-0.5b.gguf"
FIRST_LOAD_MODEL = MODELS / "qwen2.5-coder-1.5b.gguf"
CONFIGS = {"0,4": ["--layers", "0,4"], "all": ["--layers", "all"]}
TARGET_MEMORY, TARGET_LOAD, TARGET_FIRST_LOAD_GB = 0.60, 0.50, 2.0


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[int, float]:
    """Peak RSS (bytes) and wall time of `command`, measured by a tiny wrapper process around it, so each
    measurement is of that child alone (RUSAGE_CHILDREN of a fresh wrapper holds one child)."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter()\n"
               "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
               "sys.stderr.write(code.stderr.decode(errors='replace')[-3000:])\n"
               "print(json.dumps({'code': code.returncode, 'seconds': time.perf_counter() - t,\n"
               "                  'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"measurement failed: {' '.join(command)}\n{proc.stderr[-3000:]}") from None
    if result["code"] != 0:
        raise SystemExit(f"failed ({result['code']}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return result["maxrss"] * 1024, result["seconds"]


def tokenprobe_command() -> list[str]:
    entry = Path(sys.executable).with_name("tokenprobe")
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "tokenprobe.cli"]


def partial_part(args: argparse.Namespace) -> dict:
    model = Path(args.partial_model)
    if not model.is_file():
        print(f"partial load: skipped, {model} is missing (python scripts/fetch_models.py qwen2.5-coder-0.5b)")
        return {"skipped": f"{model} missing"}
    cache = Path(args.cache_dir) if args.cache_dir else None
    env = {"TOKENPROBE_CACHE": str(cache)} if cache else {}
    common = ["train", "--model", str(model), "--no-baselines", "--max-tokens", str(args.tokens), "--bootstrap", "0",
              "--no-control", "--train-positions", "2000", "--eval-positions", "500", "--dtype", args.dtype,
              "--device", "cpu", "--quiet", "--overwrite"]
    with tempfile.TemporaryDirectory(prefix="tokenprobe-loading-") as tmp:
        print(f"partial load: warming the ready copy and the chunk cache of {model.name} ...", flush=True)
        measure([*tokenprobe_command(), *common, "--layers", "0", "--out", f"{tmp}/warm"], env)
        rows = []
        for repeat in range(args.repeats):
            row = {}
            order = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))  # alternate who goes first
            for name in order:
                out = Path(tmp) / f"run-{name.replace(',', '-')}"
                rss, seconds = measure([*tokenprobe_command(), *common, *CONFIGS[name], "--out", str(out)],
                                                  env)
                record = json.loads((out / "run.json").read_text())
                row[name] = {"peak_rss": rss, "wall_s": seconds, "load_s": record["timings"]["load_model_s"],
                             "loaded_blocks": record["model"]["loaded_blocks"],
                             "num_layers": record["model"]["num_layers"]}
            rows.append(row)
            print(f"  repeat {repeat + 1}: " + "; ".join(
                f"--layers {n}: {r['peak_rss'] / 2**30:.2f} GiB peak, load {r['load_s']:.2f} s, "
                f"{r['loaded_blocks']} of {r['num_layers']} blocks" for n, r in row.items()), flush=True)
    inner = load_after_imports(model, args.dtype, args.repeats, env)
    memory = statistics.median(r["0,4"]["peak_rss"] / r["all"]["peak_rss"] for r in rows)
    load = statistics.median(r["0,4"]["load_s"] / r["all"]["load_s"] for r in rows)
    print(f"partial load on {model.name}: peak RSS of --layers 0,4 is {memory:.0%} of --layers all's "
          f"(target <= {TARGET_MEMORY:.0%}: {'met' if memory <= TARGET_MEMORY else 'NOT met'}); load time "
          f"{load:.2f}x (target <= {TARGET_LOAD}: {'met' if load <= TARGET_LOAD else 'NOT met'}), of which importing "
          f"transformers' modeling code is the same for both; the load itself, imports done: {inner['ratio']:.2f}x "
          f"({statistics.median(inner['4']):.3f} s against {statistics.median(inner['all']):.3f} s)")
    return {"model": str(model), "repeats": rows, "memory_ratio": memory, "load_ratio": load,
            "after_imports": inner}


def load_after_imports(model: Path, dtype: str, repeats: int, env: dict[str, str]) -> dict:
    """load_model with every block and with blocks=4, in turns, in one process whose imports are done."""
    script = ("import json, statistics, sys, time\n"
              "from tokenprobe.models.loading import load_model\n"
              "src, dtype, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
              "load_model(src, dtype, 'cpu', progress=False, blocks=1)  # imports, tokenizer hash, page cache\n"
              "times = {'all': [], '4': []}\n"
              "for r in range(repeats + 1):\n"
              "    for name in (('all', '4') if r % 2 == 0 else ('4', 'all')):\n"
              "        t = time.perf_counter()\n"
              "        m = load_model(src, dtype, 'cpu', progress=False, blocks=None if name == 'all' else 4)\n"
              "        times[name].append(time.perf_counter() - t)\n"
              "        del m\n"
              "times = {k: v[1:] for k, v in times.items()}  # the first turn of each: warm-up\n"
              "times['ratio'] = statistics.median(a / b for a, b in zip(times['4'], times['all']))\n"
              "print(json.dumps(times))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(model), dtype, str(repeats)], capture_output=True,
                          text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise SystemExit(f"load timing failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_load_part(args: argparse.Namespace) -> dict:
    model = Path(args.first_load_model)
    if not model.is_file():
        print(f"first load: skipped, {model} is missing (python scripts/fetch_models.py qwen2.5-coder-1.5b)")
        return {"skipped": f"{model} missing"}
    script = ("import sys, json\n"
              "from tokenprobe import load_model\n"
              "m = load_model(sys.argv[1], dtype='bfloat16', device='cpu', cache_dir=sys.argv[2], progress=False)\n"
              "print(json.dumps({'params': sum(p.numel() for p in m.model.parameters())}))\n")
    cache = Path(tempfile.mkdtemp(prefix="tokenprobe-first-load-"))
    try:
        print(f"first load: {model.name} to bfloat16 into an empty cache ({cache}) ...", flush=True)
        rss, seconds = measure([sys.executable, "-c", script, str(model), str(cache)])
        again_rss, again_s = measure([sys.executable, "-c", script, str(model), str(cache)])
        ready = next((cache / "models").glob("*/bfloat16"))
        size = sum(f.stat().st_size for f in ready.glob("*.safetensors"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    over = (rss - size) / 2**30
    print(f"first load of {model.name} (bfloat16): peak RSS {rss / 2**30:.2f} GiB in {seconds:.0f} s; its bfloat16 "
          f"weights take {size / 2**30:.2f} GiB, so {over:+.2f} GiB over them (target <= +{TARGET_FIRST_LOAD_GB} GiB: "
          f"{'met' if over <= TARGET_FIRST_LOAD_GB else 'NOT met'}); a second load peaks at {again_rss / 2**30:.2f} "
          f"GiB in {again_s:.0f} s")
    return {"model": str(model), "peak_rss": rss, "seconds": seconds, "bf16_bytes": size, "over_gib": over,
            "second_peak_rss": again_rss, "second_seconds": again_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partial-model", default=str(PARTIAL_MODEL), help="a GGUF of 24 blocks or more")
    parser.add_argument("--first-load-model", default=str(FIRST_LOAD_MODEL), help="the GGUF whose first load is measured")
    parser.add_argument("--repeats", type=int, default=3, help="turns of the two partial-load runs (default: 3)")
    parser.add_argument("--tokens", type=int, default=8192, help="--max-tokens of the partial-load runs")
    parser.add_argument("--dtype", default="auto", help="--dtype of the partial-load runs (default: auto)")
    parser.add_argument("--cache-dir", default=None, help="tokenprobe cache for the partial-load runs")
    parser.add_argument("--skip-partial", action="store_true")
    parser.add_argument("--skip-first-load", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    figures = {}
    if not args.skip_partial:
        figures["partial"] = partial_part(args)
    if not args.skip_first_load:
        figures["first_load"] = first_load_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
