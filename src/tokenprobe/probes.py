"""Linear probes: fitted layer by layer in float32, saved as safetensors with metadata.

A probe carries its own input standardisation (mean and scale of its training activations), so
``predict_proba`` takes raw hidden states. Its file holds the weights as tensors and, in the
safetensors header, a JSON document with everything needed to use it again: the layer, task,
target, model and tokenizer hashes, context length, dtype, the run's full config and the metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes, dumps_json

FORMAT = "tokenprobe.linear-probe"
FORMAT_VERSION = 1
METADATA_KEY = "tokenprobe"
_ROWS_IN_CACHE = 1024  # rows of hidden states processed at a time where a temporary should stay in cache


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (hidden,)
    bias: torch.Tensor  # ()
    mean: torch.Tensor  # (hidden,)
    scale: torch.Tensor  # (hidden,) = 1 / std
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int | None:
        return self.metadata.get("layer")

    def decision_function(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for hidden states of shape (..., hidden).

        `out`, a float32 tensor shaped like `hidden` on its device (`hidden` itself if it may be
        overwritten), receives the standardised inputs instead of two fresh temporaries: the same
        operations, so the same logits, bit for bit, without allocating (and faulting in) their memory.
        """
        x = hidden.to(torch.float32)
        mean, scale = self.mean.to(x.device), self.scale.to(x.device)
        if out is None:
            z = (x - mean) * scale
        elif x.dim() == 2:
            z = out
            for first in range(0, len(x), _ROWS_IN_CACHE):  # each block scaled while it is in cache
                rows = slice(first, first + _ROWS_IN_CACHE)
                torch.sub(x[rows], mean, out=out[rows]).mul_(scale)
        else:
            z = torch.sub(x, mean, out=out).mul_(scale)
        return z @ self.weight.to(x.device) + self.bias.to(x.device)

    def predict_proba(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Probability that the label is positive, float32, shape (...). `out`: see `decision_function`."""
        return torch.sigmoid(self.decision_function(hidden, out))

    def predict(self, hidden: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        return self.predict_proba(hidden) >= threshold

    def save(self, path: Path) -> None:
        tensors = {k: getattr(self, k).detach().to("cpu", torch.float32).contiguous()
                   for k in ("weight", "bias", "mean", "scale")}
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.metadata}
        atomic_write_bytes(Path(path), save(tensors, metadata={METADATA_KEY: dumps_json(header)}))

    def check_compatible(self, loaded) -> None:
        """Refuses a model or tokenizer other than the one this probe was trained on."""
        meta = self.metadata
        if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != loaded.tokenizer_hash:
            raise TokenprobeError(
                f"probe was trained with another tokenizer (model {meta.get('model')}, tokenizer "
                f"{meta['tokenizer_hash'][:12]}) than {loaded.source!r} has (tokenizer {loaded.tokenizer_hash[:12]}); "
                "use the model named in the probe file"
            )
        if meta.get("weights_hash") and meta["weights_hash"] != loaded.weights_hash:
            raise TokenprobeError(
                f"probe was trained on model {meta.get('model')} (weights {meta['weights_hash'][:12]}), not on "
                f"{loaded.source!r} (weights {loaded.weights_hash[:12]}); use the model named in the probe file"
            )
        if meta.get("hidden_size") and meta["hidden_size"] != loaded.hidden_size:
            raise TokenprobeError(
                f"probe expects hidden size {meta['hidden_size']}, model {loaded.source!r} has {loaded.hidden_size}"
            )


def read_probe_metadata(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TokenprobeError(f"probe file not found: {path}")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise TokenprobeError(f"{path} is not a readable probe file (corrupt, or not safetensors): {exc}") from exc
    if raw is None:
        raise TokenprobeError(f"{path} is a safetensors file but not a tokenprobe probe (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenprobeError(f"{path} has corrupt probe metadata: {exc.msg}") from exc
    if meta.get("format") != FORMAT:
        raise TokenprobeError(f"{path} is not a tokenprobe linear probe (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise TokenprobeError(
            f"{path} was written by a newer tokenprobe ({meta.get('tokenprobe_version')}, probe format "
            f"{meta['format_version']}); upgrade tokenprobe to read it"
        )
    return meta


def _refuse_pickle(path: Path) -> None:
    """torch.save files (zip or raw pickle) are refused before anything parses them."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    looks_like_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size
    if not looks_like_safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise TokenprobeError(
            f"{path} is a pickle (torch.save / .pth format), not a tokenprobe probe; tokenprobe only reads its "
            "own .safetensors probe files and never unpickles, because loading a pickle can run arbitrary code"
        )


def load_probe(path: Path) -> LinearProbe:
    """Loads a probe file (safetensors: no code runs on load) with its metadata."""
    meta = read_probe_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "scale")}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise TokenprobeError(f"{path} is a corrupt probe file: {exc}") from exc
    return LinearProbe(**tensors, metadata=meta)


# ------------------------------------------------------------------------------------------ training


def pos_weight_for(labels: torch.Tensor, cap: float) -> float:
    """The seed's dampened reweighting: sqrt(negatives / positives), capped. 1.0 when balanced."""
    positives = float(labels.sum())
    negatives = float(len(labels)) - positives
    if positives == 0 or negatives == 0:
        return 1.0
    return float(min(cap, max(1.0, math.sqrt(negatives / positives))))


L2_PATH = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)  # tried from the strongest down
L2_FALLBACK = 1e-3  # for l2="auto" when the training rows cannot be split (one group, or one class aside)
VALIDATION_FRACTION = 0.2  # of the training groups (chunks), set aside to choose l2
PATIENCE = 2  # weaker penalties tried after the best one before the path stops


def fit_linear_probes(
    x: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor,
    l2: float | str = 1e-3,
    pos_weight: float = 1.0,
    max_iter: int = 300,
    device: torch.device | str = "cpu",
    progress: bool = True,
    rows: torch.Tensor | None = None,
    warm_start: bool = True,
    groups: torch.Tensor | None = None,
    seed: int = 0,
) -> list[LinearProbe]:
    """Logistic regression per layer: `x` is (layers, n, hidden) or a sequence of (n, hidden), `y` is (n,).

    With `rows` (position indices), each layer's `x` holds more positions and only those rows train:
    they are gathered one layer at a time, so a caller can pass views of all its hidden states (e.g.
    ``[values[i] for i in probed]``) instead of copying the training rows of every layer at once.

    Each layer minimises the mean (pos_weight-weighted) logistic loss on its standardised inputs plus
    ``l2 / 2 * |w|^2`` to convergence (see :class:`_ProbeFitter`): L-BFGS whose initial inverse Hessian
    is the Hessian at the starting point, with exact line searches; with `warm_start` a layer starts
    from the previous layer's solution (neighbouring layers' standardised probes are close). The
    minimiser is unique, so the start changes the time taken, not the probe (beyond the tolerance).
    Deterministic: the same inputs give the same probes, bit for bit.

    ``l2="auto"`` chooses the penalty per layer: the training rows of a seeded fifth of the `groups`
    (chunks: neighbouring positions of one text must not sit on both sides; each row its own group
    when None) are set aside, probes are fitted on the rest for penalties of `L2_PATH` (see
    `_L2Chooser.choose`: the first layer from the strongest down, later ones near the previous
    layer's choice), and the penalty with the lowest weighted log-loss on the rows set aside is
    refitted on all rows. The right penalty shrinks with the data: on Gemma 3 270M's 640-wide residual
    stream it was about 0.1 with 1,600 training positions (0.06 more balanced accuracy than 1e-3).
    Each probe's ``metadata`` holds its ``l2`` (and, for auto, the penalties tried and their losses).
    """
    device = torch.device(device)
    y = y.to(device=device, dtype=torch.float32)
    layers = len(x)
    if not layers:
        return []
    n = len(rows) if rows is not None else x[0].shape[0]
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} training positions")
    hidden = x[0].shape[-1]
    fitter = _ProbeFitter(n, hidden, y, pos_weight, max_iter, device)
    chooser = None
    if l2 == "auto":
        split = _validation_split(groups if groups is not None else torch.arange(n), y, seed)
        if split is not None:
            chooser = _L2Chooser(split, y, rows, hidden, pos_weight, max_iter, device)
    elif not (isinstance(l2, (int, float)) and l2 >= 0):
        raise ValueError(f"l2 must be 'auto' or a number >= 0, got {l2!r}")
    probes: list[LinearProbe] = []
    start, penalty = None, None
    with tqdm(total=layers, desc=f"Training {layers} probe(s)", unit="probe", disable=not progress,
              dynamic_ncols=True) as bar:
        for layer_x in x:
            start = start if warm_start else None
            if chooser is not None:
                penalty, start, info = chooser.choose(layer_x, start, near=penalty if warm_start and probes else None)
            else:
                penalty = L2_FALLBACK if l2 == "auto" else float(l2)
                info = {"l2": penalty, "l2_method": "fixed" if l2 != "auto" else
                        "fallback: the training rows could not be split to choose it"}
            probe = fitter.fit(layer_x, rows, start, penalty)
            probe.metadata.update(info)
            start = (probe.weight, probe.bias)
            probes.append(probe)
            bar.update(1)
    return probes


def _validation_split(groups: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fit rows, validation rows): the rows of a seeded `VALIDATION_FRACTION` of the groups set aside;
    None when that leaves a side without both classes."""
    unique = torch.unique(groups.cpu())
    if len(unique) < 2:
        return None
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    aside = unique[order[: max(1, round(VALIDATION_FRACTION * len(unique)))]]
    held = torch.isin(groups.cpu(), aside).to(y.device)
    for part in (held, ~held):
        labels = y[part]
        if len(labels) == 0 or bool((labels > 0.5).all()) or bool((labels < 0.5).all()):
            return None
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


class _L2Chooser:
    """Chooses a layer's l2 on training rows set aside (see fit_linear_probes)."""

    def __init__(self, split: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, rows: torch.Tensor | None,
                 hidden: int, pos_weight: float, max_iter: int, device: torch.device):
        fit, held = split
        self.fit_rows = rows.to(device)[fit] if rows is not None else fit
        self.held_rows = rows.to(device)[held] if rows is not None else held
        self.fitter = _ProbeFitter(len(fit), hidden, y[fit], pos_weight, max_iter, device)
        self.held_y = y[held]
        weight = torch.where(self.held_y > 0.5, float(pos_weight), 1.0)
        self.held_v = weight / weight.sum()

    def choose(self, x: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor] | None, near: float | None = None):
        """(l2, warm start for the final fit, metadata) for one layer.

        Without `near`, penalties are tried from the strongest down until `PATIENCE` steps pass without
        a new best. With `near` (the previous layer's choice: neighbouring layers want nearly the same
        penalty), it is tried first, then its stronger neighbours while the loss falls, or else its
        weaker ones: about half the fits.
        """
        self.fitter.prepare(x, self.fit_rows)
        held_x = x.index_select(0, self.held_rows.to(x.device))
        tried: dict[int, tuple[float, LinearProbe]] = {}
        path = []

        def loss_at(i: int, origin: tuple[torch.Tensor, torch.Tensor] | None) -> float:
            probe = self.fitter.solve(origin, L2_PATH[i])
            logits = probe.decision_function(held_x).to(self.held_y.device)
            loss = float(torch.nn.functional.binary_cross_entropy_with_logits(
                logits, self.held_y, weight=self.held_v, reduction="sum"))
            tried[i] = (loss if math.isfinite(loss) else math.inf, probe)
            path.append([L2_PATH[i], loss])
            return tried[i][0]

        def solution(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tried[i][1].weight, tried[i][1].bias

        if near is None or near not in L2_PATH:
            best, origin = None, start
            for i in range(len(L2_PATH)):
                loss_at(i, origin)
                origin = solution(i)
                best = i if best is None or tried[i][0] < tried[best][0] else best
                if i - best >= PATIENCE:
                    break
        else:
            first = L2_PATH.index(near)
            loss_at(first, start)
            for step in (-1, 1):  # stronger penalties first, then weaker ones
                i = first
                while 0 <= i + step < len(L2_PATH) and loss_at(i + step, solution(i)) < tried[i][0]:
                    i += step
                if i != first:
                    break
        best = min(tried, key=lambda i: tried[i][0])
        if not math.isfinite(tried[best][0]):  # cannot happen with finite inputs
            return L2_FALLBACK, start, {"l2": L2_FALLBACK, "l2_method": "fallback: no finite validation loss",
                                        "l2_path": path}
        info = {"l2": L2_PATH[best],
                "l2_method": f"lowest log-loss on {len(self.held_rows):,} training positions set aside",
                "l2_path": path}
        return L2_PATH[best], solution(best), info


def _native_bfloat16(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from tokenprobe.models import cpu_has_native_bfloat16  # reads /proc/cpuinfo; no model libraries

    return cpu_has_native_bfloat16()


class _ProbeFitter:
    """Fits one layer after another, reusing its (n, hidden) buffers (fresh pages cost as much as a pass).

    The objective, in standardised coordinates z = (x - mean) * scale with theta = (w, b):

        f(theta) = sum_i v_i * BCE(z_i . w + b, y_i) + l2 / 2 * |w|^2,   v = sample weight / its sum,

    is convex, and strongly so in w. Standardised residual-stream features are strongly correlated, so
    plain L-BFGS needs hundreds of passes over z. Here its initial inverse Hessian is P^-1, with P the
    Hessian at the starting point (Z'DZ from a share of the rows, in bfloat16 where the CPU multiplies
    bfloat16 natively: a preconditioner only steers the steps, gradients and losses stay float32), and
    every step is an exact line search: z @ d is computed once, and the one-dimensional Newton steps on
    it cost O(n) each. An iteration is thus two passes over z (z @ d and r @ z).

    It stops when the model's predicted decrease -g.d/2 falls below `REL_TOL` times the loss (the gap
    to the minimum, which that estimates, measured at most ~7x as large on real activations), when a
    step no longer lowers the loss (float32 noise), or after `max_iter` iterations.
    """

    REL_TOL = 1e-6
    HISTORY = 10
    GRAM_ROWS_PER_FEATURE_BF16 = 16  # rows of z in the Gram matrix (preconditioner), per hidden unit
    GRAM_ROWS_PER_FEATURE_FP32 = 8  # the same in float32, on CPUs without native bfloat16
    BLOCK = _ROWS_IN_CACHE

    def __init__(self, n: int, hidden: int, y: torch.Tensor, pos_weight: float, max_iter: int, device: torch.device):
        if n < 1:
            raise ValueError("no training positions")
        self.n, self.hidden, self.max_iter, self.device = n, hidden, int(max_iter), device
        self.l2 = 0.0  # set by each fit
        self.y = y
        weight = torch.where(y > 0.5, float(pos_weight), 1.0)
        self.v = weight / weight.sum()  # normalised sample weights
        self.ones = torch.ones(n, device=device)
        self.z = torch.empty(n, hidden, device=device)
        self.work = torch.empty(min(n, self.BLOCK), hidden, device=device)
        self.bf16 = _native_bfloat16(device)
        per_feature = self.GRAM_ROWS_PER_FEATURE_BF16 if self.bf16 else self.GRAM_ROWS_PER_FEATURE_FP32
        rows = n if device.type != "cpu" else min(n, per_feature * hidden)
        self.every = -(-n // rows)  # the Gram uses every `every`-th row
        self.gram_rows = len(range(0, n, self.every))
        if self.bf16:
            self.zb = torch.empty(self.gram_rows, hidden, device=device, dtype=torch.bfloat16)
            self.zb_weighted = torch.empty_like(self.zb)
        self.iterations: list[int] = []  # per fitted layer, for diagnostics and tests

    def _standardise(self, x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """z = (x - mean) * scale into the buffer; mean and 1/scale are ``x.mean(0)`` and ``x.std(0)`` (to rounding)."""
        z, n = self.z, self.n
        if rows is not None:
            rows = rows.to(x.device)
            x = torch.index_select(x, 0, rows, out=z) if x.device == z.device and x.dtype == z.dtype \
                else z.copy_(x.index_select(0, rows))
        elif x.device != z.device or x.dtype != z.dtype:
            x = z.copy_(x)
        mean = torch.mv(x.T, self.ones) / n
        torch.sub(x, mean, out=z)
        squares = torch.zeros(self.hidden, device=self.device)
        for first in range(0, n, self.BLOCK):  # squares block by block, while the block is in cache
            block = z[first:first + self.BLOCK]
            work = torch.mul(block, block, out=self.work[:len(block)])
            squares.add_(torch.mv(work.T, self.ones[:len(block)]))
        std = (squares / (n - 1)).sqrt()
        scale = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))
        z.mul_(scale)
        if self.bf16:
            self.zb.copy_(z[::self.every])
        return mean, scale

    def _residual(self, s: torch.Tensor) -> torch.Tensor:
        return self.v * (torch.sigmoid(s) - self.y)

    def _loss(self, s: torch.Tensor, w: torch.Tensor) -> float:
        data = torch.nn.functional.binary_cross_entropy_with_logits(s, self.y, weight=self.v, reduction="sum")
        return float(data + 0.5 * self.l2 * (w @ w))

    def _gradient(self, r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        g = torch.empty_like(theta)
        torch.mv(self.z.T, r, out=g[:-1])
        g[:-1].add_(theta[:-1], alpha=self.l2)
        g[-1] = r.sum()
        return g

    def _curvature(self, s: torch.Tensor) -> torch.Tensor:
        """The data part of the Hessian at logits `s`: [[Z'DZ, Z'D1], [1'DZ, 1'D1]], D = v p (1-p)."""
        z, h, every = self.z, self.hidden, self.every
        p = torch.sigmoid(s)
        d = self.v * p * (1 - p)
        sampled = d[::every].sum()
        d_rows = d[::every] * (d.sum() / sampled if sampled > 0 else 1.0)  # the sampled rows stand for all rows
        hessian = torch.empty(h + 1, h + 1, device=self.device)
        if self.bf16:
            weighted = torch.mul(self.zb, d_rows.to(torch.bfloat16)[:, None], out=self.zb_weighted)
            gram = (weighted.T @ self.zb).float()
            hessian[:h, :h] = 0.5 * (gram + gram.T)
        else:
            sub = z[::every]
            hessian[:h, :h] = (sub * d_rows[:, None]).T @ sub
        hessian[:h, h] = torch.mv(z.T, d)
        hessian[h, :h] = hessian[:h, h]
        hessian[h, h] = d.sum()
        return hessian

    def _preconditioner(self, curvature: torch.Tensor) -> torch.Tensor:
        """Cholesky factor of the Hessian: `curvature` plus the current l2 on the weights' diagonal."""
        h = self.hidden
        hessian = curvature.clone()
        hessian.diagonal()[:h] += self.l2
        lift = 1e-3 * float(hessian.diagonal().abs().mean())
        for _ in range(10):
            factor, info = torch.linalg.cholesky_ex(hessian)
            if int(info) == 0 and torch.isfinite(factor.diagonal()).all():  # a NaN anywhere reaches the diagonal
                return factor
            # rounding (bfloat16) can leave the sampled Gram matrix slightly indefinite, and saturated
            # probabilities (p(1 - p) = 0) singular: lift its diagonal
            lift = lift * 10 if lift > 0 and math.isfinite(lift) else 1e-6
            hessian.diagonal().add_(lift)
        return torch.eye(h + 1, device=self.device)  # no usable curvature: plain (scaled) L-BFGS

    def fit(self, x: torch.Tensor, rows: torch.Tensor | None,
            start: tuple[torch.Tensor, torch.Tensor] | None, l2: float) -> LinearProbe:
        self.prepare(x, rows)
        return self.solve(start, l2)

    def prepare(self, x: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Standardises the rows once, for any number of `solve` calls (penalties) on them."""
        self.mean, self.scale = self._standardise(x, rows)
        self.curvature = None

    def solve(self, start: tuple[torch.Tensor, torch.Tensor] | None, l2: float) -> LinearProbe:
        """The probe minimising the objective with penalty `l2` on the prepared rows, from `start`.

        The data part of the preconditioner (the Gram matrix) is computed at the first solve after
        `prepare`; later solves only add their own penalty to its diagonal. A preconditioner only steers
        the steps, so a slightly stale one changes the time taken, not the optimum.
        """
        self.l2 = float(l2)
        theta, s, f = self._start(start)
        if self.curvature is None:
            self.curvature = self._curvature(s)
        theta = self._minimise(theta, s, f, self._preconditioner(self.curvature))
        return LinearProbe(weight=theta[:-1].clone().cpu(), bias=theta[-1].clone().cpu(), mean=self.mean.cpu(),
                           scale=self.scale.cpu())

    def _start(self, start: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(theta, logits, loss) at `start`, or at zero where that is lower."""
        z, h = self.z, self.hidden
        theta = torch.zeros(h + 1, device=self.device)
        s = torch.zeros(self.n, device=self.device)
        f = self._loss(s, theta[:-1])  # log 2
        if start is not None:
            warm = torch.cat([start[0].reshape(-1), start[1].reshape(1)]).to(self.device, torch.float32)
            s_warm = torch.mv(z, warm[:-1]).add_(warm[-1])
            f_warm = self._loss(s_warm, warm[:-1])
            if f_warm < f:  # a start worse than zero is no start
                theta, s, f = warm, s_warm, f_warm
        return theta, s, f

    def _minimise(self, theta: torch.Tensor, s: torch.Tensor, f: float, factor: torch.Tensor) -> torch.Tensor:
        """theta = (w, b) minimising the objective on the standardised rows, from `theta` (logits `s`, loss
        `f`), with the preconditioner's Cholesky `factor`."""
        z = self.z

        def precondition(vector: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(vector[:, None], factor)[:, 0]

        g = self._gradient(self._residual(s), theta)
        history: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]] = []  # s, y, 1/s.y, P^-1 y
        iterations = 0
        while iterations < self.max_iter:
            direction = self._direction(g, history, precondition)
            slope = float(g @ direction)
            if not slope < 0:
                if not history:
                    break
                history.clear()  # stale curvature pairs: restart from the preconditioned gradient
                continue
            if -0.5 * slope <= self.REL_TOL * abs(f):
                break
            iterations += 1
            u = torch.mv(z, direction[:-1]).add_(direction[-1])
            step, p = self._line_search(s, u, theta[:-1], direction[:-1], slope)
            s = s.add_(u, alpha=step)
            theta_new = theta + step * direction
            r = self.v * (p - self.y) if p is not None else self._residual(s)
            f_new = self._loss(s, theta_new[:-1])
            if not math.isfinite(f_new):  # cannot happen with finite inputs; keep the last good point
                break
            g_new = self._gradient(r, theta_new)
            s_k, y_k = theta_new - theta, g_new - g
            sy = float(s_k @ y_k)
            if sy > 0:
                history.append((s_k, y_k, 1.0 / sy, precondition(y_k)))
                if len(history) > self.HISTORY:
                    history.pop(0)
            decreased = f_new < f
            theta, g, f = theta_new, g_new, f_new
            if not decreased:  # no decrease left above float32 noise
                break
        self.iterations.append(iterations)
        return theta

    @staticmethod
    def _direction(g: torch.Tensor, history: list, precondition) -> torch.Tensor:
        """L-BFGS two-loop recursion with initial inverse Hessian gamma * P^-1."""
        q = -g
        alphas = []
        for s_k, y_k, rho, _ in reversed(history):
            alpha = rho * float(s_k @ q)
            alphas.append(alpha)
            q = q - alpha * y_k
        gamma = 1.0
        if history:
            _, y_k, rho, py_k = history[-1]
            gamma = (1.0 / rho) / float(y_k @ py_k)
        q = gamma * precondition(q)
        for (s_k, y_k, rho, _), alpha in zip(history, reversed(alphas)):
            beta = rho * float(y_k @ q)
            q = q + (alpha - beta) * s_k
        return q

    def _line_search(self, s: torch.Tensor, u: torch.Tensor, w: torch.Tensor, dw: torch.Tensor,
                     slope: float) -> tuple[float, torch.Tensor | None]:
        """Minimises f(theta + a d) over a > 0 (convex in a) by safeguarded Newton steps on its derivative.

        Returns the step and the probabilities there (None if they were not computed at that step).
        """
        vu = self.v * u
        wd, dd = float(w @ dw), float(dw @ dw)
        step, low, high = 1.0, 0.0, math.inf
        for _ in range(30):
            p = torch.sigmoid(s + step * u)
            derivative = float(vu @ (p - self.y)) + self.l2 * (wd + step * dd)
            if abs(derivative) <= 0.05 * abs(slope):
                return step, p
            if derivative < 0:
                low = step
            else:
                high = step
            curvature = float((vu * u) @ (p * (1 - p))) + self.l2 * dd
            new = step - derivative / curvature if curvature > 0 else math.nan
            if not low < new < high:
                new = 0.5 * (low + high) if math.isfinite(high) else 2.0 * step
            step = new
        return step, None
