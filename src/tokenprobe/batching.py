"""``--batch-size auto``: the largest batch that fits on CUDA, the fastest one on the CPU.

On CUDA the memory of one and of two chunks is measured on a real forward pass (truncated at the
deepest requested layer, as extraction runs it), and the batch is as many chunks as 80% of the free
memory holds. On the CPU a larger batch only helps while it raises throughput, so a short probe
times doubling batches through the first blocks of the stack (throughput per block is the same all
the way up) and keeps the fastest, within a share of the available memory.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from tokenprobe.activations import LayerCapture
from tokenprobe.models import LoadedModel

CPU_MAX_BATCH = 64
PROBE_DEPTH = 2  # blocks run per CPU throughput probe


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return None


def _cpu_bytes_per_chunk(loaded: LoadedModel, context_length: int) -> int:
    """A generous estimate of one chunk's working memory in one block (MLP, attention scores)."""
    config = loaded.model.config.get_text_config()
    hidden = loaded.hidden_size
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 8))
    element = torch.finfo(loaded.dtype).bits // 8
    return context_length * (4 * intermediate + 8 * hidden) * element + heads * context_length**2 * 4


def _run(loaded: LoadedModel, capture: LayerCapture, input_ids: torch.Tensor) -> None:
    rows = torch.zeros(1, dtype=torch.long, device=loaded.device)
    cols = torch.zeros(1, dtype=torch.long, device=loaded.device)
    capture.run(loaded.model, input_ids, rows, cols)


def choose_batch_size(loaded: LoadedModel, chunks: np.ndarray, wanted_chunks: int, layers: list[int]) -> tuple[int, str]:
    """The batch size for `--batch-size auto`, and a line saying why."""
    context_length = chunks.shape[1]
    sample = torch.from_numpy(chunks[: min(len(chunks), CPU_MAX_BATCH)])
    with torch.inference_mode():
        if loaded.device.type == "cuda":
            return _cuda_batch_size(loaded, sample, wanted_chunks, layers)
        return _cpu_batch_size(loaded, sample, wanted_chunks, context_length)


def _cuda_batch_size(loaded, sample, wanted_chunks, layers):
    peaks = []
    with LayerCapture(loaded, [max(layers)]) as capture:
        for n in (1, 2):
            torch.cuda.synchronize(loaded.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(loaded.device)
            base = torch.cuda.memory_allocated(loaded.device)
            _run(loaded, capture, sample[[i % len(sample) for i in range(n)]].to(loaded.device))
            torch.cuda.synchronize(loaded.device)
            peaks.append(torch.cuda.max_memory_allocated(loaded.device) - base)
    per_chunk = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_chunk, 0)
    free, _ = torch.cuda.mem_get_info(loaded.device)
    fits = max(1, int((0.8 * free - fixed) // per_chunk))
    size = max(1, min(fits, wanted_chunks))
    why = (f"{per_chunk / 2**20:.0f} MiB per chunk of {sample.shape[1]} tokens, {free / 2**30:.1f} GiB free: "
           f"{fits} chunks fit in 80% of it" + (f"; the run has only {wanted_chunks} chunks" if size < fits else ""))
    return size, why


def _cpu_batch_size(loaded, sample, wanted_chunks, context_length):
    available = _available_memory_bytes()
    per_chunk = _cpu_bytes_per_chunk(loaded, context_length)
    limit = min(CPU_MAX_BATCH, len(sample), max(1, wanted_chunks))
    if available is not None:
        limit = max(1, min(limit, int(0.5 * available // per_chunk)))
    depth = min(PROBE_DEPTH, loaded.num_layers)
    best, best_rate, rates, stopped = 1, 0.0, [], False
    with LayerCapture(loaded, [depth]) as capture:
        _run(loaded, capture, sample[:1].to(loaded.device))  # warm-up: first-call allocations
        n = 1
        while n <= limit:
            input_ids = sample[:n].to(loaded.device)
            seconds = []
            for _ in range(2):
                t = time.perf_counter()
                _run(loaded, capture, input_ids)
                seconds.append(time.perf_counter() - t)
            rate = input_ids.numel() / min(seconds)
            rates.append(f"{n}: {rate:,.0f}")
            if rate > best_rate * 1.03:  # a larger batch must be clearly faster to be worth its memory
                best, best_rate = n, rate
            elif rate < 0.9 * best_rate:
                stopped = True
                break  # past the peak
            n *= 2
    why = (f"fastest in a throughput probe through {depth} block(s), tokens/s by batch: {', '.join(rates)}"
           + ("" if stopped or limit >= CPU_MAX_BATCH else f"; capped at {limit} by memory and the run's chunks"))
    return best, why
