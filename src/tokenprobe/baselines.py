"""What a probe's score should be compared with, on the same held-out positions.

- ``model``: the probability the model's own output gives the target (final norm, full
  unembedding, final-logit softcapping where the config has it, softmax over the vocabulary). The
  full vocabulary is computed only at the held-out positions (once per position, though the
  balanced and natural sets share many), plus a sample of training positions used to choose its
  threshold (as many as the balanced held-out set, at most 1,000: balanced accuracy is flat near its
  best threshold), in tiles: never for every token.
- ``logit_lens`` at each probed layer: that layer's residual through the final norm and ONLY the
  target's unembedding row (a logit, not a probability: normalising it would need every row).
- ``token_stats``: P(label | current token id), counted over every usable position of the training
  chunks. A probe that does not beat it has learned nothing beyond the bigram.
- ``majority``: always the training set's majority class.

Every baseline's threshold is the one that maximises balanced accuracy on the training positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tokenprobe.errors import TokenprobeError
from tokenprobe.models import LoadedModel, find_final_norm
from tokenprobe.uncertainty import Scorer

MODEL = "model"
TOKEN_STATS = "token_stats"
MAJORITY = "majority"
LOGIT_LENS = "logit_lens"
DESCRIPTIONS = {
    MODEL: "the model's own probability of the target (full softmax, held-out positions only)",
    LOGIT_LENS: "the layer's residual through the final norm and the target's unembedding row",
    TOKEN_STATS: "P(label | current token id) counted on the training chunks",
    MAJORITY: "always the training set's majority class",
}
THRESHOLD_POSITIONS = 1000  # at most this many training positions get the model's full softmax, for its threshold


def logit_lens_name(layer: int) -> str:
    return f"{LOGIT_LENS}/{layer}"


def choose_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold (predict positive when score >= it) that maximises balanced accuracy.

    Balanced accuracy at a threshold is (TPR + 1 - FPR) / 2, so this is the point of the ROC curve
    farthest above the diagonal (the highest threshold among ties), found from one sort and the
    cumulative class counts at each distinct score. Equal to the best threshold on
    ``sklearn.metrics.roc_curve`` (tested), without the 2 s that importing scikit-learn costs every run.
    """
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("inf") if not labels.any() else float("-inf")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ordered, positive = scores[order], labels[order]
    last_of_score = np.r_[ordered[1:] != ordered[:-1], True]  # predict positive down to each distinct score
    tpr = np.cumsum(positive)[last_of_score] / positive.sum()
    fpr = np.cumsum(~positive)[last_of_score] / (~positive).sum()
    return float(ordered[last_of_score][int(np.argmax(tpr - fpr))])


@dataclass
class Unembedding:
    """The final norm, the unembedding and the softcap, applied to residuals in small batches."""

    norm: nn.Module | None
    weight: torch.Tensor  # (vocab, hidden), the model's own dtype
    bias: torch.Tensor | None
    softcap: float | None
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, loaded: LoadedModel) -> Unembedding:
        head = loaded.model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise TokenprobeError(f"{type(loaded.model).__name__} has no output embedding; baselines need one "
                                  "(pass --no-baselines)")
        config = loaded.model.config
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap is None and hasattr(config, "get_text_config"):
            softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)
        return cls(norm=find_final_norm(loaded.model), weight=head.weight, bias=getattr(head, "bias", None),
                   softcap=float(softcap) if softcap else None, dtype=head.weight.dtype, device=head.weight.device)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, run in the model's dtype as the model runs it."""
        x = hidden.to(device=self.device, dtype=self.dtype)
        return self.norm(x) if self.norm is not None else x

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def target_logit(self, hidden: torch.Tensor, target_id: int, batch: int = 8192) -> np.ndarray:
        """Logit lens: the target's (softcapped) logit from ONE unembedding row, float64 per position."""
        row = self.weight[target_id].float()
        bias = float(self.bias[target_id]) if self.bias is not None else 0.0
        out = []
        with torch.inference_mode():
            for start in range(0, len(hidden), batch):
                logit = self.normed(hidden[start : start + batch]).float() @ row + bias
                out.append(self._cap(logit).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def target_probability(self, hidden: torch.Tensor, target_id: int, batch: int = 512,
                           vocab_block: int = 4096) -> np.ndarray:
        """The model's own probability of the target: a softmax over the full vocabulary.

        Computed tile by tile: `batch` rows against `vocab_block` rows of the unembedding at a time,
        the logits in the model's dtype as the model computes them, the normaliser accumulated
        online (running max, float64 running sum of exp). Each tile stays in the CPU cache, and the
        unembedding is read once per `batch` rows instead of once per few dozen: 2.3 times faster
        than a whole-row float32 log_softmax on Gemma 3's 262k vocabulary, and closer to the exact
        float64 value (its float32 sum loses about 1e-4 relative).
        """
        out = []
        vocab = self.weight.shape[0]
        with torch.inference_mode():
            for start in range(0, len(hidden), batch):
                x = self.normed(hidden[start : start + batch])
                peak = torch.full((len(x), 1), -torch.inf, device=x.device)
                total = torch.zeros(len(x), dtype=torch.float64, device=x.device)
                target = None
                for v in range(0, vocab, vocab_block):
                    bias = self.bias[v : v + vocab_block] if self.bias is not None else None
                    tile = self._cap(nn.functional.linear(x, self.weight[v : v + vocab_block], bias).float())
                    if v <= target_id < v + vocab_block:
                        target = tile[:, target_id - v].double()
                    new_peak = torch.maximum(peak, tile.amax(dim=-1, keepdim=True))
                    total = total * torch.exp((peak - new_peak)[:, 0].double()) \
                        + tile.sub_(new_peak).exp_().sum(dim=-1).double()
                    peak = new_peak
                out.append((torch.exp(target - peak[:, 0].double()) / total).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)


def token_statistics(chunks: np.ndarray, labels: np.ndarray, valid: np.ndarray, train_chunks: np.ndarray,
                     prior_strength: float = 1.0) -> np.ndarray:
    """P(label | current token id) per token id, counted over the usable positions of the training chunks.

    Ids never seen in training get the overall rate; rare ids are pulled towards it with
    `prior_strength` pseudo-counts.
    """
    ids = chunks[train_chunks][valid[train_chunks]]
    hits = labels[train_chunks][valid[train_chunks]].astype(np.float64)
    size = int(chunks.max()) + 1
    n = np.bincount(ids, minlength=size).astype(np.float64)
    k = np.bincount(ids, weights=hits, minlength=size)
    prior = hits.mean() if len(hits) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n + prior_strength > 0, (k + prior_strength * prior) / (n + prior_strength), prior)


@dataclass
class BaselineSet:
    """Every baseline as a Scorer over all positions of the PositionSet, and how each was made."""

    scorers: dict[str, Scorer]
    info: dict[str, object]


def compute_baselines(
    loaded: LoadedModel,
    chunks: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    train_chunks: np.ndarray,
    positions,
    usable: np.ndarray,
    hidden: dict[int, torch.Tensor],
    probed_layers: list[int],
    target_id: int,
    seed: int = 0,
) -> BaselineSet:
    """Baseline scores at every position of `positions` (NaN where not computed).

    `hidden` maps layer -> (positions, hidden) float32 residuals; it must hold every probed layer
    and the last layer (``loaded.num_layers``). `usable` marks positions whose batch was finite.
    """
    n = len(positions)
    train = positions.mask("train") & usable
    held_out = (positions.mask("eval") | positions.mask("eval_natural")) & usable
    unembed = Unembedding.of(loaded)
    scorers: dict[str, Scorer] = {}
    info: dict[str, object] = {"descriptions": DESCRIPTIONS, "final_logit_softcapping": unembed.softcap,
                               "final_norm": type(unembed.norm).__name__ if unembed.norm is not None else None}

    def scorer(scores: np.ndarray) -> Scorer:
        return Scorer(scores=scores, threshold=choose_threshold(positions.label[train], scores[train]))

    for layer in probed_layers:
        scores = np.full(n, np.nan)
        rows = np.flatnonzero(train | held_out)
        scores[rows] = unembed.target_logit(hidden[layer][torch.from_numpy(rows)], target_id)
        scorers[logit_lens_name(layer)] = scorer(scores)

    # The model's own probability: held-out positions (each (chunk, position) once: the balanced and
    # natural sets share rows), plus a seeded sample of training positions for the threshold, as many as
    # the balanced held-out set has, at most THRESHOLD_POSITIONS.
    train_rows = np.flatnonzero(train)
    rng = np.random.default_rng(seed + 7)
    size = min(THRESHOLD_POSITIONS, len(train_rows), int((positions.mask("eval") & usable).sum()))
    sample = np.sort(rng.choice(train_rows, size=size, replace=False))
    rows = np.union1d(np.flatnonzero(held_out), sample)
    keys = positions.chunk[rows] * (int(positions.position.max()) + 1) + positions.position[rows]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    scores = np.full(n, np.nan)
    unique = torch.from_numpy(rows[first])
    scores[rows] = unembed.target_probability(hidden[loaded.num_layers][unique], target_id)[inverse]
    threshold = choose_threshold(positions.label[sample], scores[sample])
    scorers[MODEL] = Scorer(scores=scores, threshold=threshold)
    info["model_threshold_positions"] = int(len(sample))
    info["model_positions"] = int(len(first))

    table = token_statistics(chunks, labels, valid, train_chunks)
    scorers[TOKEN_STATS] = scorer(table[chunks[positions.chunk, positions.position]])

    majority = float(positions.label[train].mean() > 0.5)
    scorers[MAJORITY] = Scorer(scores=np.full(n, majority), threshold=0.5)
    info["majority_class"] = int(majority)
    return BaselineSet(scorers=scorers, info=info)
