"""The real default model (Gemma 3 270M from the GGUF package) end to end on a small slice.

The first run dequantises the GGUF once into the user's tokenprobe cache (about a minute); later
runs load the cached copy in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    from tokenprobe import load_model

    return load_model("gemma-3-270m", dtype="float32", device="cpu")


def test_default_model_layers_match_output_hidden_states(gemma):
    from tokenprobe.extract.extract import extract_positions
    from tokenprobe.data.positions import PositionSet

    assert gemma.num_layers == 18 and gemma.hidden_size == 640
    assert gemma.tokenizer(" the", add_special_tokens=False)["input_ids"] == [506]
    ids = gemma.tokenizer("The cat sat on the mat because the mat was warm.", return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    positions = PositionSet(chunk=np.zeros(n, np.int64), position=np.arange(n), label=np.zeros(n, bool),
                            subset=np.zeros(n, np.int8))
    acts, _ = extract_positions(gemma, ids.numpy(), positions, [0, 5, 17], batch_size=1, progress=False)
    with torch.inference_mode():
        reference = gemma.model(input_ids=ids, output_hidden_states=True).hidden_states
    for slot, layer in enumerate([0, 5, 17]):
        torch.testing.assert_close(acts.values[slot], reference[layer][0].float(), rtol=1e-4, atol=1e-3)


def test_cli_train_on_default_model_and_corpus(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tokenprobe.cli", "train", "--max-tokens", "120000", "--layers", "0,9,18",
         "--train-positions", "2000", "--eval-positions", "1000", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    by_layer = {r["layer"]: r for r in results["layers"]}
    assert results["run"]["model"]["name"] == "gemma-3-270m" and results["run"]["target"]["token_id"] == 506
    assert by_layer[18]["run_name"] == "probe-layer18-ctx256-120k-next-gemma-3-270m"
    # The seed reports ~75% for this task; ARCHITECTURE.md 0.84-0.90. Well below that is a bug.
    for layer in (0, 9, 18):
        assert by_layer[layer]["balanced_accuracy"] > 0.75, (layer, by_layer[layer])
        assert by_layer[layer]["auroc"] > 0.82, (layer, by_layer[layer])
    assert results["run"]["extraction"]["bad_batches"] == 0


def test_current_task_on_default_model_is_nearly_perfect():
    from tokenprobe import RunConfig, train

    config = RunConfig(task="current", layers="0,18", max_tokens=60_000, train_positions=1000,
                       eval_positions=600)
    result = train(config, save=False, progress=False)
    assert result.layers[0].primary.balanced_accuracy > 0.97


def test_default_model_fast_tokenizer_equals_autotokenizer(gemma):
    """The ready copy's tokenizer (from tokenizer.json alone) tokenizes the corpus as AutoTokenizer does."""
    from transformers import AutoTokenizer

    from tokenprobe.data.corpus import load_corpus
    from tokenprobe.models.identity import tokenizer_fingerprint
    from tokenprobe.models.ready_copy import default_gguf_path, gguf_ready_copy
    from tokenprobe.files import default_cache_dir, file_sha256

    gguf = default_gguf_path()
    ready = gguf_ready_copy(gguf, default_cache_dir(), file_sha256(gguf, default_cache_dir()))
    reference = AutoTokenizer.from_pretrained(ready)
    texts = load_corpus("wiki-summaries").documents[:300] + [" the", "The", "\n\n  x", "😀"]
    assert gemma.tokenizer(texts)["input_ids"] == reference(texts)["input_ids"]
    assert gemma.tokenizer.bos_token_id == reference.bos_token_id == 2
    assert gemma.tokenizer_hash == tokenizer_fingerprint(reference)
