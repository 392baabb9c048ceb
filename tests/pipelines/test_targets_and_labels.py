"""Any target, any label: target sets, ahead:K and span labels (--labels, --label-regex) in a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, load_model, load_probe, train
from tokenprobe.cli import build_parser
from tokenprobe.config import config_from_args
from tokenprobe.models.surgery import Unembedding
from cli_helpers import FAST, assert_nothing_written, error_line, run_cli


def _config(model_dir, corpus, **kw) -> RunConfig:
    base = dict(model=str(model_dir), corpus=str(corpus), layers="1,3", context_length=32, dtype="float32",
                device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300, max_iter=50,
                control=False, bootstrap=200)
    return RunConfig(**{**base, **kw})


def test_cli_keeps_a_single_target_as_it_was_and_takes_several():
    parse = build_parser().parse_args
    assert config_from_args(parse(["train"])).target == " the"
    assert config_from_args(parse(["train", "--target", " cat"])).target == " cat"
    assert config_from_args(parse(["train", "--target", " the", " The"])).target == [" the", " The"]
    assert config_from_args(parse(["train", "--target-id", "5", "7"])).target_ids() == [5, 7]
    assert config_from_args(parse(["train", "--target-id", "5"])).target_id == 5


def test_a_target_set_means_any_of_them(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    model = tiny_model_dirs["gpt2"]
    both = train(_config(model, corpus_file, target=[" the", " a"]), out_dir=tmp_path / "both",
                 cache_dir=session_cache, progress=False)
    record = both.record["target"]
    assert record["text"] == "' the' | ' a'" and len(record["token_ids"]) == 2
    probe = load_probe(tmp_path / "both" / "probes" / "layer03.safetensors")
    assert probe.meta.target == "' the' | ' a'" and probe.meta.target_ids == record["token_ids"]
    assert both.baselines and both.layers[0].logit_lens  # the baselines answer "any of them" too
    # the model's own P(any) is the sum of its P(each), and the lens orders positions by that sum
    loaded = load_model(str(model), "float32", "cpu", session_cache)
    unembed = Unembedding.of(loaded.model)
    hidden = torch.randn(40, loaded.hidden_size)
    ids = record["token_ids"]
    np.testing.assert_allclose(unembed.target_probability(hidden, ids),
                               sum(unembed.target_probability(hidden, i) for i in ids), rtol=1e-9)
    np.testing.assert_allclose(np.exp(unembed.target_logit(hidden, ids)),
                               sum(np.exp(unembed.target_logit(hidden, i)) for i in ids), rtol=1e-6)  # float32 products


def test_ahead_k_asks_about_the_token_k_ahead(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    result = train(_config(tiny_model_dirs["llama"], corpus_file, task="ahead:2"), out_dir=tmp_path / "run",
                   cache_dir=session_cache, progress=False)
    assert result.record["sweep_name"].startswith("sweep-ctx32-20k-ahead2-")
    assert not result.baselines  # the model predicts the next token, not the one after it
    assert load_probe(tmp_path / "run" / "probes" / "layer01.safetensors").meta.task == "ahead:2"
    report = (tmp_path / "run" / "report.md").read_text()  # the report says why, not "--no-baselines"
    assert "None: they predict the next token, and this run asks: will the token 2 ahead be ...?" in report
    assert "--no-baselines" not in report
    assert 0.4 < result.best.primary.balanced_accuracy <= 1.0


def test_label_regex_labels_the_matching_tokens(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    config = _config(tiny_model_dirs["gpt2"], corpus_file, task="current", label_regex=r"cat|dog|bird")
    result = train(config, out_dir=tmp_path / "run", cache_dir=session_cache, progress=False)
    record = result.record["target"]
    assert record["text"] == "regex:cat|dog|bird" and record["labels"]["positives"] > 0
    assert "inside a match of /cat|dog|bird/" in record["question"]
    assert not result.baselines
    assert result.best.primary.balanced_accuracy > 0.9  # reading the current token's identity is easy
    meta = load_probe(tmp_path / "run" / "probes" / "layer03.safetensors").meta
    assert meta.target == "regex:cat|dog|bird" and meta.target_ids == []
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["run"]["sweep_name"].startswith("sweep-ctx32-20k-current-regex-")
    assert results["run"]["baselines"]["skipped"].startswith("they predict the next token, and this run asks: "
                                                             "is this token inside a match of /cat|dog|bird/")
    assert "--no-baselines" not in (tmp_path / "run" / "report.md").read_text()


def test_labels_file_must_match_the_corpus(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    bad = tmp_path / "spans.jsonl"
    bad.write_text(json.dumps({"text": "not the corpus", "spans": [[0, 3]]}) + "\n")
    line = error_line(run_cli(["train", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus_file, "--labels", bad,
                               "--task", "current", "--out", tmp_path / "run", "--cache-dir", session_cache, *FAST]))
    assert "document 0" in line, line
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["--task", "ahead:x"], "K in ahead:K must be a whole number"),
    (["--task", "later"], "--task must be next, current or ahead:K"),
    (["--labels", "missing.jsonl"], "file not found"),
    (["--label-regex", "(unclosed"], "is not a regular expression"),
    (["--labels", "a.jsonl", "--label-regex", "x"], "not both"),
])
def test_bad_tasks_and_labels_are_errors_before_the_model_loads(args, message, tmp_path):
    out = tmp_path / "run"
    line = error_line(run_cli(["train", "--model", tmp_path / "no-model", *args, "--out", out, *FAST]))
    assert message in line, line
    assert_nothing_written(out)
