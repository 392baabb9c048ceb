"""--bos auto|always|never: which chunks start with the tokenizer's BOS token, the chunk cache keyed on it,
saved configs without it (legacy), and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cli_helpers import FAST, assert_nothing_written, error_line, run_cli
from tiny_models import build_tokenizer
from tokenprobe.config import LEGACY_BOS, RunConfig
from tokenprobe.data.chunks import chunk_cache_path, load_chunks
from tokenprobe.data.corpus import load_corpus
from tokenprobe.data.spans import make_span_labeler
from tokenprobe.data.text import chunk_ids, resolve_bos, tokenizer_adds_bos
from tokenprobe.errors import TokenprobeError
from tokenprobe.models.identity import tokenizer_fingerprint


@pytest.fixture(scope="module")
def adds(tmp_path_factory):
    """Adds its BOS to an encoded text, as Gemma's and Llama's tokenizers do."""
    return build_tokenizer(tmp_path_factory.mktemp("adds"), adds_bos=True)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """Names a BOS token but never adds it, as GPT-2's tokenizer and Qwen's from a GGUF file."""
    return build_tokenizer(tmp_path_factory.mktemp("names"), adds_bos=False)


@pytest.fixture(scope="module")
def lacks(names):
    """Has no BOS token at all, as Qwen's own (Hugging Face) tokenizer."""
    return PreTrainedTokenizerFast(tokenizer_object=names.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")


def test_auto_always_never_on_tokenizers_with_and_without_bos(adds, names, lacks):
    bos = adds.bos_token_id
    assert bos is not None and names.bos_token_id == bos and lacks.bos_token_id is None
    assert tokenizer_adds_bos(adds) and not tokenizer_adds_bos(names) and not tokenizer_adds_bos(lacks)
    assert not getattr(adds, "add_bos_token", False)  # what the tokenizer does decides, not this flag
    assert [resolve_bos(adds, m) for m in ("auto", "always", "never", LEGACY_BOS)] == [bos, bos, None, bos]
    assert [resolve_bos(names, m) for m in ("auto", "always", "never", LEGACY_BOS)] == [None, bos, None, bos]
    assert [resolve_bos(lacks, m) for m in ("auto", "never", LEGACY_BOS)] == [None, None, None]
    with pytest.raises(TokenprobeError, match="--bos always: this tokenizer has no BOS token; use --bos auto or never"):
        resolve_bos(lacks, "always")
    with pytest.raises(TokenprobeError, match="--bos must be auto, always or never, got 'sometimes'"):
        resolve_bos(adds, "sometimes")


def test_chunk_ids_with_and_without_bos():
    assert [c.tolist() for c in chunk_ids(list(range(7)), 4, 99)] == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6]]
    assert [c.tolist() for c in chunk_ids(list(range(7)), 4, None)] == [[0, 1, 2, 3], [4, 5, 6]]


def test_chunks_follow_bos_and_the_cache_is_keyed_on_it(names, corpus_file, cache_dir):
    h = tokenizer_fingerprint(names)
    corpus = load_corpus(str(corpus_file))
    paths = {m: chunk_cache_path(cache_dir, corpus, h, 32, m) for m in ("auto", "always", "never", LEGACY_BOS)}
    assert len(set(paths.values())) == 4
    assert chunk_cache_path(cache_dir, corpus, h, 32) == paths["auto"]  # the default is --bos's
    auto = load_chunks(corpus, lambda: names, h, 32, cache_dir, progress=False, bos="auto")
    always = load_chunks(corpus, lambda: names, h, 32, cache_dir, progress=False, bos="always")
    assert not auto.from_cache and not always.from_cache and auto.bos_id is None
    assert always.bos_id == names.bos_token_id and (always.ids[:, 0] == names.bos_token_id).all()
    assert not (auto.ids == names.bos_token_id).any()  # the stream itself never holds BOS
    # The same stream, cut with and without room for BOS.
    stream = auto.ids.reshape(-1)
    np.testing.assert_array_equal(always.ids[:, 1:].reshape(-1), stream[: always.ids[:, 1:].size])
    for mode, first in (("auto", auto), ("always", always)):  # from the cache, with its BOS, no tokenizer needed
        again = load_chunks(corpus, lambda: pytest.fail("tokenizer loaded"), h, 32, cache_dir, progress=False, bos=mode)
        assert again.from_cache and again.bos_id == first.bos_id and np.array_equal(again.ids, first.ids)
    assert all(paths[m].exists() for m in ("auto", "always"))


def test_span_labels_are_cut_like_the_chunks(names, corpus_file, cache_dir):
    corpus = load_corpus(str(corpus_file))
    h = tokenizer_fingerprint(names)
    for mode in ("auto", "always"):
        chunks = load_chunks(corpus, lambda: names, h, 32, cache_dir, progress=False, bos=mode)
        labeler = make_span_labeler(r"regex:\bthe\b", corpus, names, 32, mode)
        labels, valid = labeler.labels(chunks.ids, has_bos=chunks.bos_id is not None)
        assert labels.any() and valid[:, 0].all() == (mode == "auto")


def test_config_validates_bos_and_reads_configs_saved_before_it():
    assert RunConfig().bos == "auto"
    for mode in ("auto", "always", "never"):
        RunConfig(bos=mode).validate()
    with pytest.raises(TokenprobeError, match="^--bos must be auto, always or never, got 'sometimes'$"):
        RunConfig(bos="sometimes").validate()
    saved = RunConfig(bos="never").to_dict()
    assert saved["bos"] == "never" and RunConfig.from_dict(saved).bos == "never"
    del saved["bos"]  # a run.json or probe file from before --bos
    old = RunConfig.from_dict(saved)
    assert old.bos == LEGACY_BOS
    old.validate()


# ------------------------------------------------------------------------------------ through the CLI


def test_bad_bos_is_one_line_before_the_model_loads(tmp_path, corpus_file, session_cache):
    out = tmp_path / "run"
    proc = run_cli(["train", "--model", tmp_path / "no-such-model", "--corpus", corpus_file, "--out", out,
                    "--cache-dir", session_cache, *FAST, "--bos", "sometimes"])
    assert error_line(proc) == "tokenprobe: error: --bos must be auto, always or never, got 'sometimes'"
    assert_nothing_written(out)


@pytest.fixture(scope="module")
def qwen_without_bos(tiny_model_dirs, tmp_path_factory) -> Path:
    """The tiny Qwen2 with a tokenizer that names no BOS token, as Qwen's own tokenizer."""
    folder = tmp_path_factory.mktemp("no-bos") / "qwen2"
    shutil.copytree(tiny_model_dirs["qwen2"], folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("bos_token", None)
    config_file.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).bos_token_id is None
    return folder


def test_always_on_a_tokenizer_without_bos_is_one_line(tmp_path, qwen_without_bos, corpus_file, session_cache):
    out = tmp_path / "run"
    proc = run_cli(["train", "--model", qwen_without_bos, "--corpus", corpus_file, "--out", out,
                    "--cache-dir", session_cache, *FAST, "--bos", "always"])
    assert error_line(proc) == "tokenprobe: error: --bos always: this tokenizer has no BOS token; use --bos auto or never"
    assert_nothing_written(out)
