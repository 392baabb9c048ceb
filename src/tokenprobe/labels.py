"""The target token and the labels of each task, computed from token ids alone (no model needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes


@dataclass(frozen=True)
class Target:
    text: str  # the string the token decodes to
    token_id: int
    token: str  # the tokenizer's own spelling, e.g. '▁the' or 'Ġthe'

    def describe(self) -> str:
        return f"target {self.text!r} is token {self.token_id} ({self.token!r})"


def resolve_target(tokenizer, text: str, token_id: int | None = None) -> Target:
    """The single token the probe predicts; a string that is not exactly one token is an error."""
    vocab_size = len(tokenizer)
    if token_id is not None:
        if not 0 <= token_id < vocab_size:
            raise TokenprobeError(f"--target-id {token_id} is out of range: this tokenizer has ids 0 to {vocab_size - 1}")
        return Target(tokenizer.decode([token_id]), token_id, tokenizer.convert_ids_to_tokens(token_id))
    if text == "":
        raise TokenprobeError("--target is empty: give the exact token string, e.g. --target ' the'")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = ", ".join(f"{i} ({tokenizer.convert_ids_to_tokens(i)!r})" for i in ids)
        raise TokenprobeError(
            f"--target {text!r} is {len(ids)} tokens for this tokenizer: {pieces}; pick one with --target-id N "
            "or choose a target that is a single token"
        )
    return Target(text, ids[0], tokenizer.convert_ids_to_tokens(ids[0]))


def cached_target(loaded, text: str, token_id: int | None, cache_dir: Path) -> Target:
    """`resolve_target` for a LoadedModel, remembered per tokenizer fingerprint: a later run learns
    its target without loading the tokenizer (see LoadedModel). Errors are not remembered."""
    key = hashlib.sha256(json.dumps([loaded.tokenizer_hash, text, token_id]).encode()).hexdigest()
    path = Path(cache_dir) / "targets" / f"{key[:24]}.json"
    try:
        return Target(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    target = resolve_target(loaded.tokenizer, text, token_id)
    try:
        atomic_write_bytes(path, json.dumps(dataclasses.asdict(target)).encode("utf-8"), durable=False)
    except OSError:
        pass  # a read-only cache only costs the tokenizer next time
    return target


def task_labels(chunks: np.ndarray, target_id: int, task: str, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a validity mask, both shaped like `chunks`.

    next: position i is positive when token i+1 is the target; the last position has no next token.
    current: position i is positive when token i is the target.
    The BOS position is never used: its hidden state is the same in every chunk.
    """
    is_target = chunks == target_id
    valid = np.ones_like(is_target, dtype=bool)
    if task == "next":
        labels = np.zeros_like(is_target)
        labels[:, :-1] = is_target[:, 1:]
        valid[:, -1] = False
    elif task == "current":
        labels = is_target
    else:
        raise TokenprobeError(f"unknown task {task!r}: use next or current")
    if has_bos:
        valid[:, 0] = False
    return labels, valid
