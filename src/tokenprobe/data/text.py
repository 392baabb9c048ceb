"""A text as the model sees it: token ids (as training tokenized documents: no special tokens), the
piece of the text each token covers, and chunks of the context length with BOS at the start of each
where the run's ``--bos`` puts one (:func:`resolve_bos`), exactly as training chunked the corpus."""

from __future__ import annotations

import numpy as np

from tokenprobe.config import LEGACY_BOS
from tokenprobe.errors import TokenprobeError


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts an encoded text with its BOS token (Gemma, Llama do; GPT-2
    and Qwen do not, though GPT-2 and Qwen's GGUF name one), judged by what it does, as
    ``tokenizer("a")`` with and without special tokens; ``add_bos_token`` is not trusted (transformers
    5 reports False for tokenizers whose post-processor adds BOS)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    try:
        with_special = list(tokenizer("a")["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer that cannot encode a plain string: fall back on what it claims
        return bool(getattr(tokenizer, "add_bos_token", False))
    return with_special[:1] == [bos] and plain[:1] != [bos]


def resolve_bos(tokenizer, mode: str) -> int | None:
    """The token every chunk starts with under ``--bos mode``, or None: ``auto`` the tokenizer's BOS
    where the tokenizer itself adds it (:func:`tokenizer_adds_bos`), ``always`` its BOS (an error when
    it has none), ``never`` none; ``legacy`` (runs and probes saved before --bos) its BOS wherever it
    has one, as tokenprobe always did then."""
    bos = tokenizer.bos_token_id
    if mode == "never":
        return None
    if mode == LEGACY_BOS:
        return bos
    if mode == "always":
        if bos is None:
            raise TokenprobeError("--bos always: this tokenizer has no BOS token; use --bos auto or never")
        return bos
    if mode == "auto":
        return bos if tokenizer_adds_bos(tokenizer) else None
    raise TokenprobeError(f"--bos must be auto, always or never, got {mode!r}")


def pieces_from_offsets(text: str, offsets: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """Splits `text` by token offsets; a character split over several tokens goes to the first."""
    pieces: list[tuple[str, int]] = []
    cursor = 0
    for index, (start, end) in enumerate(offsets):
        start = max(start, cursor)
        if start > cursor:
            pieces.append((text[cursor:start], -1))
        end = max(end, start)
        pieces.append((text[start:end], index))
        cursor = end
    if cursor < len(text):
        pieces.append((text[cursor:], -1))
    return pieces


def pieces_from_decoding(tokenizer, ids: list[int], first_index: int) -> list[tuple[str, int]]:
    """Each token's text as what it adds to the decoded prefix (bytes of a split character wait
    until the character is complete, so those tokens show as empty)."""
    pieces = []
    committed = ""
    for i in range(len(ids)):
        decoded = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded.endswith("\ufffd"):
            piece = ""
        elif decoded.startswith(committed):
            piece = decoded[len(committed):]
            committed = decoded
        else:
            piece = tokenizer.decode([ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            committed = decoded
        pieces.append((piece, first_index + i))
    return pieces


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[tuple[str, int]]]:
    """Token ids of `text` (no special tokens, as training tokenized documents) and its pieces."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        return ids, pieces_from_offsets(text, [tuple(o) for o in encoded["offset_mapping"]])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, pieces_from_decoding(tokenizer, ids, 0)


def chunk_ids(ids: list[int], context_length: int, bos_id: int | None) -> list[np.ndarray]:
    """Consecutive chunks of at most `context_length` tokens, each starting with `bos_id` unless it is
    None (as training: pass the run's resolve_bos)."""
    body = context_length - (1 if bos_id is not None else 0)
    prefix = [bos_id] if bos_id is not None else []
    return [np.asarray(prefix + ids[i : i + body], dtype=np.int64) for i in range(0, len(ids), body)]
