"""`tokenprobe viz`, Python side: probabilities, chunking, metadata, refusals, the embedded JSON."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import TokenprobeError, load_model, load_probe
from tokenprobe.cli import main
from tokenprobe.config import RunConfig
from tokenprobe.data.positions import split_chunks
from tokenprobe.probes.base import ProbeMeta
from tokenprobe.probes.linear import LinearProbe
from tokenprobe.viz.explore import embed_json, render_html, tokenize_text, visualize
from viz_fixtures import TRICKY_TEXT, train_tiny_run

CONTEXT = 32


@pytest.fixture(scope="module")
def gpt2_run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model_dirs["gpt2"], corpus_file, tmp_path_factory.mktemp("viz") / "gpt2-run",
                          session_cache, CONTEXT)


@pytest.fixture(scope="module")
def gpt2(tiny_model_dirs, session_cache):
    return load_model(str(tiny_model_dirs["gpt2"]), "float32", "cpu", session_cache)


def reference_probabilities(loaded, run: Path, ids: list[int], layer: int) -> np.ndarray:
    """The probe of `layer` on hidden states from transformers' own output_hidden_states, chunk by chunk."""
    probe = load_probe(run / "probes" / f"layer{layer:02d}.safetensors")
    bos = json.loads((run / "run.json").read_text())["corpus"]["bos_id"]  # as the run chunked (GPT-2: none)
    prefix = [] if bos is None else [bos]
    out = []
    for start in range(0, len(ids), CONTEXT - len(prefix)):
        chunk = torch.tensor([prefix + ids[start : start + CONTEXT - len(prefix)]])
        with torch.no_grad():
            hidden = loaded.model(input_ids=chunk, output_hidden_states=True).hidden_states[layer][0, len(prefix):]
        out.append(probe.predict_proba(hidden).numpy())
    return np.concatenate(out)


def test_probabilities_match_independent_forward_pass_over_several_chunks(gpt2_run, gpt2, session_cache):
    from tiny_models import synthetic_text

    text = synthetic_text(12, seed=5)
    result = visualize([gpt2_run], text=text, loaded=gpt2, cache_dir=session_cache, write=False)
    ids = gpt2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * CONTEXT  # several chunks, so the per-chunk restart is exercised
    assert result.token_ids.tolist() == ids
    assert result.layers == [0, 1, 2, 3]
    # output_hidden_states' last entry is after the final norm, ours before it: compare the others.
    for layer in (0, 1, 2):
        expected = reference_probabilities(gpt2, gpt2_run, ids, layer)
        np.testing.assert_allclose(result.probabilities[layer], expected, atol=1e-5)
    # the layers really differ, so a probe attached to the wrong layer would be caught above
    assert np.abs(result.probabilities[1] - result.probabilities[2]).max() > 1e-3


def test_layer_comes_from_the_probe_file_not_the_order_given(gpt2_run, gpt2, session_cache):
    files = [gpt2_run / "probes" / "layer02.safetensors", gpt2_run / "probes" / "layer01.safetensors"]
    result = visualize(files, text="The cat sat on the mat.", loaded=gpt2, cache_dir=session_cache, write=False)
    assert result.layers == [1, 2]
    ids = result.token_ids.tolist()
    np.testing.assert_allclose(result.probabilities[1], reference_probabilities(gpt2, gpt2_run, ids, 2), atol=1e-5)
    assert result.data["metrics"][1]["eval"]["balanced_accuracy"] == pytest.approx(
        load_probe(files[0]).metadata["metrics"]["eval"]["balanced_accuracy"])


def test_labels_say_whether_the_target_truly_follows(gpt2_run, gpt2, session_cache):
    result = visualize([gpt2_run], text="The cat sat on the mat and the dog", loaded=gpt2, cache_dir=session_cache,
                       write=False)
    ids = result.token_ids.tolist()
    target = load_probe(gpt2_run / "probes" / "layer00.safetensors").metadata["target_ids"][0]
    assert result.labels == [nxt == target for nxt in ids[1:]] + [None]
    assert sum(bool(v) for v in result.labels) == 2
    assert result.data["tokens"]["label"] == [None if v is None else int(v) for v in result.labels]


def test_pieces_reproduce_the_text_exactly(gpt2):
    ids, pieces = tokenize_text(gpt2.tokenizer, TRICKY_TEXT)
    assert "".join(s for s, _ in pieces) == TRICKY_TEXT
    assert [i for _, i in pieces if i >= 0] == list(range(len(ids)))


def test_refuses_a_probe_from_another_model(gpt2_run, tiny_model_dirs, session_cache):
    llama = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", session_cache)
    with pytest.raises(TokenprobeError, match=r"layer 0 probe does not fit: .*use the model named in the probe"):
        visualize([gpt2_run], text="The cat.", loaded=llama, cache_dir=session_cache, write=False)


@pytest.mark.parametrize("key, value, field", [("model_source", "/elsewhere/llama", "model"),
                                               ("context_length", 64, "context_length"), ("task", "current", "task")])
def test_refuses_probes_of_different_runs(gpt2_run, session_cache, tmp_path, key, value, field):
    other = load_probe(gpt2_run / "probes" / "layer02.safetensors")
    other.meta = ProbeMeta.from_dict({**other.metadata, key: value})
    other.save(tmp_path / "other.safetensors")
    files = [gpt2_run / "probes" / "layer01.safetensors", tmp_path / "other.safetensors"]
    with pytest.raises(TokenprobeError, match=f"probes disagree on {field}"):
        visualize(files, text="The cat.", cache_dir=session_cache, write=False)


def test_refuses_two_probes_for_one_layer(gpt2_run, gpt2, session_cache):
    file = gpt2_run / "probes" / "layer01.safetensors"
    with pytest.raises(TokenprobeError, match="two probes for layer 1"):
        visualize([file, file], text="The cat.", loaded=gpt2, cache_dir=session_cache, write=False)


def test_nan_probabilities_become_null(gpt2_run, gpt2, session_cache, tmp_path):
    probe = load_probe(gpt2_run / "probes" / "layer01.safetensors")
    LinearProbe(weight=torch.full_like(probe.weight, float("nan")), bias=probe.bias, mean=probe.mean,
                scale=probe.scale, meta=probe.meta).save(tmp_path / "nan.safetensors")
    result = visualize([tmp_path / "nan.safetensors"], text="The cat sat.", loaded=gpt2, cache_dir=session_cache,
                       out=tmp_path / "page.html")
    assert np.isnan(result.probabilities).all()
    assert result.data["probs"] == [[None] * len(result.token_ids)]
    page = result.path.read_text(encoding="utf-8")
    embedded = page.split('id="tp-data">', 1)[1].split("</script>", 1)[0]
    assert "NaN" not in embedded and "Infinity" not in embedded
    assert json.loads(embedded)["probs"] == [[None] * len(result.token_ids)]


def test_embedded_json_cannot_break_out_of_the_script():
    data = {"text": "</script><script>alert(1)</script><!-- & \u2028", "p": [float("nan"), 0.5, float("inf")]}
    embedded = embed_json(data)
    assert "<" not in embedded and ">" not in embedded and "&" not in embedded
    assert json.loads(embedded) == {"text": data["text"], "p": [None, 0.5, None]}
    page = render_html({"model": "m</title><b>", "task": "next", "target": " the", **data})
    assert page.count("</script>") == 2  # the data block's and the code's, nothing from the data
    assert "<title>tokenprobe: m&lt;/title&gt;&lt;b&gt;" in page


def test_page_is_self_contained(gpt2_run, gpt2, session_cache, tmp_path):
    result = visualize([gpt2_run], text=TRICKY_TEXT, loaded=gpt2, cache_dir=session_cache, out=tmp_path / "p.html")
    page = result.path.read_text(encoding="utf-8")
    assert not re.search(r"<link|<img|@import|url\(|\bsrc=|\bhref=|fetch\(|XMLHttpRequest", page)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]  # a namespace, not a fetch
    assert "&nbsp;" not in page and "pre-wrap" not in page and "break-spaces" not in page


def test_corpus_sample_takes_held_out_chunks_of_the_run(gpt2_run, gpt2, session_cache):
    from tokenprobe.data.chunks import load_chunks
    from tokenprobe.data.corpus import load_corpus

    result = visualize([gpt2_run], corpus_sample=3, loaded=gpt2, cache_dir=session_cache, write=False)
    run = json.loads((gpt2_run / "run.json").read_text())
    config = RunConfig.from_dict(run["config"])
    corpus = load_corpus(config.corpus)
    chunks, bos_id, _ = load_chunks(corpus, lambda: gpt2.tokenizer, gpt2.tokenizer_hash, CONTEXT, session_cache,
                                    progress=False, bos=config.bos)
    start = 0 if bos_id is None else 1  # GPT-2's tokenizer adds no BOS: with --bos auto, none
    split = split_chunks(len(chunks), config.eval_fraction, config.seed, config.max_tokens // CONTEXT)
    shown = [int(re.search(r"chunk (\d+)", d["title"]).group(1)) for d in result.data["documents"]]
    assert shown == [int(c) for c in split.eval[:3]]
    assert not set(shown) & {int(c) for c in split.train}
    assert result.token_ids.tolist() == np.concatenate([chunks[c, start:] for c in shown]).tolist()


def test_cli_writes_the_page_and_prints_its_path(gpt2_run, session_cache, tmp_path, capsys):
    out = tmp_path / "page.html"
    code = main(["viz", str(gpt2_run), "--text", "The cat sat on the mat.", "--out", str(out),
                 "--cache-dir", str(session_cache), "--device", "cpu", "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.stat().st_size > 1000 and "tp-data" in out.read_text(encoding="utf-8")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["viz", str(tmp_path / "missing"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a run folder nor a probe file" in err
    with pytest.raises(SystemExit):
        main(["viz", str(tmp_path), "--text", "x", "--file", "y"])  # one text source only


def test_open_without_a_browser_says_where_the_page_is(gpt2_run, session_cache, tmp_path, monkeypatch, capsys):
    import webbrowser

    monkeypatch.setattr(webbrowser, "open", lambda url: False)
    page = tmp_path / "page.html"
    assert main(["viz", str(gpt2_run), "--text", "The cat.", "--out", str(page), "--open", "--cache-dir",
                 str(session_cache), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no browser found" in err and str(page.resolve()) in err and page.is_file()
