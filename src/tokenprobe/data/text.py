"""A text as the model sees it: token ids (as training tokenized documents: no special tokens), the
piece of the text each token covers, and chunks of the context length with BOS at the start of each,
exactly as training chunked the corpus."""

from __future__ import annotations

import numpy as np


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
    """Consecutive chunks of at most `context_length` tokens, each starting with BOS (as training)."""
    body = context_length - (1 if bos_id is not None else 0)
    prefix = [bos_id] if bos_id is not None else []
    return [np.asarray(prefix + ids[i : i + body], dtype=np.int64) for i in range(0, len(ids), body)]
