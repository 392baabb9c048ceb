"""Extraction that survives Ctrl-C and kill: one checksummed shard per finished batch.

Each batch's activations (only the sampled positions) are written atomically to
``<cache>/extraction/<key>/bs<batch size>/batch<n>.safetensors`` as soon as the batch is done. The key
is a hash of everything that decides the activations: the model's weights and tokenizer hashes,
dtype, device type, layers, and the exact chunks and positions (which already encode the corpus,
context length, task, target, seed, split and sample sizes). Running the same command again finds
the folder, loads the finished batches instead of recomputing them, and checks each against its
checksum and its expected positions; a shard that fails either is recomputed. Batches are
independent, so the resumed run ends with exactly the activations of an uninterrupted one. The
folder is deleted once the run has been published.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from tokenprobe.files import atomic_write_bytes, write_json

FORMAT_VERSION = "2"  # 2: batches of chunks cut at their last sampled position, longest first


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


class ExtractionCheckpoint:
    """The shards of one extraction; `folder` is keyed by what decides the activations."""

    def __init__(self, folder: Path, ingredients: dict | None = None):
        self.folder = Path(folder)
        self.ingredients = ingredients or {}

    @classmethod
    def for_run(cls, cache_dir: Path, loaded, chunks: np.ndarray, positions, layers: list[int]) -> ExtractionCheckpoint:
        wanted = np.unique(positions.chunk)
        ingredients = {
            "format": FORMAT_VERSION,
            "model": loaded.source,
            "weights_hash": loaded.weights_hash,
            "tokenizer_hash": loaded.tokenizer_hash,
            "dtype": str(loaded.dtype),
            "device": loaded.device.type,
            "layers": sorted(layers),
            "chunks": _array_digest(chunks[wanted].astype(np.int64)),
            "positions": _array_digest(positions.chunk.astype(np.int64), positions.position.astype(np.int64)),
        }
        key = hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()
        return cls(Path(cache_dir) / "extraction" / key[:24], ingredients)

    def _shard(self, batch_size: int, batch: int) -> Path:
        return self.folder / f"bs{batch_size}" / f"batch{batch:06d}.safetensors"

    def completed(self, batch_size: int) -> int:
        folder = self.folder / f"bs{batch_size}"
        return len(list(folder.glob("batch*.safetensors"))) if folder.is_dir() else 0

    def resumable_batch_size(self) -> int | None:
        """The batch size with the most finished batches, if an interrupted run left any."""
        sizes = {int(p.name[2:]): self.completed(int(p.name[2:]))
                 for p in self.folder.glob("bs*") if p.name[2:].isdigit()} if self.folder.is_dir() else {}
        sizes = {size: n for size, n in sizes.items() if n}
        return max(sizes, key=lambda size: (sizes[size], -size)) if sizes else None

    def save(self, batch_size: int, batch: int, index: np.ndarray, captured: dict[int, torch.Tensor],
             nonfinite: set[int]) -> None:
        """Writes one finished batch: its positions' activations, or only the fact that it was bad."""
        if not (self.folder / "info.json").exists():
            write_json(self.folder / "info.json", self.ingredients)
        tensors = {"index": torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))}
        if not nonfinite:
            tensors.update({f"layer{layer}": hidden.detach().to("cpu").contiguous()
                            for layer, hidden in captured.items()})
        metadata = {"sha256": _tensor_checksum(tensors), "nonfinite": json.dumps(sorted(nonfinite))}
        # No fsync: a shard torn by a power cut fails its checksum and is recomputed.
        atomic_write_bytes(self._shard(batch_size, batch), save(tensors, metadata=metadata), durable=False)

    def load(self, batch_size: int, batch: int, index: np.ndarray, layers: list[int]):
        """(captured, nonfinite) of a finished batch, or None if absent, corrupt or not this batch."""
        path = self._shard(batch_size, batch)
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
        if "index" not in tensors or not np.array_equal(tensors["index"].numpy(), index):
            return None
        captured = {layer: tensors[f"layer{layer}"] for layer in layers if f"layer{layer}" in tensors}
        if not nonfinite and len(captured) != len(layers):
            return None
        return captured, nonfinite

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
