"""Probes and activations from Python: the hidden states a probe expects, for any text.

``activations(model, text)`` returns the residual stream exactly as training captured it (the same
hooks, the same chunking with BOS as ``--bos`` decides, the last layer before the final norm: transformers'
``output_hidden_states`` reports the last layer after it, where a probe trained here reads noise).
``load_probes(RUN_OR_FILES).predict(text, loaded=model)`` runs every probe on every token in one
forward pass, stopped after the deepest probe's layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenprobe.data.text import chunk_ids, resolve_bos, tokenize_text
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.extract import extract_chunks
from tokenprobe.extract.sinks import MemorySink
from tokenprobe.models.loading import LoadedModel
from tokenprobe.probes.base import Probe, check_fits, load_probe, probe_files

DEFAULT_CONTEXT_LENGTH = 256  # RunConfig's default


@dataclass
class Activations:
    """The residual stream at every token of one text: ``acts[layer]`` is (n_tokens, hidden).

    Layer 0 is the embedding output as the first block receives it, layer l the output of block l
    (the last one before the final norm). BOS, which chunks may start with (``--bos``), is not among the tokens.
    """

    token_ids: list[int]
    tokens: list[str]  # each token's piece of the text
    layers: list[int]
    hidden: dict[int, torch.Tensor]  # layer -> (n_tokens, hidden), in the model's dtype, on the CPU
    finite: np.ndarray  # (n_tokens,) False where the model's hidden states were NaN/Inf

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.hidden:
            raise KeyError(f"layer {layer} was not captured (captured: {self.layers})")
        return self.hidden[layer]

    def __len__(self) -> int:
        return len(self.token_ids)


def _tokens(loaded: LoadedModel, text_or_ids: str | Sequence[int]) -> tuple[list[int], list[str]]:
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise TokenprobeError("the text is empty")
        ids, pieces = tokenize_text(loaded.tokenizer, text_or_ids)
        shown = [""] * len(ids)
        for piece, index in pieces:
            if index >= 0:
                shown[index] += piece
        return ids, shown
    ids = [int(i) for i in np.asarray(text_or_ids).reshape(-1)]
    if not ids:
        raise TokenprobeError("no token ids given")
    vocab = len(loaded.tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise TokenprobeError(f"token id {bad[0]} is outside the tokenizer's vocabulary (0 to {vocab - 1})")
    return ids, [loaded.tokenizer.decode([i]) for i in ids]


def _run(loaded: LoadedModel, ids: list[int], layers: list[int], context_length: int,
         batch_size: int, bos: str) -> tuple[MemorySink, torch.Tensor]:
    """Each layer's states at every position of `ids` chunked as training chunks (BOS as `bos`, a
    --bos choice, resolves), and the rows of those that are the text's tokens (not a BOS), in order."""
    if context_length < 2:
        raise TokenprobeError(f"context_length must be at least 2, got {context_length}")
    bad = [layer for layer in layers if not 0 <= layer <= loaded.num_layers]
    if bad:
        raise TokenprobeError(f"layer {bad[0]} does not exist: {loaded.name} has layers 0 to {loaded.num_layers}")
    bos_id = resolve_bos(loaded.tokenizer, bos)
    acts, lengths = extract_chunks(loaded, chunk_ids(ids, context_length, bos_id), layers, batch_size)
    start = 1 if bos_id is not None else 0
    rows = np.concatenate([np.arange(s + start, s + n) for s, n in zip(np.cumsum(lengths) - lengths, lengths)])
    return acts, torch.from_numpy(rows)


def activations(loaded: LoadedModel, text_or_ids: str | Sequence[int], layers: Sequence[int] | str = "all", *,
                context_length: int = DEFAULT_CONTEXT_LENGTH, batch_size: int = 8, bos: str = "auto") -> Activations:
    """The hidden states training would capture for a text (or token ids), at `layers` ("all" or a list).

    The text is tokenized without special tokens and cut into chunks of `context_length` tokens, each
    starting with the tokenizer's BOS where `bos` says so (as ``--bos``: auto, always or never), as
    training chunks its corpus; pass the probes' context length and ``bos`` (``ProbeSet.bos``) to see
    what they saw. One forward pass per batch, stopped after the deepest layer asked.
    """
    if isinstance(layers, str) and layers != "all":
        raise TokenprobeError(f"layers must be 'all' or a list of layer numbers, got {layers!r}")
    layers = (list(range(loaded.num_layers + 1)) if isinstance(layers, str)
              else sorted({int(layer) for layer in np.asarray(layers).reshape(-1)}))
    if not layers:
        raise TokenprobeError("no layers asked for")
    ids, tokens = _tokens(loaded, text_or_ids)
    acts, rows = _run(loaded, ids, layers, context_length, batch_size, bos)
    return Activations(ids, tokens, layers, {layer: acts.layer(layer)[rows] for layer in layers},
                       acts.keep[rows.numpy()])


@dataclass(frozen=True)
class ProbeKey:
    """Which probe a row of a Prediction is: its family, task, target and layer."""

    kind: str
    task: str
    target: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind} {self.task} {self.target!r} layer {self.layer}"


@dataclass
class Prediction:
    """Every probe's probability at every token of one text.

    ``probabilities[i]`` belongs to ``keys[i]``; ``pred[layer]`` is the one probe of that layer (when
    the set has one family, task and target), ``pred.get(layer, kind=..., target=...)`` otherwise.
    """

    token_ids: list[int]
    tokens: list[str]
    keys: list[ProbeKey]
    probabilities: np.ndarray  # (n_probes, n_tokens) float32; NaN where the hidden state was not finite

    @property
    def layers(self) -> list[int]:
        return sorted({key.layer for key in self.keys})

    def get(self, layer: int, kind: str | None = None, task: str | None = None,
            target: str | None = None) -> np.ndarray:
        found = [i for i, key in enumerate(self.keys) if key.layer == layer and kind in (None, key.kind)
                 and task in (None, key.task) and target in (None, key.target)]
        if not found:
            raise KeyError(f"no probe of layer {layer}" + (f" of family {kind}" if kind else "")
                           + f" (have: {', '.join(map(str, self.keys))})")
        if len(found) > 1:
            raise KeyError(f"{len(found)} probes of layer {layer}: name the family, task or target "
                           f"({', '.join(str(self.keys[i]) for i in found)})")
        return self.probabilities[found[0]]

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.get(layer)


class ProbeSet:
    """Saved probes (one run's or several), applied to text with one forward pass."""

    def __init__(self, probes: Sequence[Probe]):
        if not probes:
            raise TokenprobeError("no probes given")
        if any(p.meta is None for p in probes):
            raise TokenprobeError("a probe without metadata cannot be placed in a set (which model, layer, "
                                  "task?); load probes from their files with load_probes, or apply one yourself "
                                  "with probe.predict_proba(activations(...)[layer])")
        self.probes = sorted(probes, key=lambda p: (p.meta.layer, p.kind, p.meta.task, p.meta.target))
        first = self.probes[0].meta
        for probe in self.probes:
            meta = probe.meta
            if meta.model.weights_hash != first.model.weights_hash or meta.context_length != first.context_length:
                raise TokenprobeError(
                    f"probes come from different models or context lengths ({first.model.name} ctx "
                    f"{first.context_length} vs {meta.model.name} ctx {meta.context_length}); load them apart"
                )
            if meta.bos != first.bos:
                raise TokenprobeError(f"probes were trained on chunks with different --bos ({first.bos} vs "
                                      f"{meta.bos}); load them apart")
        keys = [self.key(p) for p in self.probes]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise TokenprobeError(f"two probes for {twice}; pass each probe once")

    @staticmethod
    def key(probe: Probe) -> ProbeKey:
        return ProbeKey(probe.kind, probe.meta.task, probe.meta.target, probe.meta.layer)

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes)

    def __getitem__(self, index: int) -> Probe:
        return self.probes[index]

    @property
    def layers(self) -> list[int]:
        return sorted({p.meta.layer for p in self.probes})

    @property
    def context_length(self) -> int:
        return int(self.probes[0].meta.context_length)

    @property
    def bos(self) -> str:
        """The probes' --bos (``legacy`` for probes saved before it: BOS wherever the tokenizer has one)."""
        return self.probes[0].meta.bos

    def check(self, loaded: LoadedModel) -> None:
        """Refuses a model or tokenizer other than the probes' (or one without their layers)."""
        for probe in self.probes:
            check_fits(probe, loaded)

    def predict(self, text_or_ids: str | Sequence[int], loaded: LoadedModel, batch_size: int = 8) -> Prediction:
        """Every probe's probability at every token of a text (or token ids), from one forward pass
        through training's own capture code, chunked to the probes' context length and --bos."""
        self.check(loaded)
        ids, tokens = _tokens(loaded, text_or_ids)
        acts, rows = _run(loaded, ids, self.layers, self.context_length, batch_size, self.bos)
        probabilities = np.empty((len(self.probes), len(ids)), dtype=np.float32)
        with torch.inference_mode():
            for i, probe in enumerate(self.probes):  # on every row, as `tokenprobe viz` does: the same figures
                probabilities[i] = probe.predict_proba(acts.layer(probe.meta.layer))[rows].float().numpy()
        probabilities[:, ~acts.keep[rows.numpy()]] = np.nan
        return Prediction(ids, tokens, [self.key(p) for p in self.probes], probabilities)


def load_probes(*sources: str | Path | Sequence[str | Path]) -> ProbeSet:
    """The probes of run folders (their ``probes/``) and probe files, any family: ``load_probes(run)``."""
    flat: list[str | Path] = []
    for source in sources:
        flat.extend([source] if isinstance(source, (str, Path)) else list(source))
    if not flat:
        raise TokenprobeError("name a run folder or probe files to load")
    return ProbeSet([load_probe(path) for path in probe_files(flat)])
