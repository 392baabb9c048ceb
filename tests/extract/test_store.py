"""The activation store: the checkpoint's shards read back one layer at a time, equal to what memory held."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenprobe.data.positions import PositionSet
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.plan import RunPlan
from tokenprobe.extract.sinks import CheckpointSink, MemorySink
from tokenprobe.extract.store import KeepSink, LayerViews, StoreSource, finish_store, open_store


def _positions(n=40, chunks=9, seed=0) -> PositionSet:
    rng = np.random.default_rng(seed)
    return PositionSet(chunk=rng.integers(0, chunks, n), position=rng.integers(0, 16, n),
                       label=rng.random(n) < 0.3, subset=rng.integers(0, 4, n).astype(np.int8))


def _extract(folder, positions, layers=(0, 2, 5), hidden=6, batch_size=2, bad=(1,)):
    """Writes random activations batch by batch to a checkpoint, a memory sink and a keep sink, as
    `extract` does; batches in `bad` are NaN/Inf ones."""
    plan = RunPlan.of(positions)
    memory, keep, checkpoint = (MemorySink(list(layers), len(positions), hidden, torch.float32),
                                KeepSink(len(positions)), CheckpointSink(folder))
    g = torch.Generator().manual_seed(3)
    for k, first in enumerate(range(0, len(plan.chunks), batch_size)):
        batch = plan.batch(first, batch_size)
        captured = {layer: torch.randn(len(batch.index), hidden, generator=g) for layer in layers}
        nonfinite = {layers[-1]} if k in bad else set()
        for sink in (memory, keep, checkpoint):
            sink.write(batch, captured, nonfinite)
    source = StoreSource(folder, plan, batch_size, list(layers), len(positions), hidden, torch.float32, keep.keep)
    return source, memory


def test_each_layer_read_from_the_shards_equals_what_memory_held(tmp_path):
    positions = _positions()
    source, memory = _extract(tmp_path / "store", positions)
    assert np.array_equal(source.keep, memory.keep) and not source.keep.all()
    for layer in (0, 2, 5):
        x = source.layer(layer)
        assert torch.equal(x[torch.from_numpy(source.keep)], memory.layer(layer)[torch.from_numpy(memory.keep)])
        assert not x[torch.from_numpy(~source.keep)].any()  # a bad batch's rows are zeros, never garbage
    with pytest.raises(KeyError):
        source.layer(1)


def test_only_the_last_layer_read_is_kept(tmp_path):
    source, _ = _extract(tmp_path / "store", _positions())
    views = LayerViews(source, [0, 2, 5])
    assert len(views) == 3 and views[0] is views[0]  # indexing twice reads once
    seen = []
    for x in views:
        seen.append(x)
        assert source._last[1] is x  # the previous layer is no longer held by the source
    assert [t.data_ptr() for t in seen] != [seen[0].data_ptr()] * 3
    assert [v.shape for v in views[1:]] == [(40, 6), (40, 6)]


def test_a_finished_store_opens_checked_and_refuses_damage(tmp_path):
    positions = _positions()
    source, _ = _extract(tmp_path / "store", positions)
    token = np.arange(len(positions))
    scores = np.linspace(0, 1, len(positions))
    finish_store(source, positions, token, [0, 2], {"logit_lens/0": (scores, 0.25), "model": (scores, float("inf"))},
                 {"final_norm": "RMSNorm", "thresholds": {}}, {"model": "m"})
    stored = open_store(tmp_path / "store")
    assert np.array_equal(stored.label, positions.label) and np.array_equal(stored.token, token)
    assert list(stored.baseline_scores) == ["logit_lens/0", "model"]
    assert stored.baseline_scores["model"][1] == float("inf") and stored.baseline_scores["logit_lens/0"][1] == 0.25
    assert stored.record["probed_layers"] == [0, 2] and stored.record["baselines"]["info"] == {"final_norm": "RMSNorm"}
    assert torch.equal(stored.source.layer(2), source.layer(2))
    # one flipped byte in one shard, then a missing store.json
    shard = sorted((tmp_path / "store" / "bs2").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(TokenprobeError, match="damaged"):
        open_store(tmp_path / "store")
    (tmp_path / "store" / "store.json").unlink()
    with pytest.raises(TokenprobeError, match="not a finished activation store"):
        open_store(tmp_path / "store")
    assert json.loads((tmp_path / "store" / "info.json").read_text()) == {}
