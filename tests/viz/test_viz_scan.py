"""`tokenprobe viz SCAN_RUN`: one page for every target of a scan, from one forward pass.

The page's embedded probabilities are checked against `load_probes` on each target's own probe folder,
its truth marks against the token ids, its model probabilities against transformers' own logits; the
refusals are one-line errors. (The browser side: test_viz_browser.py.)"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, TokenprobeError, load_model, load_probe, load_probes
from tokenprobe.cli import main
from tokenprobe.data.text import chunk_ids, resolve_bos
from tokenprobe.pipelines.scan import SCAN_RESULTS, ScanOptions, scan
from tokenprobe.probes.base import ProbeMeta
from tokenprobe.viz import explore
from tokenprobe.viz.explore import decode_probabilities, visualize

CONTEXT = 32


def scan_tiny_run(model_dir: Path, corpus: Path, out: Path, cache_dir: Path, loaded=None, top: int = 4) -> Path:
    """A scan of the `top` most frequent tokens at every layer of a tiny model, in seconds (no bootstrap)."""
    config = RunConfig(model=str(model_dir), corpus=str(corpus), layers="all", context_length=CONTEXT,
                       dtype="float32", device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300,
                       max_iter=50, bootstrap=0, l2=0.01)
    return scan(config, ScanOptions(top=top, positives=100), out_dir=out, loaded=loaded, cache_dir=cache_dir,
                progress=False).out_dir


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs, session_cache):
    return load_model(str(tiny_model_dirs["qwen2"]), "float32", "cpu", session_cache)


@pytest.fixture(scope="module")
def run(tiny_model_dirs, corpus_file, session_cache, qwen, tmp_path_factory) -> Path:
    return scan_tiny_run(tiny_model_dirs["qwen2"], corpus_file, tmp_path_factory.mktemp("viz-scan") / "scan",
                         session_cache, qwen)


@pytest.fixture(scope="module")
def text() -> str:
    from tiny_models import synthetic_text

    return synthetic_text(8, seed=11)  # a few chunks of 32 tokens


@pytest.fixture(scope="module")
def page(run, qwen, text, session_cache, tmp_path_factory):
    return visualize([run], text=text, loaded=qwen, cache_dir=session_cache,
                     out=tmp_path_factory.mktemp("scan-page") / "scan.html")


def scanned_targets(run: Path) -> list[dict]:
    return [t for t in json.loads((run / SCAN_RESULTS).read_text())["targets"] if not t["error"]]


def embedded(path: Path) -> dict:
    html = path.read_text(encoding="utf-8")
    return json.loads(html.split('id="tp-data">', 1)[1].split("</script>", 1)[0])


def test_scan_results_name_is_the_pipelines(run):
    assert explore.SCAN_RESULTS == SCAN_RESULTS and (run / SCAN_RESULTS).is_file()


def test_every_target_and_layer_equals_load_probes_on_its_folder(run, qwen, text, page):
    data = embedded(page.path)
    targets = scanned_targets(run)
    assert len(targets) == 4
    layers = data["layers"]
    assert layers == [0, 1, 2, 3] == page.layers
    n = len(page.token_ids)
    assert data["tokens"]["id"] == page.token_ids.tolist() == qwen.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert n > 2 * CONTEXT  # several chunks
    for j, (target, shown) in enumerate(zip(targets, data["scan"]["targets"])):
        prediction = load_probes(run / target["probe_dir"]).predict(text, loaded=qwen)
        assert prediction.layers == layers and prediction.token_ids == page.token_ids.tolist()
        expected = np.stack([prediction[layer] for layer in layers])
        # what visualize computed: bit for bit (the same single extraction feeds every target's probes)
        np.testing.assert_array_equal(page.scan.probabilities[j], expected)
        # what the page embeds, decoded by hand: 4 decimals, little-endian uint16
        raw = np.frombuffer(base64.b64decode(shown["probs"]), dtype="<u2").reshape(len(layers), n)
        assert (raw <= 10_000).all()
        np.testing.assert_array_equal(raw, np.rint(expected.astype(np.float64) * 10_000))
        np.testing.assert_allclose(decode_probabilities(shown["probs"], (len(layers), n)), expected, rtol=0,
                                   atol=0.5e-4 + 1e-7)
        # the targets differ, so a swapped target would be caught
        if j:
            assert np.abs(page.scan.probabilities[j] - page.scan.probabilities[0]).max() > 1e-3


def test_the_selector_lists_every_scanned_target_in_the_scans_order(run, page):
    data = embedded(page.path)
    targets = scanned_targets(run)
    shown = data["scan"]["targets"]
    assert [(t["text"], t["token_id"], t["rank"], t["best_layer"]) for t in shown] == \
        [(t["text"], t["token_id"], t["rank"], t["best_layer"]) for t in targets]
    assert [t["best"]["balanced_accuracy"] for t in shown] == \
        [round(t["best"]["balanced_accuracy"], 4) for t in targets]
    for t, entry in zip(shown, targets):
        per_layer = [load_probe(p).metadata["metrics"]["eval"]["balanced_accuracy"]
                     for p in sorted((run / entry["probe_dir"]).glob("*.safetensors"))]
        assert [m["eval"]["balanced_accuracy"] for m in t["metrics"]] == [round(v, 4) for v in per_layer]
    # the page opens on the first target: its text, ids and metrics at the top
    assert data["scan"]["selected"] == 0 and data["target"] == shown[0]["text"]
    assert data["target_ids"] == [shown[0]["token_id"]] and data["probs"] is None
    assert page.path.read_text(encoding="utf-8").count("<title>tokenprobe: ") == 1
    assert "scan of 4 targets" in page.path.read_text(encoding="utf-8").split("</title>")[0]


def test_truth_for_each_target_comes_from_the_token_ids(run, page):
    data = embedded(page.path)
    ids = page.token_ids.tolist()
    assert data["scan"]["truth_id"] == ids[1:] + [None]  # next-token task: the token that truly follows
    for j, t in enumerate(data["scan"]["targets"]):
        expected = [float(nxt == t["token_id"]) for nxt in ids[1:]] + [np.nan]
        np.testing.assert_array_equal(page.scan.labels[j], expected)
    assert page.labels == [nxt == data["scan"]["targets"][0]["token_id"] for nxt in ids[1:]] + [None]
    assert data["tokens"]["label"] == [int(v) for v in page.labels[:-1]] + [None]
    assert sum(page.labels[:-1]) >= 3  # ' the', the scan's first target, is frequent


def test_model_probability_of_every_target_equals_softmax_of_the_models_logits(run, qwen, page):
    ids = page.token_ids.tolist()
    bos = resolve_bos(qwen.tokenizer, "auto")  # as the scan chunked (Qwen: no BOS)
    logits = []
    for chunk in chunk_ids(ids, CONTEXT, bos):
        with torch.no_grad():
            out = qwen.model(input_ids=torch.from_numpy(chunk)[None]).logits[0]
        logits.append(out[1:] if bos is not None else out)
    softmax = torch.softmax(torch.cat(logits).double(), dim=-1).numpy()
    data = embedded(page.path)
    for j, t in enumerate(data["scan"]["targets"]):
        expected = softmax[:, t["token_id"]]
        np.testing.assert_allclose(page.scan.model_probabilities[j], expected, rtol=1e-4, atol=1e-7)
        shown = np.frombuffer(base64.b64decode(t["model_prob"]), dtype="<f4")
        np.testing.assert_allclose(shown, expected, rtol=1e-4, atol=1e-7)
    assert data["tokens"]["model_prob"] is None  # the page reads each target's from scan.targets


def test_target_option_picks_the_first_target_shown(run, qwen, session_cache):
    targets = scanned_targets(run)
    second = targets[1]
    result = visualize([run], text="The cat sat on the mat.", loaded=qwen, cache_dir=session_cache, write=False,
                       target=second["text"])
    assert result.scan.selected == 1 and result.data["target"] == second["text"]
    np.testing.assert_array_equal(result.probabilities, result.scan.probabilities[1])
    by_id = visualize([run], text="The cat sat on the mat.", loaded=qwen, cache_dir=session_cache, write=False,
                      target=str(second["token_id"]))
    assert by_id.scan.selected == 1
    with pytest.raises(TokenprobeError, match=r"--target 'zebra' is not among the scan's 4 targets \(' the'"):
        visualize([run], text="The cat.", loaded=qwen, cache_dir=session_cache, write=False, target="zebra")


def test_a_train_run_takes_no_target(run, qwen, session_cache):
    one = run / scanned_targets(run)[0]["probe_dir"]  # one target's probes: an ordinary page
    result = visualize([one], text="The cat sat.", loaded=qwen, cache_dir=session_cache, write=False)
    assert result.scan is None and "scan" not in result.data and result.data["probs"] is not None
    with pytest.raises(TokenprobeError, match="--target picks the target shown first on a scan folder's page"):
        visualize([one], text="The cat.", loaded=qwen, cache_dir=session_cache, write=False, target=" the")


def _copy_scan(run: Path, out: Path, edit) -> Path:
    shutil.copytree(run, out)
    data = json.loads((out / SCAN_RESULTS).read_text())
    edit(data)
    (out / SCAN_RESULTS).write_text(json.dumps(data))
    return out


def test_refuses_a_scan_without_probes(run, qwen, session_cache, tmp_path):
    def fail_all(data):
        for t in data["targets"]:
            t["error"], t["probe_dir"] = "too rare", None

    empty = _copy_scan(run, tmp_path / "empty", fail_all)
    with pytest.raises(TokenprobeError, match=r"scan folder .*empty has no target with probes \(4 targets listed"):
        visualize([empty], text="The cat.", loaded=qwen, cache_dir=session_cache, write=False)

    missing = _copy_scan(run, tmp_path / "missing", lambda data: None)
    shutil.rmtree(missing / scanned_targets(run)[2]["probe_dir"])
    with pytest.raises(TokenprobeError, match=r"the probes of target .* are missing"):
        visualize([missing], text="The cat.", loaded=qwen, cache_dir=session_cache, write=False)

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / SCAN_RESULTS).write_text("{not json")
    with pytest.raises(TokenprobeError, match=r"scan.json cannot be read"):
        visualize([tmp_path / "broken"], text="The cat.", loaded=qwen, cache_dir=session_cache, write=False)

    with pytest.raises(TokenprobeError, match="is a scan folder: show it on its own"):
        visualize([run, run / scanned_targets(run)[0]["probe_dir"]], text="The cat.", loaded=qwen,
                  cache_dir=session_cache, write=False)


def test_a_skipped_target_is_left_out_with_a_warning(run, qwen, session_cache, tmp_path, caplog):
    def skip_second(data):
        data["targets"][1]["error"], data["targets"][1]["probe_dir"] = "too rare", None

    partial = _copy_scan(run, tmp_path / "partial", skip_second)
    result = visualize([partial], text="The cat sat.", loaded=qwen, cache_dir=session_cache, write=False)
    assert [t["rank"] for t in result.data["scan"]["targets"]] == [1, 3, 4]
    assert "1 of the scan's 4 targets were skipped" in caplog.text


def test_cli_writes_a_scan_page_and_errors_in_one_line(run, session_cache, tmp_path, capsys):
    out = tmp_path / "page.html"
    second = scanned_targets(run)[1]["text"]
    assert main(["viz", str(run), "--text", "The cat sat on the mat.", "--target", second, "--out", str(out),
                 "--cache-dir", str(session_cache), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert embedded(out)["scan"]["selected"] == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / SCAN_RESULTS).write_text(json.dumps({"kind": "scan", "targets": []}))
    assert main(["viz", str(tmp_path / "empty"), "--text", "x", "--cache-dir", str(session_cache)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no target with probes (0 targets listed" in err


def test_ahead_k_run_marks_the_token_k_ahead(run, qwen, session_cache, tmp_path):
    """A probe run asking about the token 2 ahead: its truth is read 2 tokens on (not the next token)."""
    folder = run / scanned_targets(run)[0]["probe_dir"]
    files = []
    for path in sorted(folder.glob("*.safetensors"))[:2]:
        probe = load_probe(path)
        probe.meta = ProbeMeta.from_dict({**probe.metadata, "task": "ahead:2"})
        probe.save(tmp_path / path.name)
        files.append(tmp_path / path.name)
    result = visualize(files, text="The cat sat on the mat and the dog saw the bird.", loaded=qwen,
                       cache_dir=session_cache, write=False)
    ids = result.token_ids.tolist()
    target = result.data["target_ids"][0]
    assert result.data["task"] == "ahead:2"
    assert result.labels == [ids[i + 2] == target for i in range(len(ids) - 2)] + [None, None]
    assert sum(bool(v) for v in result.labels) >= 2


def test_page_size_per_probability(run, qwen, session_cache, tmp_path):
    """Each embedded probability costs 8/3 characters (base64 of uint16) whatever its value, each model
    probability 16/3 (float32): 100 targets x 19 layers x 250 tokens make a page of about 1.6 MB."""
    from tiny_models import synthetic_text

    short = visualize([run], text=synthetic_text(4, seed=1), loaded=qwen, cache_dir=session_cache,
                      out=tmp_path / "short.html")
    long = visualize([run], text=synthetic_text(40, seed=1), loaded=qwen, cache_dir=session_cache,
                     out=tmp_path / "long.html")
    n = len(long.token_ids)
    for t in long.data["scan"]["targets"]:
        assert len(t["probs"]) == 4 * math.ceil(2 * 4 * n / 3) and len(t["model_prob"]) == 4 * math.ceil(4 * n / 3)
    per_token = (long.path.stat().st_size - short.path.stat().st_size) / (n - len(short.token_ids))
    # 4 targets x 4 layers of probabilities, 4 model probabilities, and the token's own text, id, chunk,
    # position, label and truth id (under 40 characters for this tokenizer's short tokens)
    assert per_token < 4 * 4 * 8 / 3 + 4 * 16 / 3 + 40


def test_corpus_sample_of_a_scan_shows_its_held_out_chunks(run, qwen, session_cache):
    result = visualize([run], corpus_sample=2, loaded=qwen, cache_dir=session_cache, write=False)
    titles = [d["title"] for d in result.data["documents"]]
    assert len(titles) == 2 and all(t.startswith("held-out chunk ") for t in titles)
    assert result.scan.probabilities.shape == (4, 4, len(result.token_ids))
    ids = result.token_ids.tolist()
    truth = result.data["scan"]["truth_id"]
    first = len(result.data["tokens"]["id"]) // 2  # two chunks of equal length
    assert truth[: first - 1] == ids[1:first] and truth[first:-1] == ids[first + 1:]
    # The corpus goes on after a chunk: its next chunk's first token (after the corpus's last chunk, none).
    from tokenprobe.data.prepare import prepare_chunks

    prepared = prepare_chunks(RunConfig.from_dict(json.loads((run / SCAN_RESULTS).read_text())["config"]), qwen,
                              session_cache, progress=False)
    start = 0 if prepared.bos_id is None else 1
    for k, title in enumerate(titles):
        c = int(title.split()[2])
        following = int(prepared.chunks[c + 1, start]) if c + 1 < len(prepared.chunks) else None
        assert truth[(k + 1) * first - 1] == following


def test_target_texts_cannot_break_out_of_the_page(run, qwen, session_cache, tmp_path):
    evil = '</script><script>window.pwned=1</script><img src=x onerror="alert(1)">'

    def rename(data):
        data["targets"][0]["text"] = evil

    folder = _copy_scan(run, tmp_path / "evil", rename)
    result = visualize([folder], text="The cat sat.", loaded=qwen, cache_dir=session_cache, out=tmp_path / "p.html")
    html = result.path.read_text(encoding="utf-8")
    assert result.data["scan"]["targets"][0]["text"] == evil and "\\u003c/script\\u003e" in html
    assert "<script>window" not in html and "<img" not in html and html.count("<script") == html.count("</script>")
    code = html.split('id="tp-data">', 1)[0] + html.split('id="tp-data">', 1)[1].split("</script>", 1)[1]
    assert not re.search(r"<link|<img|@import|url\(|\bsrc=|\bhref=|fetch\(|XMLHttpRequest", code)  # no fetches
