"""The Python API on text: `activations` (training's own capture) and `load_probes(...).predict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import TokenprobeError, activations, load_model, load_probes
from tokenprobe.models.surgery import find_final_norm
from tokenprobe.viz.explore import visualize
from viz_fixtures import train_tiny_run

CONTEXT = 32


@pytest.fixture(scope="module")
def gpt2(tiny_model_dirs, session_cache):
    return load_model(str(tiny_model_dirs["gpt2"]), "float32", "cpu", session_cache)


@pytest.fixture(scope="module")
def gpt2_run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model_dirs["gpt2"], corpus_file, tmp_path_factory.mktemp("api") / "run",
                          session_cache, CONTEXT)


@pytest.fixture(scope="module")
def text():
    from tiny_models import synthetic_text

    return synthetic_text(12, seed=5)


@pytest.mark.parametrize("bos", ["auto", "always"])  # GPT-2's tokenizer adds no BOS: auto chunks start without
def test_activations_equal_output_hidden_states_and_the_last_layer_is_before_the_final_norm(gpt2, text, bos):
    ids = gpt2.tokenizer(text, add_special_tokens=False)["input_ids"]
    acts = activations(gpt2, text, context_length=CONTEXT, bos=bos)
    assert acts.token_ids == ids and len(acts) == len(ids) > 3 * CONTEXT  # several chunks
    assert acts.layers == list(range(gpt2.num_layers + 1)) and acts.finite.all()
    assert "".join(acts.tokens) == text  # the pieces cover the text
    prefix = [gpt2.tokenizer.bos_token_id] if bos == "always" else []
    body = CONTEXT - len(prefix)
    final_norm = find_final_norm(gpt2.model)
    for start in range(0, len(ids), body):
        chunk = torch.tensor([prefix + ids[start : start + body]])
        with torch.no_grad():
            reference = gpt2.model(input_ids=chunk, output_hidden_states=True).hidden_states
        rows, first = slice(start, start + chunk.shape[1] - len(prefix)), len(prefix)
        for layer in range(gpt2.num_layers):
            torch.testing.assert_close(acts[layer][rows], reference[layer][0, first:], rtol=1e-5, atol=1e-5)
        last = acts[gpt2.num_layers][rows]
        torch.testing.assert_close(final_norm(last), reference[-1][0, first:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(last, reference[-1][0, first:], atol=1e-2)


def test_activations_of_token_ids_equal_those_of_the_text(gpt2):
    text = "The cat sat on the mat."
    by_text = activations(gpt2, text, layers=[2], context_length=CONTEXT)
    by_ids = activations(gpt2, by_text.token_ids, layers=[2], context_length=CONTEXT)
    assert by_ids.layers == [2] and torch.equal(by_ids[2], by_text[2])
    with pytest.raises(KeyError, match="layer 1 was not captured"):
        by_ids[1]


def test_predict_equals_the_explorer_and_indexes_by_layer(gpt2_run, gpt2, text, session_cache):
    probes = load_probes(gpt2_run)
    assert probes.layers == [0, 1, 2, 3] and probes.context_length == CONTEXT and len(probes) == 4
    pred = probes.predict(text, loaded=gpt2)
    page = visualize([gpt2_run], text=text, loaded=gpt2, cache_dir=session_cache, write=False)
    assert pred.token_ids == page.token_ids.tolist()
    np.testing.assert_array_equal(pred.probabilities, page.probabilities)
    for i, layer in enumerate(pred.layers):
        assert pred[layer] is pred.probabilities[i] or np.array_equal(pred[layer], pred.probabilities[i])
        assert np.array_equal(pred.get(layer, kind="linear"), pred.probabilities[i])
    assert np.abs(pred[1] - pred[2]).max() > 1e-3  # a probe on the wrong layer would be caught
    with pytest.raises(KeyError, match="no probe of layer 9"):
        pred[9]


def test_predict_of_one_probe_file(gpt2_run, gpt2):
    pred = load_probes(gpt2_run / "probes" / "layer02.safetensors").predict([5, 6, 7, 8], loaded=gpt2)
    assert pred.layers == [2] and pred.probabilities.shape == (1, 4)
    assert ((pred[2] >= 0) & (pred[2] <= 1)).all()


def test_predict_refuses_another_model(gpt2_run, tiny_model_dirs, session_cache):
    llama = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", session_cache)
    with pytest.raises(TokenprobeError, match="does not fit"):
        load_probes(gpt2_run).predict("The cat.", loaded=llama)


def test_bad_input_is_a_clear_error(gpt2_run, gpt2, tmp_path):
    with pytest.raises(TokenprobeError, match="holds no probe files"):
        load_probes(tmp_path)
    with pytest.raises(TokenprobeError, match="two probes for"):
        load_probes(gpt2_run, gpt2_run / "probes" / "layer01.safetensors")
    with pytest.raises(TokenprobeError, match="text is empty"):
        load_probes(gpt2_run).predict("  ", loaded=gpt2)
    with pytest.raises(TokenprobeError, match="outside the tokenizer's vocabulary"):
        activations(gpt2, [1, 10**7])
    with pytest.raises(TokenprobeError, match="layer 9 does not exist"):
        activations(gpt2, "The cat.", layers=[9])


def _saved_before_bos(run: Path, out: Path) -> Path:
    """A run's probe files as tokenprobe wrote them before --bos existed: no `bos` in their run config."""
    from safetensors.torch import load_file, save_file

    from tokenprobe.files import dumps_json
    from tokenprobe.probes.base import METADATA_KEY, read_header

    out.mkdir(parents=True)
    for path in sorted((run / "probes").glob("layer*.safetensors")):
        header = read_header(path)
        header["config"] = {k: v for k, v in header["config"].items() if k != "bos"}
        save_file(load_file(path), out / path.name, metadata={METADATA_KEY: dumps_json(header)})
    return out


def test_predict_and_viz_chunk_text_as_the_probes_run_did(gpt2_run, gpt2, text, tmp_path, session_cache):
    """GPT-2's tokenizer names a BOS but never adds it: a --bos auto run's probes see chunks without BOS;
    probes saved before --bos see chunks with it, as they were trained then."""
    import json

    record = json.loads((gpt2_run / "run.json").read_text())
    assert record["config"]["bos"] == "auto" and record["corpus"]["bos_id"] is None
    probes = load_probes(gpt2_run)
    old = load_probes(_saved_before_bos(gpt2_run, tmp_path / "old"))
    assert probes.bos == "auto" and old.bos == "legacy" and old.layers == probes.layers
    predicted = {}
    for name, probe_set, chunked in (("auto", probes, "never"), ("old", old, "always")):
        pred = predicted[name] = probe_set.predict(text, loaded=gpt2)
        acts = activations(gpt2, text, layers=probe_set.layers, context_length=CONTEXT, bos=chunked)
        for i, probe in enumerate(probe_set):
            expected = probe.predict_proba(acts[probe.meta.layer]).float().numpy()
            np.testing.assert_allclose(pred.probabilities[i], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(predicted["auto"].probabilities - predicted["old"].probabilities).max() > 1e-3
    page = visualize(sorted((tmp_path / "old").glob("*.safetensors")), text=text, loaded=gpt2,
                     cache_dir=session_cache, write=False)
    np.testing.assert_array_equal(page.probabilities, predicted["old"].probabilities)
    with pytest.raises(TokenprobeError, match="different --bos"):
        load_probes(gpt2_run / "probes" / "layer01.safetensors", tmp_path / "old" / "layer02.safetensors")
