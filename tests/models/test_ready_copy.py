"""The ready copy (tokenprobe's cached, dequantised default model) loads fast and loads the same thing.

The default GGUF is dequantised once into a float32 folder; later runs take the tokenizer straight
from its tokenizer.json, the fingerprint from a stored file, and bfloat16 weights from a bfloat16
copy made once. Each shortcut must give exactly what the slow path gives; tested on tiny models so
no download is needed (the real default model is covered in test_real_model.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenprobe.models.identity import tokenizer_fingerprint
from tokenprobe.models.ready_copy import READY_MARKER, load_ready_copy, save_ready_copy
from tiny_models import synthetic_text


@pytest.fixture(params=["gemma3", "llama", "gpt2", "qwen2"])
def ready(request, tiny_model_dirs, tmp_path):
    source = tiny_model_dirs[request.param]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = save_ready_copy(model, tokenizer, tmp_path / "models" / "abc", {"sha256": "0" * 64})
    return folder, model


def test_ready_tokenizer_and_fingerprint_equal_autotokenizer(ready):
    folder, _ = ready
    _, load_tokenizer, digest = load_ready_copy(folder, torch.float32)
    tokenizer = load_tokenizer()
    assert load_tokenizer() is tokenizer  # loaded once
    reference = AutoTokenizer.from_pretrained(folder)
    texts = synthetic_text(200, seed=3).split(". ") + [" the", "  spaces\n\nand lines", "émoji 😀 中文", ""]
    assert tokenizer(texts)["input_ids"] == reference(texts)["input_ids"]
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == reference(texts, add_special_tokens=False)["input_ids"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tokenizer, name) == getattr(reference, name), name
    assert len(tokenizer) == len(reference)
    assert digest == tokenizer_fingerprint(reference)  # the chunk cache key does not change


def test_bfloat16_copy_is_made_once_and_equals_a_cast(ready):
    folder, model = ready
    loaded, _, _ = load_ready_copy(folder, torch.bfloat16)
    copy = folder / "bfloat16"
    assert (copy / READY_MARKER).exists() and (copy / "model.safetensors").exists()
    assert next(loaded.parameters()).dtype == torch.bfloat16
    expected = model.to(torch.bfloat16).state_dict()
    got = loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    load_ready_copy(folder, torch.bfloat16)
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamp, "the copy must be reused, not remade"
    # float32 loads the float32 folder itself
    loaded32, _, _ = load_ready_copy(folder, torch.float32)
    assert next(loaded32.parameters()).dtype == torch.float32


def test_stored_fingerprint_is_used_only_while_tokenizer_json_is_unchanged(ready):
    folder, _ = ready
    _, _, digest = load_ready_copy(folder, torch.float32)
    stored = json.loads((folder / "tokenizer.sha256").read_text())
    assert stored["sha256"] == digest
    (folder / "tokenizer.sha256").write_text(json.dumps({**stored, "sha256": "f" * 64}))
    assert load_ready_copy(folder, torch.float32)[2] == "f" * 64  # read, not recomputed
    (folder / "tokenizer.sha256").write_text(json.dumps({**stored, "stamp": "0:0", "sha256": "f" * 64}))
    assert load_ready_copy(folder, torch.float32)[2] == digest  # stale stamp: recomputed


def test_a_cached_run_never_loads_the_tokenizer(ready, corpus_file, tmp_path, monkeypatch):
    """Chunks, target and fingerprint all come from the cache: the tokenizer (1.3 s for Gemma 3) stays unloaded."""
    from tokenprobe.device import Placement
    from tokenprobe.models import ready_copy
    from tokenprobe.models.loading import LoadedModel
    from tokenprobe.data.chunks import load_chunks
    from tokenprobe.data.corpus import load_corpus
    from tokenprobe.data.labels import cached_target

    folder, _ = ready
    loads = []
    real = ready_copy._ready_tokenizer
    monkeypatch.setattr(ready_copy, "_ready_tokenizer", lambda path: loads.append(path) or real(path))
    cache = tmp_path / "cache"
    corpus = load_corpus(str(corpus_file))

    def run():
        model, load_tokenizer, digest = load_ready_copy(folder, torch.float32)
        loaded = LoadedModel(model=model, load_tokenizer=load_tokenizer, name="tiny", source=str(folder),
                             weights_hash="0", tokenizer_hash=digest, dtype=torch.float32,
                             placement=Placement(torch.device("cpu"), torch.device("cpu")))
        target = cached_target(loaded, " the", None, cache)
        chunks = load_chunks(corpus, lambda: loaded.tokenizer, loaded.tokenizer_hash, 32, cache, progress=False)
        return target, chunks

    first_target, first_chunks = run()
    assert len(loads) == 1  # the first run tokenizes (and fingerprints) once
    target, chunks = run()
    assert len(loads) == 1, "the second run loaded the tokenizer"
    assert target == first_target and chunks.from_cache and chunks.bos_id == first_chunks.bos_id
    assert (chunks.ids == first_chunks.ids).all()
    assert AutoTokenizer.from_pretrained(folder).convert_ids_to_tokens(target.token_id) == target.token


def test_weights_written_shard_by_shard_load_as_saved(ready, tmp_path):
    """ShardWriter (the first run's writer: a few hundred MB at a time) gives a folder transformers loads
    with exactly the tensors written, with its index when there are several shards."""
    from safetensors import safe_open

    from tokenprobe.models.ready_copy import ShardWriter

    folder, model = ready
    out = tmp_path / "sharded"
    out.mkdir()
    writer = ShardWriter(out, shard_bytes=20_000)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not
             model.config.get_text_config().tie_word_embeddings}
    for name, tensor in state.items():
        writer.add(name, tensor.to(torch.bfloat16))
    writer.close()
    model.config.save_pretrained(out)
    files = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert set(index["weight_map"]) == set(state)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), state[key].to(torch.bfloat16)), key
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    got = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name
