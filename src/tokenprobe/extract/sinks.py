"""Where extraction puts each finished batch (sinks), and where probes read layers from (sources).

- :class:`MemorySink`: every sampled position of every extracted layer in one tensor per layer, in
  the model's dtype, on the CPU. It is also the :class:`ActivationSource` probes and scores read.
- :class:`CheckpointSink`: extraction that survives Ctrl-C and kill, one checksummed shard per
  finished batch under ``<cache>/extraction/<key>/bs<batch size>/batch<n>.safetensors``, written
  atomically as soon as the batch is done. The key is a hash of everything that decides the
  activations: the model's weights and tokenizer hashes, dtype, device type, layers, and the exact
  chunks and positions (which already encode the corpus, context length, task, target, seed, split
  and sample sizes). Running the same command again finds the folder and reads the finished batches
  instead of recomputing them, checking each against its checksum and its expected positions; a
  shard that fails either is recomputed. Batches are independent, so the resumed run ends with exactly
  the activations of an uninterrupted one. The folder is deleted once the run has been published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from tokenprobe.extract.plan import Batch
from tokenprobe.files import atomic_write_bytes, write_json

FORMAT_VERSION = "2"  # 2: batches of chunks cut at their last sampled position, longest first


class ActivationSink(Protocol):
    """Receives each finished batch: the hidden states at its positions, per layer, or only the layers
    where they were not finite (then the batch's positions are unusable)."""

    def write(self, batch: Batch, captured: dict[int, torch.Tensor], nonfinite: set[int]) -> None: ...


class ActivationSource(Protocol):
    """Activations of sampled positions, read one layer at a time."""

    layers: list[int]
    keep: np.ndarray  # bool per position: False where its batch had NaN/Inf

    def layer(self, layer: int) -> torch.Tensor:
        """(positions, hidden) hidden states of one layer, in the model's dtype."""
        ...


class MemorySink:
    """All layers in memory: (layers, positions, hidden) on the CPU, in the model's dtype."""

    def __init__(self, layers: list[int], n_positions: int, hidden_size: int, dtype: torch.dtype):
        self.layers = sorted(layers)
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        store = dtype if dtype.is_floating_point else torch.float32
        self.values = torch.empty((len(self.layers), n_positions, hidden_size), dtype=store)
        self.keep = np.ones(n_positions, dtype=bool)

    def write(self, batch: Batch, captured: dict[int, torch.Tensor], nonfinite: set[int]) -> None:
        if nonfinite:
            self.keep[batch.index] = False
            return
        index = torch.from_numpy(batch.index)
        for layer, hidden in captured.items():
            self.values[self.slot[layer], index] = hidden.cpu()

    def layer(self, layer: int) -> torch.Tensor:
        return self.values[self.slot[layer]]


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        # The tensor's own bytes, without a copy (bfloat16 has no numpy type, so viewed as bytes)
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def shard_name(first: int) -> str:
    """The file of the batch whose first chunk is the plan's `first`, in its batch size's folder."""
    return f"batch{first:06d}.safetensors"


def shard_path(folder: Path, batch_size: int, first: int) -> Path:
    return Path(folder) / f"bs{batch_size}" / shard_name(first)


class CheckpointSink:
    """The shards of one extraction; `folder` is keyed by what decides the activations. A sink, and on a
    rerun the place finished batches are read back from."""

    def __init__(self, folder: Path, ingredients: dict | None = None):
        self.folder = Path(folder)
        self.ingredients = ingredients or {}

    @classmethod
    def for_run(cls, cache_dir: Path, loaded, chunks: np.ndarray, positions, layers: list[int]) -> CheckpointSink:
        wanted = np.unique(positions.chunk)
        ingredients = {
            "format": FORMAT_VERSION,
            "model": loaded.source,
            "weights_hash": loaded.weights_hash,
            "tokenizer_hash": loaded.tokenizer_hash,
            "dtype": str(loaded.dtype),
            "device": loaded.placement.input.type,
            "layers": sorted(layers),
            "chunks": _array_digest(chunks[wanted].astype(np.int64)),
            "positions": _array_digest(positions.chunk.astype(np.int64), positions.position.astype(np.int64)),
        }
        key = hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()
        return cls(Path(cache_dir) / "extraction" / key[:24], ingredients)

    def _shard(self, batch_size: int, batch: int) -> Path:
        return shard_path(self.folder, batch_size, batch)

    def completed(self, batch_size: int) -> int:
        folder = self.folder / f"bs{batch_size}"
        return len(list(folder.glob("batch*.safetensors"))) if folder.is_dir() else 0

    def resumable_batch_size(self) -> int | None:
        """The batch size with the most finished batches, if an interrupted run left any."""
        sizes = {int(p.name[2:]): self.completed(int(p.name[2:]))
                 for p in self.folder.glob("bs*") if p.name[2:].isdigit()} if self.folder.is_dir() else {}
        sizes = {size: n for size, n in sizes.items() if n}
        return max(sizes, key=lambda size: (sizes[size], -size)) if sizes else None

    def write(self, batch: Batch, captured: dict[int, torch.Tensor], nonfinite: set[int]) -> None:
        """Writes one finished batch: its positions' activations, or only the fact that it was bad."""
        if not (self.folder / "info.json").exists():
            write_json(self.folder / "info.json", self.ingredients)
        tensors = {"index": torch.from_numpy(np.ascontiguousarray(batch.index, dtype=np.int64))}
        if not nonfinite:
            tensors.update({f"layer{layer}": hidden.detach().to("cpu").contiguous()
                            for layer, hidden in captured.items()})
        metadata = {"sha256": _tensor_checksum(tensors), "nonfinite": json.dumps(sorted(nonfinite))}
        # No fsync: a shard torn by a power cut fails its checksum and is recomputed.
        atomic_write_bytes(self._shard(batch.size, batch.first), save(tensors, metadata=metadata), durable=False)

    def read(self, batch: Batch, layers: list[int]):
        """(captured, nonfinite) of a finished batch, or None if absent, corrupt or not this batch."""
        path = self._shard(batch.size, batch.first)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            nonfinite = set(json.loads(metadata["nonfinite"]))
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError):
            return None
        if metadata.get("sha256") != _tensor_checksum(tensors):
            return None
        if "index" not in tensors or not np.array_equal(tensors["index"].numpy(), batch.index):
            return None
        captured = {layer: tensors[f"layer{layer}"] for layer in layers if f"layer{layer}" in tensors}
        if not nonfinite and len(captured) != len(layers):
            return None
        return captured, nonfinite

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
