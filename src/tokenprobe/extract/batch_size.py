"""``--batch-size auto``: the largest batch that fits on CUDA, the fastest one on the CPU.

On CUDA the memory of one and of two chunks is measured on a real forward pass (truncated at the
deepest requested layer, as extraction runs it), and the batch is as many chunks as 80% of the free
memory holds. On the CPU a larger batch only helps while it raises throughput, so a short probe
times doubling batches through the first blocks of the stack (throughput per block is the same all
the way up), each after a warm-up call, and keeps the largest within 5% of the fastest, within a
share of the available memory. The probe costs at most 3% of the run's forward pass: a run too
short for that uses the default batch size, and says so.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tokenprobe.device import available_memory_bytes
from tokenprobe.extract.capture import LayerCapture
from tokenprobe.models.loading import LoadedModel

CPU_MAX_BATCH = 64
PROBE_DEPTH = 2  # blocks run per CPU throughput probe
CALLS_PER_SIZE = 3  # a warm-up round, then the best of two timed rounds
PROBE_BUDGET = 0.03  # the probe may cost at most this share of the run's forward pass
MIN_SIZES_PROBED = 5  # 1 to 16: a probe that cannot reach the default batch size is not run
FALLBACK_BATCH_SIZE = 16  # the default --batch-size
NEAR_BEST = 0.95  # a batch this close to the fastest rate counts as fast


def _cpu_bytes_per_chunk(loaded: LoadedModel, context_length: int) -> int:
    """A generous estimate of one chunk's working memory in one block (MLP, attention scores)."""
    config = loaded.model.config.get_text_config()
    hidden = loaded.hidden_size
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 8))
    element = torch.finfo(loaded.dtype).bits // 8
    return context_length * (4 * intermediate + 8 * hidden) * element + heads * context_length**2 * 4


def _run(loaded: LoadedModel, capture: LayerCapture, input_ids: torch.Tensor) -> None:
    rows = torch.zeros(1, dtype=torch.long, device=loaded.placement.input)
    cols = torch.zeros(1, dtype=torch.long, device=loaded.placement.input)
    capture.run(loaded.model, input_ids, rows, cols)


def choose_batch_size(loaded: LoadedModel, chunks: np.ndarray, wanted_chunks: int, layers: list[int],
                      processes: int = 1) -> tuple[int, str]:
    """The batch size for `--batch-size auto`, and a line saying why. `wanted_chunks`: the chunks this process
    runs (a distributed rank's share); `processes`: how many share this machine's memory."""
    context_length = chunks.shape[1]
    sample = torch.from_numpy(chunks[: min(len(chunks), CPU_MAX_BATCH)])
    with torch.inference_mode():
        if loaded.placement.input.type == "cuda":
            return _cuda_batch_size(loaded, sample, wanted_chunks, layers)
        return _cpu_batch_size(loaded, sample, wanted_chunks, context_length, processes)


def _cuda_batch_size(loaded, sample, wanted_chunks, layers):
    peaks = []
    with LayerCapture(loaded, [max(layers)]) as capture:
        for n in (1, 2):
            torch.cuda.synchronize(loaded.placement.input)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(loaded.placement.input)
            base = torch.cuda.memory_allocated(loaded.placement.input)
            _run(loaded, capture, sample[[i % len(sample) for i in range(n)]].to(loaded.placement.input))
            torch.cuda.synchronize(loaded.placement.input)
            peaks.append(torch.cuda.max_memory_allocated(loaded.placement.input) - base)
    per_chunk = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_chunk, 0)
    free, _ = torch.cuda.mem_get_info(loaded.placement.input)
    fits = max(1, int((0.8 * free - fixed) // per_chunk))
    size = max(1, min(fits, wanted_chunks))
    why = (f"{per_chunk / 2**20:.0f} MiB per chunk of {sample.shape[1]} tokens, {free / 2**30:.1f} GiB free: "
           f"{fits} chunks fit in 80% of it" + (f"; the run has only {wanted_chunks} chunks" if size < fits else ""))
    return size, why


def _cpu_batch_size(loaded, sample, wanted_chunks, context_length, processes=1):
    available = available_memory_bytes()
    per_chunk = _cpu_bytes_per_chunk(loaded, context_length)
    limit = min(CPU_MAX_BATCH, len(sample), max(1, wanted_chunks))
    if available is not None:
        limit = max(1, min(limit, int(0.5 * available / processes // per_chunk)))
    depth = min(PROBE_DEPTH, loaded.loaded_blocks)  # a model loaded in part has only its first blocks
    # Chunks the probe may run through `depth` blocks: a share of what the run itself computes.
    budget = PROBE_BUDGET * wanted_chunks * loaded.loaded_blocks / depth
    sizes = [n for n in (2**k for k in range(CPU_MAX_BATCH.bit_length())) if n <= limit]
    affordable = [n for i, n in enumerate(sizes) if CALLS_PER_SIZE * sum(sizes[: i + 1]) <= budget]
    if len(affordable) < MIN_SIZES_PROBED and len(sizes) >= MIN_SIZES_PROBED:
        size = min(FALLBACK_BATCH_SIZE, limit)
        return size, (f"the run ({wanted_chunks:,} chunks) is too short for a throughput probe to pay for itself; "
                      f"using {size}")
    # Sizes are timed in turns (a warm-up round, then the best of the timed rounds), so a slow moment
    # of a busy machine does not fall on one size alone.
    seconds: dict[int, float] = {n: float("inf") for n in affordable}
    with LayerCapture(loaded, [depth]) as capture:
        for round_ in range(CALLS_PER_SIZE):
            for n in affordable:
                t = time.perf_counter()
                _run(loaded, capture, sample[:n].to(loaded.placement.input))
                if round_:  # the first call at a new shape sets up its kernels
                    seconds[n] = min(seconds[n], time.perf_counter() - t)
    rates = {n: n * sample.shape[1] / seconds[n] for n in affordable}
    # The largest batch within NEAR_BEST of the fastest: throughput is flat near the peak, the probe is
    # noisy there, and a real run's fixed cost per batch (hooks, gathering, saving) favours larger batches.
    fastest = max(rates.values())
    best = max(size for size, rate in rates.items() if rate >= NEAR_BEST * fastest)
    listed = ", ".join(f"{size}: {rate:,.0f}" for size, rate in rates.items())
    cut = affordable[-1] < limit
    return best, (f"the largest within {1 - NEAR_BEST:.0%} of the fastest in a throughput probe through {depth} "
                  f"block(s), tokens/s by batch: {listed}"
                  + (f"; larger batches not tried (the probe may cost at most {PROBE_BUDGET:.0%} of the run)"
                     if cut else ""))
