"""`tokenprobe viz`: the model's own P(target next) beside the probe's, and, for a run folder holding
ablation.json, P(target next) with the probe's direction edited at each ablated layer.

Both are checked against transformers' own logits (`model(input_ids).logits`, the final norm included),
chunk by chunk as the page chunks the text; the ablated ones with ablate's own `edited` hooked into the
model. (The browser side: test_viz_browser.py.)"""

from __future__ import annotations

import base64
import json
import logging
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import load_model, load_probe
from tokenprobe.data.text import chunk_ids, resolve_bos
from tokenprobe.pipelines.ablate import AblateOptions, ablate, edited, unit
from tokenprobe.probes.base import ProbeMeta
from tokenprobe.report.ablation import ABLATION
from tokenprobe.viz import explore
from tokenprobe.viz.explore import decode_float32, visualize
from viz_fixtures import train_tiny_run

CONTEXT = 32


@pytest.fixture(scope="module")
def llama(tiny_model_dirs, session_cache):
    return load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", session_cache)


@pytest.fixture(scope="module")
def run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model_dirs["llama"], corpus_file, tmp_path_factory.mktemp("viz-own") / "llama-run",
                          session_cache, CONTEXT)


@pytest.fixture(scope="module")
def ablated_run(run, llama, session_cache, tmp_path_factory) -> Path:
    """A copy of the run, ablated at layer 1 (the original stays a run without ablation.json)."""
    folder = tmp_path_factory.mktemp("viz-ablated") / "run"
    shutil.copytree(run, folder)
    ablate(folder, AblateOptions(layers="1", random=2, max_tokens=320, resamples=0), loaded=llama,
           cache_dir=session_cache, progress=False)
    return folder


@pytest.fixture(scope="module")
def text() -> str:
    from tiny_models import synthetic_text

    return synthetic_text(8, seed=11)  # a few chunks of 32 tokens


def model_probability(loaded, ids: list[int], target_ids: list[int], edit: tuple | None = None) -> np.ndarray:
    """P(any of target_ids next) at every token: a softmax of transformers' own logits, chunk by chunk (BOS
    first, as the page chunks), with `edit` = (layer, unit direction, mode, value) hooked in by ablate's own
    `edited` where given."""
    bos = resolve_bos(loaded.tokenizer, "auto")  # as the run chunked (Llama: its BOS)
    logits = []
    for chunk in chunk_ids(ids, CONTEXT, bos):
        with torch.no_grad(), (edited(loaded, *edit) if edit is not None else nullcontext()):
            out = loaded.model(input_ids=torch.from_numpy(chunk)[None]).logits[0]
        logits.append(out[1:] if bos is not None else out)
    softmax = torch.softmax(torch.cat(logits).double(), dim=-1)
    return softmax[:, target_ids].sum(dim=-1).numpy()


def embedded(path: Path) -> dict:
    html = path.read_text(encoding="utf-8")
    return json.loads(html.split('id="tp-data">', 1)[1].split("</script>", 1)[0])


def test_model_probability_equals_softmax_of_the_models_logits(run, llama, text, session_cache, tmp_path):
    result = visualize([run], text=text, loaded=llama, cache_dir=session_cache, out=tmp_path / "page.html")
    ids = result.token_ids.tolist()
    assert len(ids) > 2 * CONTEXT  # several chunks: the BOS-per-chunk restart is exercised
    target_ids = result.data["target_ids"]
    assert len(target_ids) == 1
    expected = model_probability(llama, ids, target_ids)
    np.testing.assert_allclose(result.model_probabilities, expected, rtol=1e-4, atol=1e-7)
    data = embedded(result.path)
    own = data["own"]
    assert own["ablation"] is None and data["tokens"]["model_prob"] is None
    shown = np.frombuffer(base64.b64decode(own["prob"]), dtype="<f4")
    assert len(shown) == len(ids)
    np.testing.assert_allclose(shown, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(decode_float32(own["prob"]), shown.astype(np.float64))
    assert expected.max() > 2 * expected.min()  # it varies over the text: a shifted token would be caught


def test_a_target_set_sums_its_targets_probabilities(run, llama, text, session_cache, tmp_path):
    ids = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    first = load_probe(run / "probes" / "layer00.safetensors").meta.target_ids[0]
    other = max(set(ids) - {first}, key=ids.count)
    files = []
    for path in sorted((run / "probes").glob("layer0[12].safetensors")):
        probe = load_probe(path)
        probe.meta = ProbeMeta.from_dict({**probe.metadata, "target_ids": [first, other], "target": "' the' | other"})
        probe.save(tmp_path / path.name)
        files.append(tmp_path / path.name)
    result = visualize(files, text=text, loaded=llama, cache_dir=session_cache, write=False)
    alone = model_probability(llama, ids, [first])
    expected = model_probability(llama, ids, [first, other])
    np.testing.assert_allclose(result.model_probabilities, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(decode_float32(result.data["own"]["prob"]), expected, rtol=1e-4, atol=1e-7)
    assert (expected - alone).min() > 0  # the second target adds its own probability everywhere


def test_ablated_probability_equals_the_model_run_with_the_edit(ablated_run, llama, text, session_cache):
    record = json.loads((ablated_run / ABLATION).read_text())
    assert record["mode"] == "project" and [e["layer"] for e in record["layers"]] == [1]
    result = visualize([ablated_run], text=text, loaded=llama, cache_dir=session_cache,
                       out=ablated_run / "viz.html")
    ids = result.token_ids.tolist()
    target_ids = result.data["target_ids"]
    direction = unit(load_probe(ablated_run / "probes" / "layer01.safetensors").direction())
    expected = model_probability(llama, ids, target_ids, (1, direction, "project", 0.0))
    clean = model_probability(llama, ids, target_ids)
    view = result.ablation
    assert view is not None and view.layers == [1] and view.mode == "project" and view.family == "linear"
    np.testing.assert_allclose(view.probabilities[0], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.model_probabilities, clean, rtol=1e-4, atol=1e-7)
    assert np.abs(expected - clean).max() > 1e-4  # the edit really changed the model's prediction
    shown = embedded(result.path)["own"]["ablation"]
    assert shown["layers"] == [1] and shown["mode"] == "project" and shown["family"] == "linear"
    assert shown["verdict"][0]["beyond_random"] == record["layers"][0]["beyond_random"]
    assert shown["verdict"][0]["log_ratio"]["mean"] == round(record["layers"][0]["probe"]["log_ratio"]["mean"], 4)
    np.testing.assert_allclose(decode_float32(shown["prob"][0]), expected, rtol=1e-4, atol=1e-7)


def test_mean_mode_edits_to_the_recorded_value(ablated_run, llama, session_cache, tmp_path):
    folder = tmp_path / "mean"
    shutil.copytree(ablated_run, folder)
    record = json.loads((folder / ABLATION).read_text())
    record["mode"] = "mean"
    record["layers"][0]["edit_value"] = 0.75
    (folder / ABLATION).write_text(json.dumps(record))
    text = "The cat sat on the mat and the dog saw the bird."
    result = visualize([folder], text=text, loaded=llama, cache_dir=session_cache, write=False)
    direction = unit(load_probe(folder / "probes" / "layer01.safetensors").direction())
    ids = result.token_ids.tolist()
    expected = model_probability(llama, ids, result.data["target_ids"], (1, direction, "mean", 0.75))
    assert result.ablation.mode == "mean" and result.data["own"]["ablation"]["edit_value"] == [0.75]
    np.testing.assert_allclose(result.ablation.probabilities[0], expected, rtol=1e-4, atol=1e-7)


def test_an_unusable_ablation_is_left_out_with_a_warning(ablated_run, llama, session_cache, tmp_path, caplog):
    folder = tmp_path / "other-target"
    shutil.copytree(ablated_run, folder)
    record = json.loads((folder / ABLATION).read_text())
    record["target_ids"] = [record["target_ids"][0] + 1]
    (folder / ABLATION).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        result = visualize([folder], text="The cat sat.", loaded=llama, cache_dir=session_cache, write=False)
    assert result.ablation is None and result.data["own"]["ablation"] is None
    assert result.model_probabilities is not None
    assert "the page shows no ablation" in caplog.text
    (folder / ABLATION).write_text("{broken")
    result = visualize([folder], text="The cat sat.", loaded=llama, cache_dir=session_cache, write=False)
    assert result.ablation is None and "cannot be read" in caplog.text


def test_probe_files_given_one_by_one_show_no_ablation(ablated_run, llama, session_cache):
    files = [ablated_run / "probes" / "layer01.safetensors", ablated_run / "probes" / "layer02.safetensors"]
    result = visualize(files, text="The cat sat on the mat.", loaded=llama, cache_dir=session_cache, write=False)
    assert result.ablation is None and result.model_probabilities is not None


@pytest.mark.parametrize("task, why", [("current", "whether this token is the target"),
                                       ("ahead:2", "the token 2 ahead")])
def test_current_and_ahead_runs_have_no_model_probability(run, llama, session_cache, tmp_path, task, why):
    files = []
    for path in sorted((run / "probes").glob("layer0[12].safetensors")):
        probe = load_probe(path)
        probe.meta = ProbeMeta.from_dict({**probe.metadata, "task": task})
        probe.save(tmp_path / path.name)
        files.append(tmp_path / path.name)
    result = visualize(files, text="The cat sat on the mat.", loaded=llama, cache_dir=session_cache,
                       out=tmp_path / "page.html")
    assert result.model_probabilities is None and result.ablation is None
    own = embedded(result.path)["own"]
    assert own["prob"] is None and why in own["why"]
    assert embedded(result.path)["tokens"]["model_prob"] is None


def test_page_size_per_token(run, ablated_run, llama, session_cache, tmp_path):
    """The model's own probability costs 16/3 characters a token (base64 of float32), and as much again
    per ablated layer."""
    from tiny_models import synthetic_text

    text = synthetic_text(12, seed=2)
    plain = visualize([run], text=text, loaded=llama, cache_dir=session_cache, out=tmp_path / "plain.html")
    with_ablation = visualize([ablated_run], text=text, loaded=llama, cache_dir=session_cache,
                              out=tmp_path / "ablated.html")
    n = len(plain.token_ids)
    own = plain.data["own"]
    assert len(own["prob"]) == 4 * math.ceil(4 * n / 3)
    assert [len(p) for p in with_ablation.data["own"]["ablation"]["prob"]] == [4 * math.ceil(4 * n / 3)]
    without = dict(plain.data)
    del without["own"]
    extra = plain.path.stat().st_size - len(explore.render_html(without).encode("utf-8"))
    assert extra < 16 / 3 * n + 200
    added = with_ablation.path.stat().st_size - plain.path.stat().st_size
    assert added < 16 / 3 * n + 1000


def test_ablation_results_name_is_the_pipelines():
    assert explore.ABLATION_RESULTS == ABLATION
