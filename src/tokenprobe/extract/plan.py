"""The plan of a forward pass: which chunks run, in which order, how far, and in which batches.

Decided from the sampled positions alone, before the model runs, so batches are independent: a
batch is named by its place in the plan, whatever ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tokenprobe.data.positions import PositionSet


class Batch(NamedTuple):
    """One batch of the plan: its first chunk's place in the plan and the batch size name it."""

    first: int  # index into the plan's chunk order
    size: int  # the batch size it was cut with
    chunks: np.ndarray  # chunk ids
    index: np.ndarray  # rows of the PositionSet it holds
    rows: np.ndarray  # batch row of each of those positions
    length: int  # tokens to run per chunk


@dataclass(frozen=True)
class RunPlan:
    """Which chunks run, in which order, and how much of each: decided from the positions alone.

    A causal model's hidden state at position p depends only on tokens 0..p, so a chunk is run only
    up to its last sampled position. Chunks run longest first (ties by chunk id), so each batch is cut
    at nearly the length of all its chunks, and the first batch is the largest (an out-of-memory
    error shows at once).
    """

    chunks: np.ndarray  # chunk ids, in run order
    rows: list[np.ndarray]  # per chunk: its rows of the PositionSet
    lengths: np.ndarray  # per chunk: tokens to run (last sampled position + 1)

    @classmethod
    def of(cls, positions: PositionSet) -> RunPlan:
        order = np.argsort(positions.chunk, kind="stable")
        wanted, starts = np.unique(positions.chunk[order], return_index=True)
        if len(wanted) == 0:
            return cls(wanted, [], np.zeros(0, dtype=np.int64))
        ends = np.append(starts[1:], len(order))
        lengths = np.maximum.reduceat(positions.position[order], starts) + 1
        run = np.lexsort((wanted, -lengths))
        return cls(wanted[run], [order[starts[i] : ends[i]] for i in run], lengths[run])

    def batch(self, first: int, size: int) -> Batch:
        """The batch of up to `size` chunks starting at the plan's `first` chunk."""
        rows = self.rows[first : first + size]
        index = np.concatenate(rows)
        batch_rows = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        return Batch(first, size, self.chunks[first : first + size], index, batch_rows,
                     int(self.lengths[first : first + size].max()))

    def tokens_of(self, first: int, size: int) -> int:
        """Tokens the batch of up to `size` chunks from the plan's `first` chunk runs."""
        lengths = self.lengths[first : first + size]
        return int(lengths.max()) * len(lengths) if len(lengths) else 0

    def tokens(self, size: int) -> int:
        """Tokens run at batch size `size`: each batch is as long as its longest chunk."""
        return int(sum(self.lengths[b] * len(self.lengths[b : b + size]) for b in range(0, len(self.lengths), size)))
