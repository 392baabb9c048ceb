"""One vocabulary for what a run reports: position sets, scorer keys and the best layer.

Results, the report, the terminal table and WandB all speak it; nothing here imports torch or numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

TRAIN, EVAL, EVAL_NATURAL = "train", "eval", "eval_natural"
SUBSETS = (TRAIN, EVAL, EVAL_NATURAL)  # a position's subset is stored as an index into this tuple
REPORTED_SETS = (EVAL, EVAL_NATURAL, TRAIN)  # the order results list them in
HELD_OUT = (EVAL, EVAL_NATURAL)
PRIMARY_SET = EVAL
PRIMARY_METRIC = "balanced_accuracy"
COMPARED_METRICS = ("balanced_accuracy", "auroc")
SET_DESCRIPTIONS = {
    EVAL: "held-out chunks, balanced 50/50 (primary)",
    EVAL_NATURAL: "held-out chunks, natural class ratio",
    TRAIN: "training positions",
}

# Baselines (see tokenprobe.analysis.baselines)
MODEL, TOKEN_STATS, MAJORITY, LOGIT_LENS = "model", "token_stats", "majority", "logit_lens"
RUN_BASELINES = (MODEL, TOKEN_STATS, MAJORITY)  # one per run; the logit lens is one per layer
BASELINE_LABELS = {
    MODEL: "model's own prediction",
    LOGIT_LENS: "logit lens",
    TOKEN_STATS: "token statistics",
    MAJORITY: "majority class",
}


class ScorerKey(NamedTuple):
    """What produced a score: ``("probe", 3)`` (the primary probe family), ``("probe:mlp", 3)`` (another
    family), ``("logit_lens", 3)`` or ``("baseline", "model")``.

    ``str(key)`` is the spelling results.json uses (``probe/3``, ``logit_lens/3``, ``model``); `label`
    names the predictor without its layer (``probe``, ``logit_lens``, ``model``).
    """

    kind: str
    name: int | str

    @property
    def layer(self) -> int | None:
        return self.name if self.kind == LOGIT_LENS or self.kind.startswith("probe") else None

    @property
    def label(self) -> str:
        return self.kind if self.kind != "baseline" else str(self.name)

    def __str__(self) -> str:
        return str(self.name) if self.kind == "baseline" else f"{self.kind}/{self.name}"


def probe_key(layer: int) -> ScorerKey:
    return ScorerKey("probe", layer)


def lens_key(layer: int) -> ScorerKey:
    return ScorerKey(LOGIT_LENS, layer)


def baseline_key(name: str) -> ScorerKey:
    return ScorerKey("baseline", name)


def best_index(values: Sequence[float | None]) -> int:
    """The index of the largest value, the first among ties; missing (None or NaN) values never win."""
    def score(value: float | None) -> float:
        return -math.inf if value is None or math.isnan(value) else value

    return max(range(len(values)), key=lambda i: score(values[i])) if values else 0
