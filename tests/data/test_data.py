"""Corpus readers (bundled, files, folders, datasets) and the tokenized chunk cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from tokenprobe.data.chunks import chunk_cache_path, load_chunks, make_chunks
from tokenprobe.data.corpus import DEFAULT_CORPUS, load_corpus
from tokenprobe.errors import TokenprobeError
from tokenprobe.models.identity import tokenizer_fingerprint


def test_bundled_corpus():
    corpus = load_corpus(DEFAULT_CORPUS)
    assert len(corpus.documents) > 10_000 and len(corpus.sha256) == 64
    assert all(d.strip() for d in corpus.documents[:100])


def test_file_formats_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"body": "second"}\n\n{"body": "third"}\n', encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "fourth"}]), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["fifth", None]}), tmp_path / "d.parquet")
    assert load_corpus(str(tmp_path / "b.jsonl"), text_field="body").documents == ["second", "third"]
    assert load_corpus(str(tmp_path / "d.parquet"), text_field="body").documents == ["fifth"]
    folder = load_corpus(str(tmp_path), text_field="body")
    assert folder.documents == ["first document", "second", "third", "fourth", "fifth"]
    with pytest.raises(TokenprobeError, match="no text field 'text'.*body"):
        load_corpus(str(tmp_path / "b.jsonl"))
    with pytest.raises(TokenprobeError, match="no column 'text'"):
        load_corpus(str(tmp_path / "d.parquet"))


def test_hash_follows_content(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("one", encoding="utf-8")
    first = load_corpus(str(path)).sha256
    path.write_text("two", encoding="utf-8")
    assert load_corpus(str(path)).sha256 != first


def test_bad_corpora(tmp_path):
    with pytest.raises(TokenprobeError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(TokenprobeError, match="empty"):
        load_corpus(str(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TokenprobeError, match="not UTF-8"):
        load_corpus(str(latin))


def test_datasets_saved_folder_and_dataset_name_path(tmp_path):
    """The Hugging Face code path, with local data (the hub is unreachable in tests)."""
    import datasets

    datasets.Dataset.from_dict({"content": ["alpha text", "beta text"]}).save_to_disk(tmp_path / "saved")
    assert load_corpus(str(tmp_path / "saved"), text_field="content").documents == ["alpha text", "beta text"]
    # load_dataset with a folder of parquet files: the same call a hub name goes through.
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hubish" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["gamma", "delta"]}), tmp_path / "hubish" / "data" / "train-0.parquet")
    from tokenprobe.data.corpus import _read_hf_dataset

    assert _read_hf_dataset(str(tmp_path / "hubish"), None, "train", "text", saved=False) == ["gamma", "delta"]
    with pytest.raises(TokenprobeError, match="cannot load dataset"):
        _read_hf_dataset(str(tmp_path / "hubish"), None, "nosuchsplit", "text", saved=False)


def test_make_chunks_prepends_bos_and_drops_the_tail():
    chunks = make_chunks(np.arange(10), context_length=4, bos_id=99)
    assert chunks.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    assert make_chunks(np.arange(10), 4, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_chunk_cache_is_reused_keyed_and_verified(tiny_model_dirs, corpus_file, cache_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    h = tokenizer_fingerprint(tok)
    corpus = load_corpus(str(corpus_file))
    calls = []

    def get_tokenizer():
        calls.append(1)
        return tok

    first, bos, cached = load_chunks(corpus, get_tokenizer, h, 64, cache_dir, progress=False)
    assert not cached and first.shape[1] == 64 and (first[:, 0] == tok.bos_token_id).all() and bos == tok.bos_token_id
    again, bos, cached = load_chunks(corpus, get_tokenizer, h, 64, cache_dir, progress=False)
    assert cached and np.array_equal(first, again) and bos == tok.bos_token_id
    assert len(calls) == 1  # a cached entry needs no tokenizer
    # The stream is the tokenized documents: decoding a chunk gives corpus text back.
    assert tok.decode(first[0, 1:]) in corpus_file.read_text()
    # Another context length is another cache entry.
    other, _, cached = load_chunks(corpus, get_tokenizer, h, 32, cache_dir, progress=False)
    assert not cached and other.shape[1] == 32
    # A corrupted entry is detected by its checksum and rebuilt, not used.
    path = chunk_cache_path(cache_dir, corpus, h, 64)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    rebuilt, _, cached = load_chunks(corpus, get_tokenizer, h, 64, cache_dir, progress=False)
    assert not cached and np.array_equal(rebuilt, first)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert not load_chunks(corpus, get_tokenizer, h, 64, cache_dir, progress=False).from_cache
