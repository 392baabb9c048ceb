"""Benchmark: what probe families and the control task add to a run's wall time.

One run's forward pass is shared by every family (``--probe linear,mlp,mean-diff,sparse --control``),
so the extra cost is in fitting and scoring. This benchmark runs tokenprobe's own stages once up to the
activations (model, data, the forward pass over the run's positions, every layer kept in memory),
then, from those same activations, takes turns between

  linear     ``--probe linear --no-control``: the linear probes, the baselines, the bootstrap intervals
  families   ``--probe linear,mlp,mean-diff,sparse --control``: every family on the task and on the control
             task, the baselines, the intervals, and every family scored side by side

for the layers of ``--layers auto`` (5 on Gemma 3 270M) and of ``--layers all`` (19), ``--repeats`` times
each. A run's wall time is the stages before the forward pass, the forward pass and these; so the
overhead of families on a run is (rest + families) / (rest + linear), with the rest measured once in the
same process (the forward pass captures every layer once; ``auto`` runs stop after the same last layer,
so their forward pass costs the same). Medians of the repeats; the turns alternate which goes first.

    python benchmarks/families.py                   # the default run's data: about 25 minutes on 2 cores
    python benchmarks/families.py --max-tokens 60000 --repeats 2   # a quick look

Targets (issue 14): at most 1.25x for ``auto``, at most 1.40x for ``all``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenprobe import RunConfig, load_model
from tokenprobe.analysis.families import score_families
from tokenprobe.analysis.scoring import score_run
from tokenprobe.config import parse_layers
from tokenprobe.data.prepare import prepare
from tokenprobe.device import dtype_name
from tokenprobe.extract.extract import extract_positions
from tokenprobe.files import default_cache_dir
from tokenprobe.pipelines.train import fit_stage

TARGETS = {"auto": 1.25, "all": 1.40}


def probe_stages(config: RunConfig, loaded, prepared, source, layers: list[int]) -> float:
    """Seconds for everything after the forward pass that depends on the families: fits, scores."""
    started = time.perf_counter()
    fitted = fit_stage(config, loaded, prepared, source, layers, progress=False, timings={})
    score_run(loaded, prepared, source, fitted.primary, config.baselines, config.bootstrap, config.seed)
    if len(fitted.probes) > 1 or fitted.control is not None:
        score_families(prepared, source, fitted.probes, fitted.control, fitted.control_labels,
                       fitted.control_task.record() if fitted.control_task else None, config.bootstrap, config.seed)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=None, help="as for train (default: the whole corpus)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    base = RunConfig(max_tokens=args.max_tokens, batch_size=args.batch_size)
    t0 = time.perf_counter()
    loaded = load_model(base.model, base.dtype, base.device, progress=False)
    cache = default_cache_dir()
    prepared = prepare(base, loaded, cache, progress=False)
    before_forward = time.perf_counter() - t0
    every = parse_layers("all", loaded.num_layers)
    t = time.perf_counter()
    source, stats = extract_positions(loaded, prepared.chunks, prepared.positions, every, args.batch_size,
                                      progress=True)
    forward = time.perf_counter() - t
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; model {loaded.name} in {dtype_name(loaded.dtype)}")
    print(f"positions: {len(prepared.positions):,}; forward pass {stats.tokens:,} tokens in {forward:.1f} s; "
          f"load and data {before_forward:.1f} s")

    ok = True
    for spec in ("auto", "all"):
        layers = parse_layers(spec, loaded.num_layers)
        configs = {
            "linear": RunConfig(**{**base.to_dict(), "layers": spec, "probe": "linear", "control": False}),
            "families": RunConfig(**{**base.to_dict(), "layers": spec, "probe": "linear,mlp,mean-diff,sparse",
                                     "control": True}),
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            order = list(configs) if repeat % 2 == 0 else list(reversed(configs))
            for name in order:
                times[name].append(probe_stages(configs[name], loaded, prepared, source, layers))
        linear, families = (statistics.median(times[name]) for name in ("linear", "families"))
        rest = before_forward + forward
        ratio = (rest + families) / (rest + linear)
        ok &= ratio <= TARGETS[spec]
        print(f"--layers {spec} ({len(layers)} layers): linear {linear:.1f} s, families+control {families:.1f} s "
              f"(repeats: {', '.join(f'{x:.1f}' for x in times['linear'])} / "
              f"{', '.join(f'{x:.1f}' for x in times['families'])})")
        print(f"  run wall time: {rest + linear:.0f} s -> {rest + families:.0f} s = {ratio:.3f}x "
              f"(target at most {TARGETS[spec]:.2f}x: {'met' if ratio <= TARGETS[spec] else 'NOT met'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
