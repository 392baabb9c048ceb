"""One forward pass per batch feeds every requested layer.

Hooks on the decoder blocks copy the residual stream at the sampled positions only (as float32)
and the pass is stopped by an exception right after the deepest requested layer, so the remaining
blocks, the final norm and the full-vocabulary unembedding are never computed.

Layer 0 is the input of the first block (the embedding output, scaled or with positions added as
the model does); layer l >= 1 is the output of block l-1. These match ``output_hidden_states``
except for the last layer, which transformers reports after the final norm and we report before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprobe.errors import TokenprobeError
from tokenprobe.models import LoadedModel
from tokenprobe.positions import PositionSet


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer to end the forward pass early."""


@dataclass
class Activations:
    layers: list[int]
    values: torch.Tensor  # (len(layers), n_positions, hidden) float32, on the CPU
    keep: np.ndarray  # bool per position: False where its batch had NaN/Inf
    batches: int = 0
    bad_batches: int = 0
    bad_layers: dict[int, int] = field(default_factory=dict)  # layer -> batches with NaN/Inf there
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


class LayerCapture:
    """Context manager that hooks the requested layers of a model for one batch at a time."""

    def __init__(self, loaded: LoadedModel, layers: list[int]):
        self.stack = loaded.layer_stack
        self.layers = sorted(layers)
        self.deepest = self.layers[-1]
        self.handles: list = []
        self.captured: dict[int, torch.Tensor] = {}
        self.nonfinite: set[int] = set()
        self.rows: torch.Tensor | None = None  # batch row of each wanted position
        self.cols: torch.Tensor | None = None  # position within the chunk

    def _store(self, layer: int, hidden: torch.Tensor) -> None:
        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        if not torch.isfinite(hidden).all():
            self.nonfinite.add(layer)
        self.captured[layer] = hidden[self.rows, self.cols].float()
        if layer == self.deepest:
            raise _StopForward

    def __enter__(self) -> LayerCapture:
        for layer in self.layers:
            if layer == 0:
                def pre_hook(module, args, kwargs, _layer=layer):
                    self._store(_layer, args[0] if args else kwargs["hidden_states"])
                self.handles.append(self.stack[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(module, args, output, _layer=layer):
                    self._store(_layer, output)
                self.handles.append(self.stack[layer - 1].register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """Hidden states at (rows, cols) for every hooked layer, and the layers that were not finite."""
        self.captured, self.nonfinite = {}, set()
        self.rows, self.cols = rows, cols
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        else:
            raise RuntimeError("the forward pass never reached the deepest requested layer")
        return self.captured, self.nonfinite


def dtype_advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 overflows in this model; use --dtype bfloat16 (or float32)"
    if dtype == torch.bfloat16:
        return "try --dtype float32"
    return "check the model's weights: they give NaN/Inf even in float32"


def extract(
    loaded: LoadedModel,
    chunks: np.ndarray,
    positions: PositionSet,
    layers: list[int],
    batch_size: int,
    progress: bool = True,
) -> Activations:
    """Runs every chunk that holds a sampled position once and keeps those positions at `layers`."""
    wanted = np.unique(positions.chunk)
    order = np.argsort(positions.chunk, kind="stable")
    starts = np.searchsorted(positions.chunk[order], wanted)
    ends = np.append(starts[1:], len(order))
    values = torch.empty((len(layers), len(positions), loaded.hidden_size), dtype=torch.float32)
    keep = np.ones(len(positions), dtype=bool)
    result = Activations(layers=sorted(layers), values=values, keep=keep)
    slot = {layer: i for i, layer in enumerate(result.layers)}
    context_length = chunks.shape[1]
    device = loaded.device

    bar = tqdm(total=len(wanted) * context_length, desc="Forward pass", unit="tok", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    with LayerCapture(loaded, layers) as capture, torch.inference_mode(), bar:
        for b in range(0, len(wanted), batch_size):
            batch_chunks = wanted[b : b + batch_size]
            index = np.concatenate([order[starts[b + i] : ends[b + i]] for i in range(len(batch_chunks))])
            rows = np.repeat(np.arange(len(batch_chunks)), ends[b : b + len(batch_chunks)] - starts[b : b + len(batch_chunks)])
            input_ids = torch.from_numpy(chunks[batch_chunks]).to(device)
            captured, nonfinite = capture.run(
                loaded.model, input_ids,
                torch.from_numpy(rows).to(device), torch.from_numpy(positions.position[index]).to(device),
            )
            result.batches += 1
            if nonfinite:
                result.bad_batches += 1
                for layer in nonfinite:
                    result.bad_layers[layer] = result.bad_layers.get(layer, 0) + 1
                keep[index] = False
                if result.batches >= 4 and result.bad_batches == result.batches:
                    break  # every batch so far is bad: stop now rather than after the whole corpus
            else:
                for layer, hidden in captured.items():
                    values[slot[layer], torch.from_numpy(index)] = hidden.cpu()
            result.tokens += input_ids.numel()
            bar.update(input_ids.numel())
            if result.bad_batches:
                bar.set_postfix_str(f"{result.bad_batches} bad batches skipped")
    result.seconds = time.perf_counter() - started
    if result.bad_batches * 2 > result.batches:
        first_bad = min(result.bad_layers)
        raise TokenprobeError(
            f"{result.bad_batches} of {result.batches} batches had NaN/Inf hidden states "
            f"(from layer {first_bad} on) in {str(loaded.dtype).replace('torch.', '')}: {dtype_advice(loaded.dtype)}"
        )
    return result
