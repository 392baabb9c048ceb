"""The MLP probe: one hidden layer on one layer's standardised residual stream, to ask whether
capacity beyond a linear read-out finds more (issue 14: probe families side by side, with control tasks).

    logit = relu_or_gelu(((x - mean) * scale) @ hidden_weight.T + hidden_bias) . output_weight + output_bias

Like the linear probe it carries its own input standardisation (mean and scale of its training
activations), takes raw hidden states of any shape (..., hidden) and dtype, and computes in float32.

Training (:func:`fit_mlp_probes`): AdamW on minibatches of the pos_weight-weighted logistic loss, in
float32, with early stopping on the balanced accuracy of training chunks set aside
(:func:`~tokenprobe.probes.selection.validation_split`, by chunk, so neighbouring positions of one
text never sit on both sides; the caller never passes held-out data; ``select="log_loss"`` ranks
epochs by log-loss instead, for the online codelength). The weights of the best epoch are kept as
they are (trained on the other four fifths of the training chunks): refitting on all rows for the
best number of epochs would double the cost, which the budget (19 layers x 2 tasks, ~3 s a layer)
cannot spare, and such a refit has no validation set to tell whether more rows want more epochs.

Deterministic for a seed: initial weights, the order of the minibatches and the dropout masks come
from ``torch.Generator`` objects seeded with it (no global random state is read or changed), so the
same inputs and seed give the same tensors, bit for bit (on one machine, with one thread count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from tokenprobe.errors import TokenprobeError
from tokenprobe.probes.base import ProbeBase, ProbeMeta
from tokenprobe.probes.selection import validation_split

TENSORS = ("mean", "scale", "hidden_weight", "hidden_bias", "output_weight", "output_bias")
ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}

# Defaults, chosen for the budget: 20,000 rows x 640 dims on 2 CPU cores in about 3 s a layer (at most
# MAX_EPOCHS epochs; early stopping usually ends well before), at linear-level accuracy on linear problems.
WIDTH = 256
ACTIVATION = "relu"
DROPOUT = 0.1
WEIGHT_DECAY = 0.01  # AdamW's decoupled decay, on the weights (not the biases)
LEARNING_RATE = 2e-3  # halved after each epoch that does not improve the validation score
BATCH_SIZE = 256  # at most; smaller training sets get smaller batches (MIN_STEPS_PER_EPOCH)
MIN_STEPS_PER_EPOCH = 64  # so that a few hundred rows still get enough steps per epoch
MIN_BATCH_SIZE = 16
MAX_EPOCHS = 20
LR_DECAY = 0.5  # the learning rate's factor after each epoch without a better validation score
PATIENCE = 2  # epochs without a better validation score before training stops
FALLBACK_EPOCHS = 10  # on all rows, when the training chunks cannot be split (one chunk, or one class aside)
SELECT = ("balanced_accuracy", "log_loss")  # what picks the best epoch (see fit_mlp_probes)
SCORE_ROWS = 4096  # rows scored at a time: bounds the (rows, width) temporary


@dataclass
class MLPProbe(ProbeBase):
    """A one-hidden-layer probe of one layer's hidden states (see the module's docstring)."""

    mean: torch.Tensor | None = None  # (hidden,)
    scale: torch.Tensor | None = None  # (hidden,) = 1 / std
    hidden_weight: torch.Tensor | None = None  # (width, hidden)
    hidden_bias: torch.Tensor | None = None  # (width,)
    output_weight: torch.Tensor | None = None  # (width,)
    output_bias: torch.Tensor | None = None  # ()
    activation: str = ACTIVATION
    meta: ProbeMeta | None = None  # set when the probe belongs to a run, and read from its file
    fit_info: dict[str, Any] = field(default_factory=dict)  # width, dropout, epochs, best epoch, ...
    kind: ClassVar[str] = "mlp"

    @property
    def width(self) -> int | None:
        return None if self.hidden_weight is None else int(self.hidden_weight.shape[0])

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, groups: torch.Tensor | None = None, seed: int = 0,
            pos_weight: float = 1.0, **opts) -> MLPProbe:
        """Fits on (n, hidden) hidden states and (n,) 0/1 labels; returns self. `opts`: the keyword
        arguments of :func:`fit_mlp_probes` (width, activation, dropout, weight_decay, max_epochs, ...)."""
        opts.setdefault("device", x.device)
        fitted = fit_mlp_probes([x], y, groups=groups, seed=seed, pos_weight=pos_weight, progress=False, **opts)[0]
        for name in (*TENSORS, "activation", "fit_info"):
            setattr(self, name, getattr(fitted, name))
        return self

    def decision_function(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32, shape (...)) for hidden states of shape (..., hidden), `SCORE_ROWS` rows at a time.

        `out`, a float32 tensor shaped like `hidden` on its device (`hidden` itself if it may be
        overwritten), receives the standardised inputs instead of fresh temporaries; the logits are the
        same, bit for bit.
        """
        shape, size = hidden.shape[:-1], hidden.shape[-1]
        x = hidden.reshape(-1, size)
        scratch = out.reshape(-1, size) if out is not None else None
        device = x.device
        mean, scale, w1, b1, w2, b2 = (getattr(self, k).to(device=device, dtype=torch.float32) for k in TENSORS)
        act = _activation(self.activation)
        logits = torch.empty(len(x), device=device, dtype=torch.float32)
        for first in range(0, len(x), SCORE_ROWS):
            rows = slice(first, first + SCORE_ROWS)
            block = x[rows].to(torch.float32)
            z = (block - mean).mul_(scale) if scratch is None else torch.sub(block, mean, out=scratch[rows]).mul_(scale)
            logits[rows] = act(torch.addmm(b1, z, w1.T)) @ w2 + b2
        return logits.reshape(shape)

    def direction(self) -> None:
        """None: an MLP has no single direction in the residual stream."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the file stores. The activation is not a tensor: it is read back from the metadata's
        ``fit`` (``activation``, relu when absent), so a probe whose metadata would name another
        activation than its own refuses to be written."""
        if self.meta is not None and self.meta.fit.get("activation", ACTIVATION) != self.activation:
            raise ValueError(f"this probe's activation is {self.activation!r} but its metadata (meta.fit) says "
                             f"{self.meta.fit.get('activation', ACTIVATION)!r}: set meta.fit from the probe's fit_info")
        return {k: getattr(self, k).detach().to("cpu", torch.float32).contiguous() for k in TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: ProbeMeta) -> MLPProbe:
        """From a file's tensors (the width from their shapes) and metadata (the activation)."""
        values = {k: tensors[k] for k in TENSORS}
        width, hidden = values["hidden_weight"].shape
        expected = {"mean": (hidden,), "scale": (hidden,), "hidden_bias": (width,), "output_weight": (width,),
                    "output_bias": ()}
        for name, shape in expected.items():
            if tuple(values[name].shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(values[name].shape)}, expected {shape}")
        activation = meta.fit.get("activation", ACTIVATION)
        _activation(activation)
        return cls(**values, activation=activation, meta=meta, fit_info=dict(meta.fit))



def _activation(name: str):
    if name not in ACTIVATIONS:
        raise TokenprobeError(f"unknown MLP probe activation {name!r} (known: {', '.join(ACTIVATIONS)}); "
                              "upgrade tokenprobe")
    return ACTIVATIONS[name]


def fit_mlp_probes(
    x: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    seed: int = 0,
    pos_weight: float = 1.0,
    width: int = WIDTH,
    activation: str = ACTIVATION,
    dropout: float = DROPOUT,
    weight_decay: float = WEIGHT_DECAY,
    max_epochs: int = MAX_EPOCHS,
    patience: int = PATIENCE,
    select: str = "balanced_accuracy",
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[MLPProbe]:
    """One MLP probe per layer: `x` is (layers, n, hidden) or a sequence of (n, hidden), `y` is (n,) 0/1.

    With `rows` (position indices), each layer's `x` holds more positions and only those rows train:
    they are gathered one layer at a time (so `x` may be views of all hidden states, e.g. bfloat16).

    Each layer: inputs standardised by the mean and std of its training rows; weights initialised as
    ``torch.nn.Linear`` does, from a generator seeded with `seed` (the same for every layer); AdamW
    (decay on the weights only) on minibatches of at most `batch_size` rows (smaller for small training
    sets, so an epoch has at least `MIN_STEPS_PER_EPOCH` steps) minimising the mean logistic loss,
    positives weighted by `pos_weight`, with dropout after the activation. After each epoch the training
    rows of a seeded fifth of the `groups` (chunks; each row its own group when None), set aside and
    never trained on, are scored: each epoch without a better score halves the learning rate, training
    stops after `patience` of them in a row or at `max_epochs`, and the best epoch's weights are kept.
    The score is the balanced accuracy (ties: lower log-loss); ``select="log_loss"`` ranks epochs by
    the (pos_weight-weighted) log-loss instead (ties: higher balanced accuracy), the right choice where
    probabilities matter rather than decisions, as in the online codelength (`tokenprobe.probes.mdl`):
    on a linear problem balanced accuracy keeps later, overconfident epochs. When the rows cannot be
    split (one group, or a side without both classes), it trains `FALLBACK_EPOCHS` epochs (at most
    `max_epochs`) on all rows. ``fit_info`` records how (JSON-safe, flat in the probe file's header).
    """
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    for name, value, low in (("width", width, 1), ("max_epochs", max_epochs, 1), ("patience", patience, 1),
                             ("batch_size", batch_size, 1)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not weight_decay >= 0 or not learning_rate > 0:
        raise ValueError(f"weight_decay must be >= 0 and learning_rate > 0, got {weight_decay!r}, {learning_rate!r}")
    device = torch.device(device)
    y = y.to(device=device, dtype=torch.float32)
    if not len(x):
        return []
    n = len(rows) if rows is not None else x[0].shape[0]
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} training positions")
    if n < 1:
        raise ValueError("no training positions")
    split = validation_split(groups if groups is not None else torch.arange(n), y, seed)
    settings = _Settings(width, activation, dropout, weight_decay, max_epochs, patience, batch_size, learning_rate,
                         pos_weight, select)
    probes = []
    with tqdm(total=len(x), desc=f"Training {len(x)} MLP probe(s)", unit="probe", disable=not progress,
              dynamic_ncols=True) as bar:
        for layer_x in x:
            probes.append(_fit_layer(layer_x, y, rows, split, settings, seed, device))
            bar.update(1)
    return probes


@dataclass(frozen=True)
class _Settings:
    width: int
    activation: str
    dropout: float
    weight_decay: float
    max_epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    pos_weight: float
    select: str


def _fit_layer(layer_x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None,
               split: tuple[torch.Tensor, torch.Tensor] | None, s: _Settings, seed: int,
               device: torch.device) -> MLPProbe:
    x = layer_x.index_select(0, rows.to(layer_x.device)) if rows is not None else layer_x
    z = x.to(device=device, dtype=torch.float32)
    n, hidden = z.shape
    mean = z.mean(0)
    std = z.std(0) if n > 1 else torch.zeros(hidden, device=device)
    scale = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))
    z = (z - mean).mul_(scale)  # a fresh tensor: the caller's x is never written
    if split is not None:
        train, held = (part.to(device) for part in split)
    else:
        train, held = torch.arange(n, device=device), None
    weights = torch.where(y > 0.5, float(s.pos_weight), 1.0)

    cpu = torch.Generator().manual_seed(seed)  # initial weights and minibatch order
    masks = cpu if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)  # dropout
    bound1, bound2 = 1 / math.sqrt(hidden), 1 / math.sqrt(s.width)
    params = [(torch.rand(s.width, hidden, generator=cpu) * 2 - 1) * bound1,  # as torch.nn.Linear initialises
              (torch.rand(s.width, generator=cpu) * 2 - 1) * bound1,
              (torch.rand(s.width, generator=cpu) * 2 - 1) * bound2,
              torch.zeros(())]
    w1, b1, w2, b2 = params = [p.to(device).requires_grad_() for p in params]
    optimiser = torch.optim.AdamW([{"params": [w1, w2], "weight_decay": s.weight_decay},
                                   {"params": [b1, b2], "weight_decay": 0.0}], lr=s.learning_rate, foreach=False)
    act = ACTIVATIONS[s.activation]
    batch = max(MIN_BATCH_SIZE, min(s.batch_size, -(-len(train) // MIN_STEPS_PER_EPOCH)))
    epochs = s.max_epochs if held is not None else min(FALLBACK_EPOCHS, s.max_epochs)
    if held is not None:
        held_z, held_y = z.index_select(0, held), y[held]
        held_v = weights[held] / weights[held].sum()
    best = (-math.inf, math.inf)  # (balanced accuracy, log-loss) of the best epoch
    best_epoch, kept, history, ran = 0, None, [], 0
    for epoch in range(1, epochs + 1):
        order = train[torch.randperm(len(train), generator=cpu).to(device)]
        for first in range(0, len(order), batch):
            index = order[first:first + batch]
            h = act(torch.addmm(b1, z.index_select(0, index), w1.T))
            if s.dropout:
                keep = torch.empty_like(h).bernoulli_(1 - s.dropout, generator=masks)
                h = h * keep.mul_(1 / (1 - s.dropout))
            v = weights[index]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(h @ w2 + b2, y[index], weight=v / v.sum(),
                                                                        reduction="sum")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        ran = epoch
        if held is None:
            continue
        with torch.no_grad():
            logits = act(torch.addmm(b1, held_z, w1.T)) @ w2 + b2
            score = (_balanced_accuracy(logits, held_y), float(torch.nn.functional.binary_cross_entropy_with_logits(
                logits, held_y, weight=held_v, reduction="sum")))
        history.append([round(score[0], 6), round(score[1], 6)])
        if _better(score, best, s.select):
            best, best_epoch = score, epoch
            kept = [p.detach().clone() for p in params]
        elif epoch - best_epoch >= s.patience:
            break
        else:
            for group in optimiser.param_groups:
                group["lr"] *= LR_DECAY
    if kept is None:
        kept, best_epoch = [p.detach().clone() for p in params], ran
    info = {"width": s.width, "activation": s.activation, "dropout": s.dropout, "weight_decay": s.weight_decay,
            "learning_rate": s.learning_rate, "learning_rate_decay": LR_DECAY, "batch_size": batch,
            "max_epochs": s.max_epochs, "patience": s.patience, "epochs": ran, "best_epoch": best_epoch,
            "validation_balanced_accuracy": best[0] if held is not None else None,
            "validation_log_loss": best[1] if held is not None else None,
            "validation_rows": len(held) if held is not None else 0,
            "validation_path": history,  # [balanced accuracy, log-loss] after each epoch
            "selected_by": s.select if held is not None else None,
            "stopping": (f"best {s.select.replace('_', ' ')} on {len(held):,} training positions set aside (by chunk)"
                         if held is not None else
                         f"fallback: the training rows could not be split; {ran} epochs on all rows")}
    # on the CPU like every family's fitted probe (the fit itself ran on `device`)
    return MLPProbe(mean.cpu(), scale.cpu(), *(t.cpu() for t in kept), activation=s.activation, fit_info=info)


def _better(score: tuple[float, float], best: tuple[float, float], select: str) -> bool:
    """Whether an epoch's (balanced accuracy, log-loss) beats the best so far: by `select`, ties by the other."""
    if select == "log_loss":
        return score[1] < best[1] or (score[1] == best[1] and score[0] > best[0])
    return score[0] > best[0] or (score[0] == best[0] and score[1] < best[1])


def _balanced_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    predicted, positive = logits >= 0, y > 0.5
    tpr = float((predicted & positive).sum()) / max(1, int(positive.sum()))
    tnr = float((~predicted & ~positive).sum()) / max(1, int((~positive).sum()))
    return (tpr + tnr) / 2
