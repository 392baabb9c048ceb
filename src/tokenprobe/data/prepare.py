"""`prepare`: the one data path from a run config to labelled, sampled positions.

Training, the HTML explorer, the benchmark and (later) evaluation on another corpus all call it, so
they see the same chunks, the same split and the same positions for the same config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenprobe.config import RunConfig
from tokenprobe.data.chunks import load_chunks
from tokenprobe.data.corpus import Corpus, load_corpus
from tokenprobe.config import task_offset
from tokenprobe.data.labels import Labeler, TargetSet, ahead, cached_targets, make_labeler
from tokenprobe.data.spans import make_span_labeler
from tokenprobe.data.positions import PositionSet, Split, sample_positions, split_chunks


@dataclass
class Prepared:
    """Everything decided before the model runs: corpus, chunks, target, split, labels and positions."""

    config: RunConfig
    corpus: Corpus
    chunks: np.ndarray  # (n_chunks, context_length) int64
    bos_id: int | None  # the token every chunk starts with (config.bos resolved for the tokenizer), or None
    chunks_from_cache: bool
    split: Split
    target: TargetSet | None = None  # None for labels that are not a token (--labels, --label-regex)
    labeler: Labeler | None = None
    labels: np.ndarray | None = None  # like `chunks`, bool
    valid: np.ndarray | None = None  # like `chunks`, bool
    positions: PositionSet | None = None

    def corpus_record(self) -> dict[str, Any]:
        return {"name": self.corpus.name, "sha256": self.corpus.sha256, "documents": len(self.corpus.documents),
                "chunks": len(self.chunks), "train_chunks": len(self.split.train), "eval_chunks": len(self.split.eval),
                "chunks_from_cache": self.chunks_from_cache, "bos": self.config.bos, "bos_id": self.bos_id}

    def bos_note(self) -> str:
        """How the chunks start, for a status line: 'each starting with BOS 2' or 'without BOS'."""
        if self.bos_id is None:
            return "without BOS" + (" (--bos auto: the tokenizer adds none)" if self.config.bos == "auto" else "")
        return f"each starting with BOS {self.bos_id}"


def prepare_chunks(config: RunConfig, loaded, cache_dir: Path, progress: bool = True) -> Prepared:
    """The corpus, its chunks (cached) and the seeded split by chunk; no labels or positions."""
    corpus = load_corpus(config.corpus, config.text_field, config.corpus_config, config.corpus_split)
    chunks, bos_id, from_cache = load_chunks(corpus, lambda: loaded.tokenizer, loaded.tokenizer_hash,
                                             config.context_length, cache_dir, progress, config.bos)
    max_chunks = config.max_tokens // config.context_length if config.max_tokens else None
    split = split_chunks(len(chunks), config.eval_fraction, config.seed, max_chunks)
    return Prepared(config=config, corpus=corpus, chunks=chunks, bos_id=bos_id, chunks_from_cache=from_cache,
                    split=split)


def prepare(config: RunConfig, loaded, cache_dir: Path, progress: bool = True, say=None) -> Prepared:
    """Chunks, target, labels (through the config's Labeler) and the sampled positions of a run.

    `loaded` gives the tokenizer (only when the chunks or the target are not cached yet) and its
    fingerprint; `say` receives one status line per stage.
    """
    say = say or (lambda message: None)
    target = None
    if config.span_labels is None:
        target = cached_targets(loaded, [] if config.target_id is not None else config.targets(),
                                config.target_ids(), cache_dir)
        say(target.describe())
    prepared = prepare_chunks(config, loaded, cache_dir, progress)
    say(f"Corpus {prepared.corpus.name}: {len(prepared.corpus.documents):,} documents, {len(prepared.chunks):,} "
        f"chunks of {config.context_length} tokens {prepared.bos_note()}"
        f"{' (cached)' if prepared.chunks_from_cache else ''}")
    if target is not None:
        labeler = make_labeler(config.task, target.token_ids)
    else:
        spans = make_span_labeler(config.span_labels, prepared.corpus, loaded.tokenizer, config.context_length,
                                  config.bos)
        labeler = ahead(spans, task_offset(config.task), config.task)
        say(f"Labels: {spans.question.removeprefix('is this token ')}: {spans.positives:,} positive tokens "
            f"in the corpus's chunks; the task asks {labeler.question} ...")
    labels, valid = labeler.labels(prepared.chunks, has_bos=prepared.bos_id is not None)
    positions = sample_positions(labels, valid, prepared.split, config.train_positions, config.eval_positions,
                                 config.balance, config.seed)
    prepared.target, prepared.labeler, prepared.labels, prepared.valid = target, labeler, labels, valid
    prepared.positions = positions
    return prepared

