"""Extraction at the right layer: compared with the model's own output_hidden_states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenprobe.extract.extract import extract_positions
from tokenprobe.models.loading import load_model
from tokenprobe.models.surgery import find_final_norm
from tokenprobe.data.positions import SUBSETS, PositionSet


def _all_positions(n_chunks: int, length: int) -> PositionSet:
    chunk, position = np.meshgrid(np.arange(n_chunks), np.arange(length), indexing="ij")
    n = chunk.size
    return PositionSet(chunk=chunk.ravel(), position=position.ravel(), label=np.zeros(n, bool),
                       subset=np.full(n, SUBSETS.index("train"), np.int8))


@pytest.fixture()
def loaded(tiny_model_dir, cache_dir):
    return load_model(str(tiny_model_dir), "float32", "cpu", cache_dir)


def test_every_layer_matches_output_hidden_states(loaded):
    torch.manual_seed(0)
    chunks = torch.randint(3, len(loaded.tokenizer), (5, 24)).numpy()
    n_layers = loaded.num_layers
    acts, stats = extract_positions(loaded, chunks, _all_positions(5, 24), list(range(n_layers + 1)), batch_size=2, progress=False)
    with torch.inference_mode():
        reference = loaded.model(input_ids=torch.from_numpy(chunks), output_hidden_states=True).hidden_states
    assert stats.bad_batches == 0 and acts.keep.all()
    for layer in range(n_layers):
        mine = acts.values[layer].reshape(5, 24, -1)
        torch.testing.assert_close(mine, reference[layer].float(), rtol=1e-5, atol=1e-5)
    # transformers reports the last layer after the final norm; tokenprobe keeps the raw residual.
    norm = find_final_norm(loaded.model)
    with torch.inference_mode():
        normed = norm(acts.values[n_layers].reshape(5, 24, -1))
    torch.testing.assert_close(normed, reference[n_layers].float(), rtol=1e-4, atol=1e-4)


def test_only_sampled_positions_are_kept_and_subset_of_layers(loaded):
    chunks = torch.randint(3, len(loaded.tokenizer), (4, 16)).numpy()
    positions = PositionSet(chunk=np.array([3, 0, 3, 1]), position=np.array([5, 1, 15, 7]),
                            label=np.zeros(4, bool), subset=np.zeros(4, np.int8))
    acts, stats = extract_positions(loaded, chunks, positions, [1, 2], batch_size=3, progress=False)
    assert acts.values.shape == (2, 4, loaded.hidden_size)
    with torch.inference_mode():
        reference = loaded.model(input_ids=torch.from_numpy(chunks), output_hidden_states=True).hidden_states
    for slot, layer in enumerate([1, 2]):
        for i in range(4):
            expected = reference[layer][positions.chunk[i], positions.position[i]]
            torch.testing.assert_close(acts.values[slot, i], expected, rtol=1e-5, atol=1e-5)
    # Each chunk runs only up to its last sampled position: one chunk per batch, 16 + 8 + 2 tokens, the
    # same hidden states as the full-length pass above (a causal model never looks ahead).
    one, one_stats = extract_positions(loaded, chunks, positions, [1, 2], batch_size=1, progress=False)
    assert one_stats.tokens == 16 + 8 + 2 and stats.tokens == 16 * 3
    torch.testing.assert_close(one.values, acts.values, rtol=1e-5, atol=1e-5)


def test_forward_stops_after_deepest_layer_and_skips_unembedding(loaded):
    calls = []
    stack = loaded.layer_stack
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(stack)]
    head = loaded.model.get_output_embeddings()
    handles.append(head.register_forward_hook(lambda m, a, o: calls.append("lm_head")))
    try:
        chunks = torch.randint(3, len(loaded.tokenizer), (2, 8)).numpy()
        extract_positions(loaded, chunks, _all_positions(2, 8), [0, 1], batch_size=2, progress=False)
        assert calls == [0], "only the first block runs for layers 0 and 1"
        calls.clear()
        extract_positions(loaded, chunks, _all_positions(2, 8), [loaded.num_layers], batch_size=2, progress=False)
        assert calls == list(range(loaded.num_layers)), "the unembedding never runs"
    finally:
        for h in handles:
            h.remove()


def test_nan_batches_are_skipped_and_counted(loaded):
    chunks = torch.randint(3, len(loaded.tokenizer), (6, 8)).numpy()
    poisoned = {"n": 0}

    def poison(module, args, output):
        poisoned["n"] += 1
        if poisoned["n"] == 2:  # the second batch only
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[0, 0, 0] = float("nan")

    handle = loaded.layer_stack[0].register_forward_hook(poison)
    try:
        acts, stats = extract_positions(loaded, chunks, _all_positions(6, 8), [1, 2], batch_size=2, progress=False)
    finally:
        handle.remove()
    assert stats.batches == 3 and stats.bad_batches == 1
    assert acts.keep.sum() == 4 * 8 and not acts.keep[16:32].any()
    assert torch.isfinite(acts.values[:, acts.keep]).all()


def test_bfloat16_activations_are_kept_exactly_in_bfloat16(tiny_model_dir, cache_dir):
    """bfloat16 hidden states are stored as they are: half the memory of float32, bit-identical values."""
    loaded = load_model(str(tiny_model_dir), "bfloat16", "cpu", cache_dir)
    torch.manual_seed(1)
    chunks = torch.randint(3, len(loaded.tokenizer), (3, 16)).numpy()
    acts, stats = extract_positions(loaded, chunks, _all_positions(3, 16), [0, 1, 2], batch_size=2, progress=False)
    assert acts.values.dtype == torch.bfloat16
    with torch.inference_mode():
        reference = loaded.model(input_ids=torch.from_numpy(chunks), output_hidden_states=True).hidden_states
    for layer in (0, 1, 2):
        assert torch.equal(acts.values[layer].reshape(3, 16, -1), reference[layer])


def test_bfloat16_checkpoint_round_trip(tiny_model_dir, cache_dir, tmp_path):
    """Shards keep bfloat16 (checksummed by their bytes); a resumed extraction equals a fresh one exactly."""
    from tokenprobe.extract.sinks import CheckpointSink

    loaded = load_model(str(tiny_model_dir), "bfloat16", "cpu", cache_dir)
    torch.manual_seed(2)
    chunks = torch.randint(3, len(loaded.tokenizer), (4, 12)).numpy()
    positions = _all_positions(4, 12)
    checkpoint = CheckpointSink(tmp_path / "ckpt")
    first, _ = extract_positions(loaded, chunks, positions, [1, 2], batch_size=2, progress=False, checkpoint=checkpoint)
    assert len(list((tmp_path / "ckpt").rglob("batch*.safetensors"))) == 2
    again, again_stats = extract_positions(loaded, chunks, positions, [1, 2], batch_size=2, progress=False,
                                           checkpoint=checkpoint)
    assert again_stats.resumed_batches == 2 and again.values.dtype == torch.bfloat16
    assert torch.equal(first.values, again.values)
    shard = next((tmp_path / "ckpt").rglob("batch000000.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # flip a byte inside a bfloat16 tensor: the checksum must catch it
    shard.write_bytes(bytes(data))
    third, third_stats = extract_positions(loaded, chunks, positions, [1, 2], batch_size=2, progress=False,
                                           checkpoint=checkpoint)
    assert third_stats.resumed_batches == 1 and torch.equal(first.values, third.values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_check_finds_any_nan_or_inf_and_nothing_else(dtype):
    from tokenprobe.extract.capture import _all_finite

    big = torch.finfo(dtype).max  # the largest finite values (float16's massive activations come close)
    hidden = torch.full((4, 32, 16), big, dtype=dtype)
    hidden[1, 3] = -big
    assert _all_finite(hidden)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0, 0), (2, 17, 5), (3, 31, 15)):
            poisoned = hidden.clone()
            poisoned[where] = bad
            assert not _all_finite(poisoned), (bad, where)
