"""Span labels: "is this token inside a marked stretch of text?", a label that is not a token's identity.

Spans are half-open character ranges ``[start, end)`` per document, read from a JSONL file
(:func:`read_span_file`) or found by a regular expression (:func:`regex_spans`). They become one label
per token of the very stream :func:`~tokenprobe.data.chunks.tokenize_stream` builds (each document
tokenized without special tokens, then the separator's tokens, which are never positive): a token is
positive when its character range overlaps a span (token ``[a, b)`` and span ``[s, e)`` overlap iff
``a < e and s < b``; a token with an empty range is negative). Offsets are in characters (Python string
indices), so they need a fast tokenizer.

:class:`SpanLabeler` cuts those labels exactly as :func:`~tokenprobe.data.chunks.make_chunks` cuts the
stream and refuses chunks other than the ones it cut. A pipeline builds it with :func:`make_span_labeler`
from ``--task regex:<pattern>`` or ``--task spans:<file.jsonl>``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tokenprobe.data.chunks import SEPARATOR, make_chunks, tokenize_stream
from tokenprobe.data.labels import SPAN_TASK_PREFIXES
from tokenprobe.data.text import resolve_bos
from tokenprobe.errors import TokenprobeError

Span = tuple[int, int]

_EXCERPT = 24  # characters shown either side of a difference


def _documents_of(corpus) -> list[str]:
    """A Corpus's documents, or a list of documents as is."""
    return list(corpus.documents) if hasattr(corpus, "documents") else list(corpus)


def _excerpt(text: str, at: int) -> str:
    start, end = max(at - _EXCERPT, 0), at + _EXCERPT
    return ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_spans(spans, text: str, where: str) -> list[Span]:
    """`spans` as a list of (start, end) within `text`, or an error naming `where` and the bad span."""
    if not isinstance(spans, (list, tuple)):
        raise TokenprobeError(f"{where}: spans must be a list of [start, end] pairs, got {type(spans).__name__}")
    checked = []
    for number, span in enumerate(spans):
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(_is_int(v) for v in span)):
            raise TokenprobeError(f"{where}: span {number} is {span!r}, not a pair of whole numbers [start, end]")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(text):
            raise TokenprobeError(
                f"{where}: span {number} [{start}, {end}) is "
                + ("empty or reversed (start must be < end)" if start >= end else
                   f"out of range: the text has {len(text)} characters (spans are [start, end) in characters)")
            )
        checked.append((start, end))
    return checked


# ---------------------------------------------------------------------------------------- sources


def read_span_file(path: str | Path, corpus) -> list[list[Span]]:
    """The spans of each corpus document from a JSONL file: one object per document, in corpus order,
    ``{"text": "...", "spans": [[start, end], ...]}`` with character offsets into that text.

    Each text must equal the corpus document it stands for (the first that differs is an error naming
    the document and showing both texts there). Blank lines, and records whose text is only whitespace
    (the corpus drops such documents, see ``load_corpus``), are skipped.
    """
    path = Path(path)
    documents = _documents_of(corpus)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TokenprobeError(f"span file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise TokenprobeError(f"span file {path} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise TokenprobeError(f"cannot read span file {path}: {exc.strerror or exc}") from exc
    result: list[list[Span]] = []
    for number, line in enumerate(content.split("\n"), 1):  # only \n ends a line: JSON may hold U+2028
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TokenprobeError(f"{where} is not valid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "spans" not in record:
            got = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise TokenprobeError(
                f'{where} must be an object {{"text": "...", "spans": [[start, end], ...]}} (it has: {got})'
            )
        text = record["text"]
        if not text.strip():
            continue
        index = len(result)
        if index >= len(documents):
            raise TokenprobeError(
                f"{where}: the span file has more documents than the corpus ({len(documents)}); "
                f"document {index} {_excerpt(text, 0)!r} is not in the corpus"
            )
        document = documents[index]
        if text != document:
            at = _first_difference(text, document)
            raise TokenprobeError(
                f"{where}: the text of document {index} differs from the corpus at character {at}: "
                f"the span file has {_excerpt(text, at)!r}, the corpus {_excerpt(document, at)!r}; "
                "the span file must hold the corpus documents, in order"
            )
        result.append(_check_spans(record["spans"], text, where))
    if len(result) < len(documents):
        raise TokenprobeError(
            f"span file {path} has {len(result)} documents, the corpus {len(documents)}: document {len(result)} "
            f"({_excerpt(documents[len(result)], 0)!r}) has no line"
        )
    return result


def regex_spans(documents, pattern: str) -> list[list[Span]]:
    """The spans of each document that `pattern` (Python ``re`` syntax) matches, left to right, not
    overlapping. Empty matches mark nothing and are left out. A pattern that matches nowhere gives empty
    lists: the caller decides (:func:`make_span_labeler` refuses a task with no positive token)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise TokenprobeError(f"regular expression {pattern!r} is not valid: {exc.msg}{where}") from exc
    return [[m.span() for m in compiled.finditer(doc) if m.end() > m.start()] for doc in _documents_of(documents)]


# ---------------------------------------------------------------------------------------- token labels


class SpanStream(NamedTuple):
    ids: np.ndarray  # (n_tokens,) int64: the stream tokenize_stream builds
    labels: np.ndarray  # (n_tokens,) bool


def _covered_prefix(text_length: int, spans: list[Span]) -> np.ndarray:
    """P[k] = how many characters of [0, k) lie in some span; a token [a, b) overlaps one iff P[b] > P[a]."""
    depth = np.zeros(text_length + 1, dtype=np.int64)
    for start, end in spans:
        depth[start] += 1
        depth[end] -= 1
    covered = np.cumsum(depth[:-1]) > 0
    return np.concatenate([[0], np.cumsum(covered)])


def span_stream(documents, spans: list[list[Span]], tokenizer, batch: int = 256) -> SpanStream:
    """The token stream of `documents` (as tokenize_stream builds it) and each token's span label."""
    documents = _documents_of(documents)
    if not getattr(tokenizer, "is_fast", False):
        raise TokenprobeError(
            f"span labels need a fast tokenizer (one that gives character offsets); {type(tokenizer).__name__} "
            "is not: load the tokenizer with use_fast=True or use a model that ships tokenizer.json"
        )
    if len(spans) != len(documents):
        raise TokenprobeError(
            f"span labels need one list of spans per document: {len(spans)} for {len(documents)} documents"
        )
    separator = np.asarray(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"], dtype=np.int64)
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for first in range(0, len(documents), batch):
        encoded = tokenizer(documents[first : first + batch], add_special_tokens=False, return_offsets_mapping=True)
        for k, (token_ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            index = first + k
            text = documents[index]
            doc_spans = _check_spans(spans[index], text, f"document {index}")
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            if doc_spans:
                prefix = _covered_prefix(len(text), doc_spans)
                a, b = np.clip(offsets[:, 0], 0, len(text)), np.clip(offsets[:, 1], 0, len(text))
                positive = (b > a) & (prefix[b] > prefix[a])
            else:
                positive = np.zeros(len(offsets), dtype=bool)
            ids += [np.asarray(token_ids, dtype=np.int64), separator]
            labels += [positive, np.zeros(len(separator), dtype=bool)]
    if not ids:
        return SpanStream(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    return SpanStream(np.concatenate(ids), np.concatenate(labels))


def _check_same_stream(ids: np.ndarray, expected: np.ndarray) -> None:
    if ids.shape == expected.shape and np.array_equal(ids, expected):
        return
    differ = np.nonzero(ids[: len(expected)] != expected[: len(ids)])[0]
    at = int(differ[0]) if len(differ) else min(len(ids), len(expected))
    raise TokenprobeError(
        f"the tokens read with character offsets differ from the corpus's token stream at token {at} "
        f"({len(ids)} tokens against {len(expected)}): this tokenizer tokenizes differently when asked for offsets, "
        "so its span labels cannot be trusted"
    )


def span_token_labels(documents, spans: list[list[Span]], tokenizer) -> np.ndarray:
    """One bool per token of ``tokenize_stream(documents, tokenizer)``: inside a span or not (the
    separator's tokens never are). Checks that the stream read with offsets is that very stream."""
    documents = _documents_of(documents)
    stream = span_stream(documents, spans, tokenizer)
    _check_same_stream(stream.ids, tokenize_stream(documents, tokenizer, progress=False))
    return stream.labels


# ---------------------------------------------------------------------------------------- the labeler


def _ids_checksum(chunks: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(chunks, dtype=np.int64)).tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class SpanLabeler:
    """The Labeler of a span task: is THIS token inside a span? (current-token semantics only).

    Built from the stream's ids and labels and cut like make_chunks cuts the stream, it labels only the
    chunks it was built for: ``labels`` checks their shape and a checksum of their ids.
    """

    spec: str  # "regex:<pattern>" or "spans:<name>"
    chunk_labels: np.ndarray = field(repr=False)  # (n_chunks, context_length) bool
    chunk_shape: tuple[int, int]
    ids_sha256: str
    bos_id: int | None
    question: str = "is this token inside a span of"
    predicts_next_token: bool = False

    @classmethod
    def from_stream(cls, ids: np.ndarray, labels: np.ndarray, context_length: int, bos_id: int | None,
                    spec: str, question: str | None = None) -> SpanLabeler:
        """Cuts a stream's labels into chunks exactly as make_chunks cuts its ids (BOS: never positive)."""
        ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=bool)
        if ids.shape != labels.shape or ids.ndim != 1:
            raise TokenprobeError(
                f"a span labeler needs one label per token: {labels.shape} labels for {ids.shape} ids"
            )
        chunks = make_chunks(ids, context_length, bos_id)
        chunk_labels = make_chunks(labels, context_length, None if bos_id is None else False)  # BOS: False
        return cls(spec=spec, chunk_labels=chunk_labels, chunk_shape=tuple(chunks.shape),
                   ids_sha256=_ids_checksum(chunks), bos_id=bos_id, **({"question": question} if question else {}))

    @classmethod
    def build(cls, documents, spans: list[list[Span]], tokenizer, context_length: int, spec: str,
              question: str | None = None, bos: str = "auto") -> SpanLabeler:
        """Tokenizes `documents` with offsets and cuts their span labels for `context_length` and the
        BOS that `bos` (--bos) resolves to, as load_chunks would; `labels` then refuses any other chunks."""
        stream = span_stream(documents, spans, tokenizer)
        return cls.from_stream(stream.ids, stream.labels, context_length, resolve_bos(tokenizer, bos), spec, question)

    @property
    def positives(self) -> int:
        return int(self.chunk_labels.sum())

    def labels(self, chunks: np.ndarray, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
        chunks = np.asarray(chunks)
        if tuple(chunks.shape) != self.chunk_shape:
            raise TokenprobeError(
                f"span task {self.spec}: these chunks are {tuple(chunks.shape)}, the span labels were cut for "
                f"{self.chunk_shape} (n_chunks, context_length); build the labeler from the same corpus, "
                "tokenizer and context length"
            )
        if has_bos != (self.bos_id is not None):
            raise TokenprobeError(
                f"span task {self.spec}: the chunks {'start' if has_bos else 'do not start'} with BOS, but the span "
                f"labels were cut {'without' if self.bos_id is None else 'with'} one"
            )
        if _ids_checksum(chunks) != self.ids_sha256:
            raise TokenprobeError(
                f"span task {self.spec}: these are not the chunks the span labels were cut for (their token ids "
                "differ); build the labeler from the same corpus, tokenizer and context length"
            )
        valid = np.ones(self.chunk_shape, dtype=bool)
        if has_bos:
            valid[:, 0] = False
        return self.chunk_labels.copy(), valid

    def record(self) -> dict:
        """What a run record keeps of the task (the labels cannot be rebuilt from the spec alone)."""
        return {"spec": self.spec, "question": self.question, "positives": self.positives,
                "tokens": int(np.prod(self.chunk_shape)), "chunks_sha256": self.ids_sha256}


def is_span_task(task: str) -> bool:
    return task.startswith(SPAN_TASK_PREFIXES)


def make_span_labeler(task: str, corpus, tokenizer, context_length: int, bos: str = "auto") -> SpanLabeler:
    """The labeler of ``--task regex:<pattern>`` or ``--task spans:<file.jsonl>`` for a corpus (chunked
    with BOS as `bos`, the run's --bos, says); a task with no positive token anywhere is an error."""
    documents = _documents_of(corpus)
    if task.startswith("regex:"):
        pattern = task.removeprefix("regex:")
        if not pattern:
            raise TokenprobeError("task 'regex:' has no pattern: give one, e.g. --task 'regex:\\d+'")
        spans, source = regex_spans(documents, pattern), f"the regular expression {pattern!r}"
        question = f"is this token inside a match of /{pattern}/"
    elif task.startswith("spans:"):
        path = task.removeprefix("spans:")
        if not path:
            raise TokenprobeError("task 'spans:' names no file: give one, e.g. --task spans:marked.jsonl")
        spans, source = read_span_file(path, documents), f"span file {path}"
        question = f"is this token inside a span of {Path(path).name}"
    else:
        raise TokenprobeError(f"task {task!r} is not a span task: use regex:<pattern> or spans:<file.jsonl>")
    labeler = SpanLabeler.build(documents, spans, tokenizer, context_length, task, question, bos)
    if labeler.positives == 0:
        raise TokenprobeError(
            f"{source} marks no token of the corpus's chunks: nothing to probe for; check the pattern or the spans"
        )
    return labeler
