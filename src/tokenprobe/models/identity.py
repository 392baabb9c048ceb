"""A model's identity: fingerprints of its tokenizer and weights, recorded in every run and probe file
so that a probe refuses any other model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenprobe.files import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_fingerprint(directory: Path, cache_dir: Path) -> str:
    """SHA-256 over the weight files of a model directory (each file's hash is cached by its stat)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return "unknown"
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path, cache_dir)}\n".encode())
    return digest.hexdigest()

