"""The target token (or set of tokens) and the labels of each task (a Labeler), computed from token ids alone
(no model needed): next, current and ahead:K. Span labels (not a token's identity) live in spans.py."""

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


@dataclass(frozen=True)
class TargetSet:
    """Several target tokens meaning "any of these" (e.g. ' the' or ' The'); a single target is a set of one."""

    targets: tuple[Target, ...]

    def __post_init__(self):
        if not self.targets:
            raise TokenprobeError("a target set needs at least one target")
        ids = [t.token_id for t in self.targets]
        if len(set(ids)) != len(ids):
            raise TokenprobeError(f"the target set {self.text} names a token more than once")

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t.token_id for t in self.targets)

    @property
    def text(self) -> str:
        """A readable name of the whole set: "' the' | ' The'"."""
        return " | ".join(repr(t.text) for t in self.targets)

    def describe(self) -> str:
        if len(self.targets) == 1:
            return self.targets[0].describe()
        tokens = ", ".join(f"{t.token_id} ({t.token!r})" for t in self.targets)
        return f"targets {self.text} (any of them) are tokens {tokens}"


def resolve_targets(tokenizer, texts: list[str], token_ids: list[int] | None = None) -> TargetSet:
    """The set of target tokens: each string of `texts` (exactly one token each, as for
    :func:`resolve_target`) and each id of `token_ids`, in that order. Naming the same token twice
    (twice the same string, or a string and its id) is an error, and so is an empty set."""
    if isinstance(texts, str):
        texts = [texts]  # one string is one target, never its characters
    texts, token_ids = list(texts or []), list(token_ids or [])
    if not texts and not token_ids:
        raise TokenprobeError("no target given: name at least one token, e.g. --target ' the'")
    targets = [resolve_target(tokenizer, text) for text in texts]
    targets += [resolve_target(tokenizer, "", int(token_id)) for token_id in token_ids]
    seen: dict[int, Target] = {}
    for target in targets:
        if target.token_id in seen:
            first = seen[target.token_id]
            raise TokenprobeError(
                f"target {target.text!r} is token {target.token_id} ({target.token!r}), already named as "
                f"{first.text!r}: name each token once"
            )
        seen[target.token_id] = target
    return TargetSet(tuple(targets))


def cached_targets(loaded, texts: list[str], token_ids: list[int] | None, cache_dir: Path) -> TargetSet:
    """`resolve_targets` for a LoadedModel, remembered per tokenizer fingerprint like :func:`cached_target`."""
    texts, token_ids = ([texts] if isinstance(texts, str) else list(texts or [])), list(token_ids or [])
    key = hashlib.sha256(json.dumps([loaded.tokenizer_hash, "set", texts, token_ids]).encode()).hexdigest()
    path = Path(cache_dir) / "targets" / f"{key[:24]}.json"
    try:
        return TargetSet(tuple(Target(**t) for t in json.loads(path.read_text(encoding="utf-8"))))
    except (OSError, ValueError, TypeError, TokenprobeError):
        pass
    target_set = resolve_targets(loaded.tokenizer, texts, token_ids)
    try:
        data = [dataclasses.asdict(t) for t in target_set.targets]
        atomic_write_bytes(path, json.dumps(data).encode("utf-8"), durable=False)
    except OSError:
        pass
    return target_set


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
    """Is the token `offset` positions from this one the target? 0: this token, 1: the next one,
    K >= 2: the token K ahead (``ahead:K``)."""

    target_ids: tuple[int, ...]
    offset: int

    @property
    def spec(self) -> str:
        return OFFSET_TASKS.get(self.offset, f"ahead:{self.offset}")

    @property
    def predicts_next_token(self) -> bool:
        return self.offset == 1

    @property
    def question(self) -> str:
        if self.offset == 0:
            return "is this token"
        if self.offset == 1:
            return "will the next token be"
        return f"will the token {self.offset} ahead be"

    def labels(self, chunks: np.ndarray, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
        """Position i is positive when token i + offset is a target; the last `offset` positions have no
        such token in the chunk. The BOS position is never used: its hidden state is the same in every chunk."""
        is_target = np.isin(chunks, self.target_ids) if len(self.target_ids) > 1 else chunks == self.target_ids[0]
        valid = np.ones_like(is_target, dtype=bool)
        labels = np.zeros_like(is_target)
        width = chunks.shape[1]
        if self.offset < width:
            labels[:, : width - self.offset] = is_target[:, self.offset :]
        if self.offset:
            valid[:, max(width - self.offset, 0) :] = False  # an offset past the chunk's end leaves none valid
        if has_bos:
            valid[:, 0] = False
        return labels, valid


OFFSET_TASKS = {1: "next", 0: "current"}
SPAN_TASK_PREFIXES = ("spans:", "regex:")


def parse_task(text: str) -> tuple[str, int]:
    """``--task`` for a token task as (name, offset): "next" -> ("next", 1), "current" -> ("current", 0),
    "ahead:K" -> ("ahead", K) for K >= 2; "ahead:1" is the next-token task and gives ("next", 1)."""
    names = {name: offset for offset, name in OFFSET_TASKS.items()}
    if text in names:
        return text, names[text]
    if isinstance(text, str) and text.startswith("ahead:"):
        count = text.removeprefix("ahead:")
        if not count.isascii() or not count.isdigit():
            raise TokenprobeError(
                f"task {text!r}: K in ahead:K must be a whole number of tokens >= 1, e.g. ahead:2"
            )
        k = int(count)
        if k == 0:
            raise TokenprobeError("task 'ahead:0' asks about this very token: use --task current")
        return ("next", 1) if k == 1 else ("ahead", k)
    if isinstance(text, str) and text.startswith(SPAN_TASK_PREFIXES):
        raise TokenprobeError(
            f"task {text!r} labels spans of the text, not a token: it is built from the corpus and the "
            "tokenizer by tokenprobe.data.spans.make_span_labeler"
        )
    raise TokenprobeError(f"unknown task {text!r}: use next, current or ahead:K (K >= 1 tokens ahead)")


def make_labeler(task: str, target_ids: list[int] | tuple[int, ...]) -> Labeler:
    """The labeler for ``--task`` (as stored in a run record) and the target token ids."""
    _, offset = parse_task(task)
    return TokenLabeler(tuple(int(t) for t in target_ids), offset)


@dataclass(frozen=True)
class AheadLabeler:
    """A labeler of the current token (span labels) read `offset` tokens ahead: position i gets the label
    of token i + offset, and the last `offset` positions of a chunk have none."""

    base: Labeler
    offset: int
    task: str  # next or ahead:K

    @property
    def spec(self) -> str:
        return f"{self.task} {self.base.spec}"

    @property
    def predicts_next_token(self) -> bool:
        return False  # the model predicts a token, not a span: the next-token baselines do not apply

    @property
    def question(self) -> str:
        where = "the next token" if self.offset == 1 else f"the token {self.offset} ahead"
        return self.base.question.replace("is this token", f"will {where} be", 1)

    def labels(self, chunks: np.ndarray, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
        base, base_valid = self.base.labels(chunks, has_bos)
        width, k = chunks.shape[1], self.offset
        labels = np.zeros_like(base)
        valid = np.zeros_like(base_valid)
        if k < width:
            labels[:, : width - k] = base[:, k:]
            valid[:, : width - k] = base_valid[:, k:]
        if has_bos:
            valid[:, 0] = False
        return labels, valid


def ahead(labeler: Labeler, offset: int, task: str) -> Labeler:
    """`labeler` (of the current token) as is for offset 0, else read `offset` tokens ahead."""
    return labeler if offset == 0 else AheadLabeler(labeler, offset, task)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _uniform(token_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per token id and seed (splitmix64): the same id always gets the same one,
    whatever corpus, vocabulary size or order the ids come in."""
    with np.errstate(over="ignore"):
        salt = np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        x = np.asarray(token_ids, dtype=np.uint64) * _GOLDEN + salt
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
