"""Tokenized, fixed-length chunks of a corpus, cached on disk.

Documents are tokenized one by one, joined with a blank line's tokens into one stream, and cut
into chunks of ``context_length`` tokens, each starting with the tokenizer's BOS token where ``--bos``
says so (by default where the tokenizer itself adds one: :func:`tokenprobe.data.text.resolve_bos`).
Every chunk is full, so no padding or attention mask is ever needed. The cache file is keyed by the
corpus content, the tokenizer, the context length and the BOS choice, and carries a checksum of its
data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from tokenprobe.data.corpus import Corpus
from tokenprobe.data.text import resolve_bos
from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes

SEPARATOR = "\n\n"
CACHE_VERSION = "2"  # 2: the BOS id is stored with the chunks


class Chunks(NamedTuple):
    ids: np.ndarray  # (n, context_length) int64
    bos_id: int | None  # the token every chunk starts with, or None when the tokenizer has no BOS
    from_cache: bool


def chunk_cache_path(cache_dir: Path, corpus: Corpus, tokenizer_hash: str, context_length: int,
                     bos: str = "auto") -> Path:
    """The cache file of these chunks; `bos` is the --bos choice (with the tokenizer, it decides the BOS)."""
    key = hashlib.sha256(f"{CACHE_VERSION}|{corpus.sha256}|{tokenizer_hash}|{context_length}|bos={bos}".encode())
    key = key.hexdigest()
    return cache_dir / "chunks" / f"{key[:24]}.safetensors"


def _checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _load_cached(path: Path) -> Chunks | None:
    """The cached chunks, or None if absent, unreadable, or failing their checksum."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        chunks = load_file(str(path))["chunks"].numpy()
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
        return None
    if meta.get("sha256") != _checksum(chunks) or "bos_id" not in meta:
        return None
    bos_id = json.loads(meta["bos_id"])
    return Chunks(chunks.astype(np.int64), bos_id, True)


def tokenize_stream(documents: list[str], tokenizer, progress: bool = True) -> np.ndarray:
    """All documents as one token stream, separated by the tokens of a blank line."""
    separator = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    pieces: list[np.ndarray] = []
    batch = 256
    with tqdm(total=len(documents), desc="Tokenizing", unit="doc", disable=not progress, dynamic_ncols=True) as bar:
        total_tokens = 0
        for start in range(0, len(documents), batch):
            encoded = tokenizer(documents[start : start + batch], add_special_tokens=False)["input_ids"]
            for ids in encoded:
                pieces.append(np.asarray(ids, dtype=np.int64))
                pieces.append(np.asarray(separator, dtype=np.int64))
                total_tokens += len(ids) + len(separator)
            bar.update(len(encoded))
            bar.set_postfix_str(f"{total_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s")
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def make_chunks(stream: np.ndarray, context_length: int, bos_id: int | None) -> np.ndarray:
    body = context_length - (1 if bos_id is not None else 0)
    n = len(stream) // body
    chunks = stream[: n * body].reshape(n, body)
    if bos_id is not None:
        chunks = np.concatenate([np.full((n, 1), bos_id, dtype=stream.dtype), chunks], axis=1)
    return chunks


def load_chunks(
    corpus: Corpus,
    get_tokenizer: Callable[[], Any],
    tokenizer_hash: str,
    context_length: int,
    cache_dir: Path,
    progress: bool = True,
    bos: str = "auto",
) -> Chunks:
    """The corpus as chunks of `context_length` tokens, from the cache or tokenized now, each starting
    with BOS as `bos` (the run's --bos) resolves for this tokenizer.

    `get_tokenizer` returns the tokenizer; it is called only when the chunks are not cached, so a
    cached run need not load the tokenizer at all (the resolved BOS is stored with the chunks).
    """
    path = chunk_cache_path(cache_dir, corpus, tokenizer_hash, context_length, bos)
    cached = _load_cached(path)
    if cached is not None:
        return cached
    tokenizer = get_tokenizer()
    bos_id = resolve_bos(tokenizer, bos)
    chunks = make_chunks(tokenize_stream(corpus.documents, tokenizer, progress), context_length, bos_id)
    if len(chunks) == 0:
        raise TokenprobeError(
            f"corpus {corpus.name} has fewer tokens than one chunk of {context_length}; "
            "use a larger corpus or a smaller --context-length"
        )
    store = chunks.astype(np.int32) if chunks.max() < 2**31 else chunks
    metadata = {
        "sha256": _checksum(store),
        "corpus_sha256": corpus.sha256,
        "tokenizer_sha256": tokenizer_hash,
        "context_length": str(context_length),
        "bos": bos,
        "bos_id": json.dumps(bos_id),
        "info": json.dumps({"corpus": corpus.name, "documents": len(corpus.documents)}),
    }
    atomic_write_bytes(path, save({"chunks": torch.from_numpy(np.ascontiguousarray(store))}, metadata=metadata))
    return Chunks(chunks, bos_id, False)
