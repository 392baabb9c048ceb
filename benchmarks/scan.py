"""Benchmark: a scan of many targets against a single-target run over the same corpus slice.

Both commands run end to end through tokenprobe's Python API in one process, with the model loaded
once and passed to both (loading is not what is compared), on the same chunks (``--max-tokens``):

  single   ``tokenprobe train --layers all`` (target ' the', its probes, baselines, intervals, report)
  scan     ``tokenprobe scan --top N --layers all`` (one probe per target and layer, the same figures per
           target, scan.json/csv, heatmap, report, every probe file)

``--repeats`` times each, alternating which goes first; medians. The ratio scan / single is what the
issue bounds (at most 1.3 for 100 targets). Each prints the tokens its forward pass ran: a scan runs a
few more (its shared sample reaches to the end of more chunks, where a single-target run stops each
chunk at its last sampled position), and that is part of its cost. A scan's other extra cost is per
target (its fits, its scoring, its share of the full-vocabulary softmax), so the ratio falls as the
tokens grow.

    python benchmarks/scan.py                              # 300k tokens, 100 targets: about 6 minutes on 2 cores
    python benchmarks/scan.py --max-tokens 120000 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tokenprobe import RunConfig, load_model, train
from tokenprobe.device import dtype_name
from tokenprobe.files import default_cache_dir
from tokenprobe.pipelines.scan import SCAN_DEFAULTS, ScanOptions, scan

TARGET = 1.3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=300_000)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", default="gemma-3-270m")
    args = parser.parse_args(argv)

    cache = default_cache_dir()
    loaded = load_model(args.model, "auto", "auto", cache, progress=False)
    single = RunConfig(model=args.model, layers="all", max_tokens=args.max_tokens)
    scanned = RunConfig(model=args.model, layers="all", max_tokens=args.max_tokens, **SCAN_DEFAULTS)
    work = Path(tempfile.mkdtemp(prefix="tokenprobe-bench-scan-"))
    times: dict[str, list[float]] = {"single": [], "scan": []}
    details: dict[str, dict] = {}
    try:
        for repeat in range(args.repeats):
            order = ("single", "scan") if repeat % 2 == 0 else ("scan", "single")
            for name in order:
                out = work / f"{name}-{repeat}"
                started = time.perf_counter()
                if name == "single":
                    result = train(single, out_dir=out, loaded=loaded, progress=False)
                    details[name] = {"tokens": result.record["extraction"]["tokens"], **result.record["timings"]}
                else:
                    result = scan(scanned, ScanOptions(top=args.top), out_dir=out, loaded=loaded, progress=False)
                    details[name] = {"tokens": result.record["extraction"]["tokens"], **result.scan["timings"]}
                times[name].append(time.perf_counter() - started)
                print(f"  {name:<6} repeat {repeat + 1}: {times[name][-1]:7.1f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    print(f"\nmodel {loaded.name} ({dtype_name(loaded.dtype)}), {os.cpu_count()} CPUs ({cpu}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; --max-tokens {args.max_tokens:,}, --layers all, "
          f"{args.repeats} repeat(s), medians")
    for name in ("single", "scan"):
        d = details[name]
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in d.items()
                           if k.endswith("_s") and k not in ("total_s",) and v >= 0.5)
        print(f"  {name:<6} {statistics.median(times[name]):7.1f} s  ({d['tokens']:,} tokens forwarded; {stages})")
    ratio = statistics.median(times["scan"]) / statistics.median(times["single"])
    print(f"\nscan of {args.top} targets / single target: {ratio:.2f}x  (target: at most {TARGET}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
