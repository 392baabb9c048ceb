"""Shared fixtures: tiny models of four architectures, a synthetic corpus, an isolated cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import ARCHITECTURES, build_all, synthetic_text  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """{'gemma3': dir, 'llama': dir, 'gpt2': dir, 'qwen2': dir}, each a save_pretrained model with its tokenizer."""
    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_model_dir(request, tiny_model_dirs) -> Path:
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A .txt corpus of synthetic sentences, about 60k tokens for the tiny tokenizer."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(synthetic_text(3000, seed=7), encoding="utf-8")
    return path


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    """A fresh tokenprobe cache per test, so tests never share or pollute ~/.cache."""
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenprobe-cache")
