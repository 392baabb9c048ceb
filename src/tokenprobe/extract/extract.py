"""One forward pass per batch feeds every requested layer.

Hooks on the decoder blocks copy the residual stream at the sampled positions only, in the dtype
the model computes it in (bfloat16 activations are kept as bfloat16: a float32 copy would double the
memory and add no information; they become float32 one layer at a time where probes are fitted), and
the pass is stopped by an exception right after the deepest requested layer, so the remaining blocks,
the final norm and the full-vocabulary unembedding are never computed. Each finished batch goes to
the run's sinks (memory, resume checkpoint).

Layer 0 is the input of the first block (the embedding output, scaled or with positions added as
the model does); layer l >= 1 is the output of block l-1. These match ``output_hidden_states``
except for the last layer, which transformers reports after the final norm and we report before it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.device import dtype_name, is_out_of_memory, release_memory
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.capture import LayerCapture
from tokenprobe.extract.plan import RunPlan
from tokenprobe.data.positions import PositionSet
from tokenprobe.extract.peers import Peers
from tokenprobe.extract.sinks import ActivationSink, CheckpointSink, MemorySink
from tokenprobe.models.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class ExtractionStats:
    """What one extraction did: batches computed, resumed and skipped, tokens and time."""

    batches: int = 0
    bad_batches: int = 0
    bad_layers: dict[int, int] = field(default_factory=dict)  # layer -> batches with NaN/Inf there
    resumed_batches: int = 0  # read back from an interrupted run's checkpoint instead of recomputed
    batch_size: int = 0  # the batch size used (smaller than asked for after an out-of-memory retry)
    tokens: int = 0  # run through the model by this call
    resumed_tokens: int = 0  # of the batches read back instead (not counted in `tokens` or its rate)
    seconds: float = 0.0
    share_seconds: float = 0.0  # a distributed run's rank: its own batches, without waiting for the others

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def record(self) -> dict:
        return {"batches": self.batches, "bad_batches": self.bad_batches, "resumed_batches": self.resumed_batches,
                "batch_size": self.batch_size, "bad_layers": self.bad_layers, "tokens": self.tokens,
                "resumed_tokens": self.resumed_tokens, "tokens_per_second": self.tokens_per_second}


def dtype_advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 overflows in this model; use --dtype bfloat16 (or float32)"
    if dtype == torch.bfloat16:
        return "try --dtype float32"
    return "check the model's weights: they give NaN/Inf even in float32"


def extract(
    loaded: LoadedModel,
    chunks: np.ndarray,
    plan: RunPlan,
    positions: np.ndarray,
    layers: list[int],
    batch_size: int,
    sinks: list[ActivationSink],
    resume: CheckpointSink | None = None,
    progress: bool = True,
    peers: Peers | None = None,
) -> ExtractionStats:
    """Runs every batch of `plan` once, up to its chunks' last sampled position, and writes the hidden
    states at the sampled positions (`positions`: the position within its chunk of each row) of
    every layer in `layers` to each sink.

    Batches `resume` already holds (an interrupted run's) are read back instead of recomputed and go
    to the other sinks. Out of memory on the first batch this call computes halves the batch size and
    retries (and says so); later, it is an error naming the size.

    With `peers` (a distributed run) this rank runs only the batches its world owns, by batch number,
    and never changes the batch size (every rank must cut the same batches); rank 0 then waits for the
    other ranks' batches, its bar counting every rank's tokens.
    """
    layers = sorted(layers)
    stats = ExtractionStats()
    context_length = chunks.shape[1]
    device = loaded.placement.input

    bar = tqdm(total=plan.tokens(batch_size), desc="Forward pass", unit="tok", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    computed = 0
    stopped_early = False
    b = 0
    with LayerCapture(loaded, layers) as capture, torch.inference_mode(), bar:
        while b < len(plan.chunks):
            if peers is not None and not peers.world.owns(b // batch_size):
                b += batch_size  # another rank's (never cut: under peers the batch size does not change)
                continue
            batch = plan.batch(b, batch_size)
            done = resume.read(batch, layers) if resume is not None else None
            if done is not None:
                captured, nonfinite = done
                stats.resumed_batches += 1
            else:
                input_ids = torch.from_numpy(chunks[batch.chunks, : batch.length]).to(device)
                try:
                    captured, nonfinite = capture.run(
                        loaded.model, input_ids,
                        torch.from_numpy(batch.rows).to(device), torch.from_numpy(positions[batch.index]).to(device),
                    )
                except KeyboardInterrupt:
                    if resume is not None:
                        print(f"\nInterrupted: {stats.batches} finished batches are kept in {resume.folder}; "
                              "run the same command again to resume", file=sys.stderr, flush=True)
                    raise
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    release_memory(device)
                    if computed == 0 and batch_size > 1 and peers is None:
                        bar.clear()
                        log.warning(f"out of memory on the first batch at --batch-size {batch_size}; "
                                    f"retrying with --batch-size {batch_size // 2}")
                        batch_size //= 2
                        bar.total = plan.tokens(batch_size)
                        continue
                    raise TokenprobeError(
                        f"out of memory at --batch-size {batch_size} (batch {b // batch_size + 1}, "
                        f"{len(batch.chunks)} chunks of {context_length} tokens on {device}); "
                        + (f"use --batch-size {batch_size // 2} or a smaller --context-length" + (
                            " (with several processes the batch size is not halved by itself: every rank must cut "
                            "the same batches)" if peers is not None and computed == 0 else "") if batch_size > 1 else
                           "even one chunk does not fit: use a smaller --context-length or --dtype bfloat16")
                    ) from exc
                computed += 1
            for sink in sinks:
                if done is None or sink is not resume:
                    sink.write(batch, captured, nonfinite)
            b += len(batch.chunks)
            stats.batches += 1
            if nonfinite:
                stats.bad_batches += 1
                for layer in nonfinite:
                    stats.bad_layers[layer] = stats.bad_layers.get(layer, 0) + 1
                if stats.batches >= 4 and stats.bad_batches == stats.batches:
                    stopped_early = True
                    break  # every batch so far is bad: stop now rather than after the whole corpus
            if done is None:
                stats.tokens += len(batch.chunks) * batch.length
            else:
                stats.resumed_tokens += len(batch.chunks) * batch.length
            bar.update(len(batch.chunks) * batch.length)
            if stats.bad_batches:
                bar.set_postfix_str(f"{stats.bad_batches} bad batches skipped")
            if peers is not None:
                peers.batch_done(stats.batches)
                if peers.world.main:
                    bar.update(peers.landed())
                peers.check()
        stats.share_seconds = time.perf_counter() - started
        if peers is not None and peers.world.main and not stopped_early:
            peers.final = peers.wait(bar.update)
            peers.stop()  # every batch is in: rank 0's heartbeat has nobody left to tell
    stats.seconds = time.perf_counter() - started
    stats.batch_size = batch_size
    release_memory(device)  # the forward pass's working memory, before probes and baselines need theirs
    if peers is None or stopped_early:  # a distributed run's rank 0 checks every rank's batches together
        check_bad_batches(stats, loaded.dtype)
    return stats


def check_bad_batches(stats: ExtractionStats, dtype: torch.dtype) -> None:
    """Stops the run when most batches had NaN/Inf hidden states, naming the dtype to use."""
    if stats.bad_batches * 2 > stats.batches:
        first_bad = min(stats.bad_layers)
        raise TokenprobeError(
            f"{stats.bad_batches} of {stats.batches} batches had NaN/Inf hidden states "
            f"(from layer {first_bad} on) in {dtype_name(dtype)}: {dtype_advice(dtype)}"
        )


def extract_positions(
    loaded: LoadedModel,
    chunks: np.ndarray,
    positions: PositionSet,
    layers: list[int],
    batch_size: int,
    checkpoint: CheckpointSink | None = None,
    progress: bool = True,
) -> tuple[MemorySink, ExtractionStats]:
    """`extract` of a PositionSet into memory (and into `checkpoint`, read back where a run was
    interrupted): the activations of every layer at every position, and what the pass did."""
    memory = MemorySink(layers, len(positions), loaded.hidden_size, loaded.dtype)
    sinks: list[ActivationSink] = [memory] + ([checkpoint] if checkpoint is not None else [])
    stats = extract(loaded, chunks, RunPlan.of(positions), positions.position, layers, batch_size, sinks,
                    resume=checkpoint, progress=progress)
    return memory, stats


def extract_chunks(
    loaded: LoadedModel, chunks: list[np.ndarray], layers: list[int], batch_size: int = 8, progress: bool = False,
) -> tuple[MemorySink, np.ndarray]:
    """Every position of every chunk (token-id arrays of any lengths), through `extract`: rows in
    order, chunk after chunk; returns them and the chunks' lengths. Chunks are padded to one width; a
    causal model never looks ahead, and each batch runs only to its longest chunk's end. ``keep`` is
    False at the positions of a batch whose hidden states were not finite."""
    lengths = np.asarray([len(chunk) for chunk in chunks], dtype=np.int64)
    if not len(chunks) or lengths.min() < 1:
        raise TokenprobeError("nothing to run: every chunk needs at least one token")
    padded = np.zeros((len(chunks), int(lengths.max())), dtype=np.int64)
    for i, chunk in enumerate(chunks):
        padded[i, : len(chunk)] = chunk
    n = int(lengths.sum())
    positions = PositionSet(chunk=np.repeat(np.arange(len(chunks)), lengths),
                            position=np.concatenate([np.arange(length) for length in lengths]),
                            label=np.zeros(n, dtype=bool), subset=np.zeros(n, dtype=np.int8))
    memory, _ = extract_positions(loaded, padded, positions, layers, batch_size, progress=progress)
    return memory, lengths
