"""Linear probes: fitted together for all layers in float32, saved as safetensors with metadata.

A probe carries its own input standardisation (mean and scale of its training activations), so
``predict_proba`` takes raw hidden states. Its file holds the weights as tensors and, in the
safetensors header, a JSON document with everything needed to use it again: the layer, task,
target, model and tokenizer hashes, context length, dtype, the run's full config and the metrics.
"""

from __future__ import annotations

import json
import math
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

    def decision_function(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states of shape (..., hidden)."""
        x = hidden.to(torch.float32)
        return ((x - self.mean.to(x.device)) * self.scale.to(x.device)) @ self.weight.to(x.device) + self.bias.to(x.device)

    def predict_proba(self, hidden: torch.Tensor) -> torch.Tensor:
        """Probability that the label is positive, float32, shape (...)."""
        return torch.sigmoid(self.decision_function(hidden))

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


def fit_linear_probes(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float = 1e-3,
    pos_weight: float = 1.0,
    max_iter: int = 300,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[LinearProbe]:
    """Logistic regression per layer: `x` is (layers, n, hidden), `y` is (n,).

    Each layer is fitted on its own (L-BFGS, float32, standardised inputs, L2 penalty on the weights):
    one layer's standardised activations stay in the CPU cache where all layers together would
    stream from memory at every step, and each layer stops when it has converged.
    """
    device = torch.device(device)
    y = y.to(device=device, dtype=torch.float32)
    sample_weight = torch.where(y > 0.5, pos_weight, 1.0)
    probes = []
    with tqdm(total=x.shape[0], desc=f"Training {x.shape[0]} probe(s)", unit="probe", disable=not progress,
              dynamic_ncols=True) as bar:
        for layer_x in x:
            probes.append(_fit_one(layer_x.to(device=device, dtype=torch.float32), y, sample_weight, l2, max_iter))
            bar.update(1)
    return probes


def _fit_one(x: torch.Tensor, y: torch.Tensor, sample_weight: torch.Tensor, l2: float, max_iter: int) -> LinearProbe:
    mean = x.mean(dim=0)
    std = x.std(dim=0)
    scale = torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))
    z = (x - mean) * scale
    weight = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros((), device=x.device, requires_grad=True)
    norm = sample_weight.sum()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y, weight=sample_weight,
                                                                    reduction="sum")
        loss = loss / norm + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(weight=weight.detach().cpu(), bias=bias.detach().cpu(), mean=mean.cpu(), scale=scale.cpu())
