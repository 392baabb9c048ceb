"""The target token and the labels of each task (a Labeler), computed from token ids alone (no model needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


class Labeler(Protocol):
    """Turns chunks of token ids into labels and a validity mask, both shaped like the chunks.

    `spec` is what ``--task`` holds and what the run record stores; :func:`make_labeler` rebuilds the
    same labeler from it. `predicts_next_token` says whether the model's own next-token prediction (and
    the baselines built on it) answers the same question.
    """

    spec: str
    predicts_next_token: bool
    question: str  # completes "... the target?", e.g. "will the next token be"

    def labels(self, chunks: np.ndarray, has_bos: bool) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class TokenLabeler:
    """Is the token `offset` positions from this one the target? 0: this token, 1: the next one."""

    target_ids: tuple[int, ...]
    offset: int

    @property
    def spec(self) -> str:
        return OFFSET_TASKS[self.offset]

    @property
    def predicts_next_token(self) -> bool:
        return self.offset == 1

    @property
    def question(self) -> str:
        return "will the next token be" if self.offset == 1 else "is this token"

    def labels(self, chunks: np.ndarray, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
        """Position i is positive when token i + offset is a target; the last `offset` positions have no
        such token. The BOS position is never used: its hidden state is the same in every chunk."""
        is_target = np.isin(chunks, self.target_ids) if len(self.target_ids) > 1 else chunks == self.target_ids[0]
        valid = np.ones_like(is_target, dtype=bool)
        labels = np.zeros_like(is_target)
        width = chunks.shape[1]
        labels[:, : width - self.offset] = is_target[:, self.offset :]
        if self.offset:
            valid[:, width - self.offset :] = False
        if has_bos:
            valid[:, 0] = False
        return labels, valid


OFFSET_TASKS = {1: "next", 0: "current"}


def make_labeler(task: str, target_ids: list[int] | tuple[int, ...]) -> Labeler:
    """The labeler for ``--task`` (as stored in a run record) and the target token ids."""
    offsets = {name: offset for offset, name in OFFSET_TASKS.items()}
    if task not in offsets:
        raise TokenprobeError(f"unknown task {task!r}: use next or current")
    return TokenLabeler(tuple(int(t) for t in target_ids), offsets[task])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _uniform(token_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per token id and seed (splitmix64): the same id always gets the same one,
    whatever corpus, vocabulary size or order the ids come in."""
    with np.errstate(over="ignore"):
        x = np.asarray(token_ids, dtype=np.uint64) * _GOLDEN + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


@dataclass(frozen=True)
class ControlTask:
    """A control task in the sense of Hewitt & Liang (2019): each current-token TYPE gets a random label,
    drawn once with the seed at the task's positive rate. A probe can only solve it by memorising token
    identities, so task accuracy minus control accuracy (selectivity) is what the probe reads beyond that.
    """

    rate: float  # the task's positive rate on the positions probes train on
    seed: int

    def labels_of(self, token_ids: np.ndarray) -> np.ndarray:
        """The control label of each current token (any shape of ids)."""
        return _uniform(token_ids, self.seed) < self.rate

    def record(self) -> dict:
        return {"rate": self.rate, "seed": self.seed, "labels": "per current-token type, uniform draw < rate"}
