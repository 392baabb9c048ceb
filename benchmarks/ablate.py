"""Benchmark: `tokenprobe ablate`'s edited passes started from the clean residual at their layer, against
full forward passes with the edit hooked in (the same edits, the same chunks, one process).

An edit at layer L cannot change blocks below L, so a pass can start from the clean residual at L; over
all layers that should cost about half of the full passes (a pass still runs blocks L..N, and the
unembedding at the measured positions is the same in both). This measures it on the default model:
`--layers` edits (each with `--random` random directions too), alternating which goes first.

    python benchmarks/ablate.py                         # layers 1,6,12,18, 3 random: about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np
import torch

from tokenprobe import RunConfig, load_model
from tokenprobe.data.labels import make_labeler
from tokenprobe.data.prepare import prepare_chunks
from tokenprobe.device import dtype_name
from tokenprobe.files import default_cache_dir
from tokenprobe.pipelines.ablate import Passes, unit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,6,12,18")
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    cache = default_cache_dir()
    loaded = load_model("gemma-3-270m", "auto", "auto", cache, progress=False)
    config = RunConfig()
    prepared = prepare_chunks(config, loaded, cache, progress=False)
    chunks = prepared.chunks[np.sort(prepared.split.eval[: math.ceil(args.max_tokens / config.context_length)])]
    labels, valid = make_labeler("next", [506]).labels(chunks, has_bos=prepared.bos_id is not None)
    targets = np.argwhere(labels & valid)
    others = np.argwhere(~labels & valid)[:128]
    layers = [int(x) for x in args.layers.split(",")]
    generator = torch.Generator().manual_seed(0)
    edits = [(layer, unit(torch.randn(loaded.hidden_size, generator=generator)), "project", 0.0)
             for layer in layers for _ in range(1 + args.random)]
    times: dict[str, list[float]] = {"resumed": [], "full": []}
    for repeat in range(args.repeats):
        for name in (("resumed", "full") if repeat % 2 == 0 else ("full", "resumed")):
            passes = Passes(loaded, chunks, targets, others, batch_size=8, resume=name == "resumed")
            passes.run()  # the clean pass (both keep the residual), not timed
            started = time.perf_counter()
            for edit in edits:
                passes.run(edit)
            times[name].append(time.perf_counter() - started)
            print(f"  {name:<8} repeat {repeat + 1}: {times[name][-1]:6.1f} s for {len(edits)} edited passes",
                  flush=True)
    resumed, full = statistics.median(times["resumed"]), statistics.median(times["full"])
    print(f"\nmodel {loaded.name} ({dtype_name(loaded.dtype)}), {os.cpu_count()} CPUs ({platform.machine()}), "
          f"{torch.get_num_threads()} threads; {len(chunks)} chunks ({chunks.size:,} tokens), layers {args.layers}, "
          f"{len(edits)} edited passes, medians of {args.repeats}")
    print(f"resumed from the clean residual: {resumed:.1f} s; full passes: {full:.1f} s; ratio {resumed / full:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
