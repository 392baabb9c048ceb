"""The activation store: a run's sampled activations on disk, read back one layer at a time.

Extraction writes each finished batch to a :class:`~tokenprobe.extract.sinks.CheckpointSink` (one
checksummed safetensors shard per batch, written atomically: the resume checkpoint). The same shards
are the store: :class:`StoreSource` reads one layer of every shard into one (positions, hidden)
tensor when probes, scores or baselines ask for it, and keeps only the layer read last, so the memory
a run needs after its forward pass is one layer of its positions, not layers x positions x width.

When a run is published its store moves into the run folder (``activations/``) unless
``--no-keep-activations`` (or the default's 2 GB limit) says otherwise, together with what
``tokenprobe fit`` needs to retrain and rescore without the model: the positions (chunk, position,
label, subset, usable, the token at each), and each baseline's scores and threshold (the model's own
probability, the logit lens of each probed layer, token statistics, majority).

    activations/
      info.json                  what decides the activations (model and tokenizer hashes, dtype, layers, ...)
      bs<N>/batch<first>.safetensors   one shard per batch: its rows' index, then layer<L> per layer
      positions.safetensors      chunk, position, label, subset, keep, token; baseline/<key> scores
      store.json                 layers, batch size, positions, width, dtype, bytes, baseline thresholds
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.plan import Batch, RunPlan
from tokenprobe.extract.sinks import CheckpointSink, _tensor_checksum, shard_path
from tokenprobe.files import atomic_write_bytes, json_safe, write_json

STORE_RECORD = "store.json"
POSITIONS_FILE = "positions.safetensors"
STORE_FORMAT = "tokenprobe-activations-1"
DEFAULT_KEEP_BYTES = 2 * 1024**3  # by default a store outlives its run when it is smaller than this


class KeepSink:
    """Records which positions are usable (their batch's hidden states were finite), nothing else."""

    def __init__(self, n_positions: int):
        self.keep = np.ones(n_positions, dtype=bool)

    def write(self, batch: Batch, captured: dict[int, torch.Tensor], nonfinite: set[int]) -> None:
        if nonfinite:
            self.keep[batch.index] = False


def keep_of_shards(folder: Path, plan: RunPlan, batch_size: int, n_positions: int) -> np.ndarray:
    """Which positions are usable, from the shards' own headers (a distributed run's rank 0, whose
    KeepSink saw only its own batches): False where a batch had NaN/Inf. A missing shard is an error."""
    keep = np.ones(n_positions, dtype=bool)
    for first in range(0, len(plan.chunks), batch_size):
        batch = plan.batch(first, batch_size)
        path = shard_path(folder, batch_size, first)
        try:
            with safe_open(str(path), framework="pt") as f:
                nonfinite = json.loads((f.metadata() or {}).get("nonfinite", "[]"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TokenprobeError(f"the activation store {folder} lacks a readable {path.name} ({exc}); run the same "
                                  "command again to recompute it") from None
        if nonfinite:
            keep[batch.index] = False
    return keep


class StoreSource:
    """An :class:`~tokenprobe.extract.sinks.ActivationSource` over a store's shards: `layer(L)` reads
    layer L of every batch into one (positions, hidden) tensor, in the model's dtype, and keeps it
    until another layer is read. Rows of unusable batches (``keep`` False) hold zeros."""

    def __init__(self, folder: Path, plan: RunPlan, batch_size: int, layers: list[int], n_positions: int,
                 hidden_size: int, dtype: torch.dtype, keep: np.ndarray):
        self.folder = Path(folder)
        self.plan, self.batch_size = plan, batch_size
        self.layers = sorted(layers)
        self.n_positions, self.hidden_size, self.dtype = n_positions, hidden_size, dtype
        self.keep = keep
        self._last: tuple[int, torch.Tensor] | None = None

    def batches(self) -> Iterator[Batch]:
        for first in range(0, len(self.plan.chunks), self.batch_size):
            yield self.plan.batch(first, self.batch_size)

    def shard(self, batch: Batch) -> Path:
        return shard_path(self.folder, self.batch_size, batch.first)

    def layer(self, layer: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == layer:
            return self._last[1]
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in the store (it holds {self.layers})")
        self._last = None  # let the previous layer go before the next one is allocated
        values = torch.zeros((self.n_positions, self.hidden_size), dtype=self.dtype)
        name = f"layer{layer}"
        for batch in self.batches():
            if not self.keep[batch.index].all():
                continue  # a batch with NaN/Inf: its shard holds no activations
            with safe_open(str(self.shard(batch)), framework="pt") as f:
                values[torch.from_numpy(batch.index)] = f.get_tensor(name)
        self._last = (layer, values)
        return values

    def views(self, layers: Sequence[int]) -> LayerViews:
        return LayerViews(self, list(layers))

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in (self.folder / f"bs{self.batch_size}").glob("batch*.safetensors"))

    def verify(self) -> None:
        """Checks every shard against its checksum and expected rows; a one-line error names the first bad one."""
        reader = CheckpointSink(self.folder)
        for batch in self.batches():
            if reader.read(batch, self.layers) is None:
                raise TokenprobeError(f"the activation store {self.folder} is damaged ({self.shard(batch).name} is "
                                      "missing or fails its checksum); rerun `tokenprobe train` to make it again")


class LayerViews(Sequence):
    """Layers of a source, read when indexed (one at a time), for the probe families' `fit_*` functions,
    which take a sequence of per-layer views and go through it in order."""

    def __init__(self, source: Any, layers: list[int]):
        self.source, self.layers = source, layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LayerViews(self.source, self.layers[i])
        return self.source.layer(self.layers[i])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for layer in self.layers:
            yield self.source.layer(layer)


# ------------------------------------------------------------------------------------- kept stores


@dataclass
class StoredRun:
    """What a kept store holds beside the activations: the positions, each position's token, the
    baselines' scores and thresholds, and the source over the shards."""

    source: StoreSource
    chunk: np.ndarray
    position: np.ndarray
    label: np.ndarray
    subset: np.ndarray
    token: np.ndarray  # the token id at each position (the control task's input)
    baseline_scores: dict[str, tuple[np.ndarray, float]]  # str(ScorerKey) -> (scores over all positions, threshold)
    record: dict[str, Any]  # store.json


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TokenprobeError(f"the activation store names an unknown dtype {name!r}")
    return dtype


def finish_store(source: StoreSource, positions, token: np.ndarray, probed_layers: list[int],
                 baselines: dict[str, tuple[np.ndarray, float]] | None, baselines_info: dict[str, Any] | None,
                 ingredients: dict[str, Any]) -> None:
    """Writes positions.safetensors and store.json into the store's folder (store.json last: a folder
    without it is not a finished store)."""
    tensors = {"chunk": torch.from_numpy(positions.chunk.astype(np.int64)),
               "position": torch.from_numpy(positions.position.astype(np.int64)),
               "label": torch.from_numpy(positions.label.astype(np.uint8)),
               "subset": torch.from_numpy(positions.subset.astype(np.int8)),
               "keep": torch.from_numpy(source.keep.astype(np.uint8)),
               "token": torch.from_numpy(np.asarray(token, dtype=np.int64))}
    order = list(baselines or {})
    for key, (scores, _) in (baselines or {}).items():
        tensors[f"baseline/{key}"] = torch.tensor(np.asarray(scores, dtype=np.float64))  # a copy: scores may share memory
    if order:  # thresholds may be infinite (one class only), so a tensor rather than JSON
        tensors["baseline_thresholds"] = torch.tensor([baselines[key][1] for key in order], dtype=torch.float64)
    metadata = {"sha256": _tensor_checksum(tensors)}
    atomic_write_bytes(source.folder / POSITIONS_FILE, save(tensors, metadata=metadata), durable=False)
    write_json(source.folder / STORE_RECORD, {
        "format": STORE_FORMAT, "batch_size": source.batch_size, "layers": source.layers,
        "probed_layers": sorted(probed_layers), "positions": source.n_positions, "hidden_size": source.hidden_size,
        "dtype": str(source.dtype).removeprefix("torch."), "bytes": source.nbytes(),
        "baselines": {"keys": order,  # in the order the run scored them
                      "info": json_safe({k: v for k, v in (baselines_info or {}).items() if k != "thresholds"})}
        if baselines else None,
        "ingredients": ingredients})


def open_store(folder: Path, verify: bool = True) -> StoredRun:
    """A kept store, checked (shards and positions against their checksums) before use."""
    from tokenprobe.data.positions import PositionSet

    folder = Path(folder)
    if not (folder / STORE_RECORD).is_file():
        raise TokenprobeError(f"{folder} is not a finished activation store (no {STORE_RECORD})")
    record = json.loads((folder / STORE_RECORD).read_text())
    if record.get("format") != STORE_FORMAT:
        raise TokenprobeError(f"{folder} holds activations in format {record.get('format')!r}, not {STORE_FORMAT!r}; "
                              "rerun `tokenprobe train` with this version")
    try:
        with safe_open(str(folder / POSITIONS_FILE), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise TokenprobeError(f"cannot read {folder / POSITIONS_FILE}: {exc}") from None
    if metadata.get("sha256") != _tensor_checksum(tensors):
        raise TokenprobeError(f"{folder / POSITIONS_FILE} fails its checksum; rerun `tokenprobe train` to make it again")
    arrays = {name: t.numpy() for name, t in tensors.items()}
    positions = PositionSet(chunk=arrays["chunk"], position=arrays["position"], label=arrays["label"].astype(bool),
                            subset=arrays["subset"])
    source = StoreSource(folder, RunPlan.of(positions), int(record["batch_size"]), record["layers"],
                         int(record["positions"]), int(record["hidden_size"]), _dtype_of(record["dtype"]),
                         arrays["keep"].astype(bool))
    if verify:
        source.verify()
    order = (record.get("baselines") or {}).get("keys", [])
    thresholds = arrays.get("baseline_thresholds", np.zeros(0))
    scores = {key: (arrays[f"baseline/{key}"], float(threshold)) for key, threshold in zip(order, thresholds)}
    return StoredRun(source=source, chunk=positions.chunk, position=positions.position, label=positions.label,
                     subset=positions.subset, token=arrays["token"], baseline_scores=scores, record=record)


def move_store(source: StoreSource, destination: Path) -> None:
    """Moves a store's folder to `destination` (a rename on one filesystem, else a copy then a delete)."""
    shutil.move(str(source.folder), str(destination))
    source.folder = Path(destination)
