"""`viz`: one self-contained HTML page showing every layer's probe on every token of a text.

Everything about the probes (model, layer, task, target, context length, dtype) comes from the probe
files; the user names no layer and no model. The model named there is loaded once, checked against
every probe (tokenizer and weight hashes, hidden size), and run once over the text, chunked to the
probes' context length with BOS at the start of each chunk exactly as training chunked the corpus.
That single pass (training's own extraction) feeds all probes, so the page carries the
probabilities of every layer.
"""

from __future__ import annotations

import html
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenprobe.config import RunConfig
from tokenprobe.data.labels import make_labeler
from tokenprobe.data.prepare import prepare_chunks
from tokenprobe.data.text import chunk_ids, pieces_from_decoding, tokenize_text
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.extract import extract_chunks
from tokenprobe.files import atomic_write_bytes, default_cache_dir, json_safe
from tokenprobe.models.loading import LoadedModel, load_model
from tokenprobe.probes.base import Probe, ProbeMeta, check_fits, load_probe, probe_files
from tokenprobe.vocabulary import EVAL, EVAL_NATURAL

log = logging.getLogger(__name__)

# Probe metadata that must agree across all probes shown on one page.
SHARED_KEYS = ("model", "task", "target_ids", "context_length", "dtype")
PAGE_TEMPLATE = Path(__file__).with_name("page.html")


@dataclass
class Document:
    """One text shown on the page: its pieces in order, each a string and the token index it
    belongs to (-1 for text between tokens that no token covers)."""

    title: str | None
    pieces: list[tuple[str, int]]


@dataclass
class VizResult:
    path: Path | None
    data: dict[str, Any]  # what the page embeds
    layers: list[int]
    token_ids: np.ndarray  # (n_tokens,) the tokens shown, BOS excluded
    probabilities: np.ndarray  # (n_layers, n_tokens) float32, NaN where the hidden state was not finite
    labels: list[bool | None]  # does the target truly follow (next) / is this the target (current)


# -------------------------------------------------------------------------------------------- probes


def load_probe_set(sources: list[str | Path], family: str | None = None) -> list[Probe]:
    """Loads the probes, sorted by layer; they must come from one model, task, target and context.

    A page shows one probe family: `family`, or, where the sources hold several, the run's primary one
    (its files are ``layerNN.safetensors``; the others ``<family>-layerNN.safetensors``)."""
    files = probe_files(sources)
    probes = [load_probe(path) for path in files]
    kinds = sorted({p.kind for p in probes})
    if family is not None:
        if family not in kinds:
            raise TokenprobeError(f"no {family} probes here (the probes are {', '.join(kinds)}); "
                                  f"pick one with --family")
        probes = [p for p in probes if p.kind == family]
    elif len(kinds) > 1:
        primary = [p.kind for p, path in zip(probes, files) if re.fullmatch(r"layer\d+\.safetensors", path.name)]
        chosen = primary[0] if primary else kinds[0]
        others = " or ".join(k for k in kinds if k != chosen)
        log.warning(f"the run has {', '.join(kinds)} probes: showing the {chosen} ones (--family {others} for the others)")
        probes = [p for p in probes if p.kind == chosen]
    by_layer: dict[int, Probe] = {}
    first: ProbeMeta = probes[0].meta
    for probe in probes:
        meta: ProbeMeta = probe.meta
        if not isinstance(meta.layer, int):
            raise TokenprobeError(f"probe {meta.run_name} has no layer in its metadata; retrain it")
        for key in SHARED_KEYS:
            if getattr(meta, key) != getattr(first, key):
                raise TokenprobeError(
                    f"probes disagree on {key}: {_shown(getattr(first, key))!r} (layer {first.layer}) vs "
                    f"{_shown(getattr(meta, key))!r} (layer {meta.layer}); show the probes of one run on a page"
                )
        if meta.layer in by_layer:
            raise TokenprobeError(f"two probes for layer {meta.layer}; pass each layer's probe once")
        by_layer[meta.layer] = probe
    return [by_layer[layer] for layer in sorted(by_layer)]


def _shown(value):
    """A model identity by its source, anything else as it is."""
    return getattr(value, "source", value)


def check_probes_fit(probes: list[Probe], loaded: LoadedModel) -> None:
    for probe in probes:
        check_fits(probe, loaded)


# --------------------------------------------------------------------------------------------- texts


# ----------------------------------------------------------------------------------- forward pass


def layer_probabilities(
    loaded: LoadedModel, probes: list[Probe], chunks: list[np.ndarray], batch_size: int = 8
) -> list[np.ndarray]:
    """For each chunk, a (n_layers, chunk_length) float32 array of every probe's probability.

    Every position of every chunk goes through training's own extraction (one forward pass per batch,
    stopped after the deepest probe's layer). Chunks are padded to one width; a causal model never
    looks ahead, and each is run only to its own end but for the batch's longest. Positions of a
    batch whose hidden states were not finite get NaN.
    """
    acts, lengths = extract_chunks(loaded, chunks, [p.layer for p in probes], batch_size)
    n = int(lengths.sum())
    probs = np.empty((len(probes), n), dtype=np.float32)
    with torch.inference_mode():
        for j, probe in enumerate(probes):
            probs[j] = probe.predict_proba(acts.layer(probe.layer)).numpy()
    probs[:, ~acts.keep] = np.nan
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [probs[:, starts[i] : starts[i + 1]] for i in range(len(chunks))]


# ------------------------------------------------------------------------------------------- sources


@dataclass
class _Prepared:
    documents: list[Document]
    chunks: list[np.ndarray]  # model input, BOS included
    token_ids: list[int]  # shown tokens, in order
    token_chunk: list[int]  # index into `chunks` of each shown token
    token_pos: list[int]  # position of each shown token in its chunk
    next_ids: list[int | None]  # the token that truly follows each shown token (None: unknown)


def _prepare_texts(texts: list[tuple[str | None, str]], tokenizer, context_length: int) -> _Prepared:
    bos = tokenizer.bos_token_id
    prep = _Prepared([], [], [], [], [], [])
    for title, text in texts:
        ids, pieces = tokenize_text(tokenizer, text)
        if not ids:
            raise TokenprobeError("the text gives no tokens; pass some text with --text or --file")
        offset = len(prep.token_ids)
        prep.documents.append(Document(title, [(s, i + offset if i >= 0 else -1) for s, i in pieces]))
        for chunk in chunk_ids(ids, context_length, bos):
            body = len(chunk) - (1 if bos is not None else 0)
            prep.token_chunk.extend([len(prep.chunks)] * body)
            prep.token_pos.extend(range(len(chunk) - body, len(chunk)))
            prep.chunks.append(chunk)
        prep.token_ids.extend(ids)
        prep.next_ids.extend(ids[1:] + [None])
    return prep


def _prepare_corpus_sample(probes: list[Probe], loaded: LoadedModel, n: int, cache_dir: Path,
                           progress: bool) -> _Prepared:
    """`n` held-out chunks of the run's own corpus, re-created with the run's split (through `prepare`)."""
    if n < 1:
        raise TokenprobeError(f"--corpus-sample must be at least 1, got {n}")
    meta = probes[0].meta
    if not meta.config:
        raise TokenprobeError("the probe files carry no run config, so --corpus-sample cannot find the corpus; "
                              "use --text or --file")
    config = RunConfig.from_dict(meta.config)
    prepared = prepare_chunks(config, loaded, cache_dir, progress)
    corpus, chunks, split, bos = prepared.corpus, prepared.chunks, prepared.split, prepared.bos_id
    expected = meta.corpus.get("sha256")
    if expected and corpus.sha256 != expected:
        raise TokenprobeError(
            f"corpus {config.corpus} has changed since the run (sha256 {corpus.sha256[:12]}, run used "
            f"{expected[:12]}), so its held-out chunks cannot be found again; use --text or --file"
        )
    start = 1 if bos is not None else 0
    if n > len(split.eval):
        log.warning(f"the run holds out {len(split.eval)} chunks; showing all of them")
    prep = _Prepared([], [], [], [], [], [])
    for c in split.eval[:n]:
        c = int(c)
        body = [int(t) for t in chunks[c, start:]]
        offset = len(prep.token_ids)
        pieces = pieces_from_decoding(loaded.tokenizer, body, offset)
        prep.documents.append(Document(f"held-out chunk {c} of {corpus.name}", pieces))
        prep.token_chunk.extend([len(prep.chunks)] * len(body))
        prep.token_pos.extend(range(start, start + len(body)))
        prep.chunks.append(np.asarray(chunks[c], dtype=np.int64))
        prep.token_ids.extend(body)
        following = int(chunks[c + 1, start]) if c + 1 < len(chunks) else None  # the stream is contiguous
        prep.next_ids.extend(body[1:] + [following])
    return prep


def token_labels(labeler, token_ids: list[int], next_ids: list[int | None]) -> list[bool | None]:
    """Each shown token's label by the run's own Labeler, applied to (token, following token) pairs;
    None where the label needs the following token and the text ends there."""
    following = [-1 if nxt is None else nxt for nxt in next_ids]
    pairs = np.asarray([token_ids, following], dtype=np.int64).T.reshape(len(token_ids), 2)
    labels, valid = labeler.labels(pairs, has_bos=False)
    return [bool(labels[t, 0]) if valid[t, 0] and not (labeler.predicts_next_token and next_ids[t] is None) else None
            for t in range(len(token_ids))]


# ----------------------------------------------------------------------------------------- the page


def _metrics_of(probe: Probe) -> dict[str, Any]:
    keep = ("balanced_accuracy", "auroc", "accuracy", "n", "positives")
    return {name: {k: m.get(k) for k in keep} for name, m in probe.meta.metrics.items() if name in (EVAL, EVAL_NATURAL)}


def page_data(probes: list[Probe], prep: _Prepared, probabilities: np.ndarray, labels: list[bool | None],
              model_probabilities: list[float | None] | None = None) -> dict[str, Any]:
    """Everything the page shows, JSON-ready (NaN becomes null)."""
    meta = probes[0].meta
    return json_safe({
        "model": meta.model.name,
        "model_source": meta.model.source,
        "task": meta.task,
        "family": probes[0].kind,
        "target": meta.target,
        "target_ids": meta.target_ids,
        "context_length": meta.context_length,
        "dtype": meta.dtype,
        "run_name": meta.sweep_name or meta.run_name,
        "layers": [p.layer for p in probes],
        "metrics": [_metrics_of(p) for p in probes],
        "documents": [{"title": d.title, "pieces": [[s, i] for s, i in d.pieces]} for d in prep.documents],
        "tokens": {
            "id": prep.token_ids,
            "chunk": prep.token_chunk,
            "pos": prep.token_pos,
            "label": [None if v is None else int(v) for v in labels],
            "model_prob": model_probabilities,
        },
        "probs": [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in probabilities],
    })


def embed_json(data: Any) -> str:
    """JSON safe to place inside <script>: no '<', '>' or '&' survive, so '</script>' cannot close it."""
    text = json.dumps(json_safe(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any]) -> str:
    title = f"tokenprobe: {data.get('model')} {data.get('task')} {data.get('target')!r} ({data.get('family', 'linear')} probes)"
    template = PAGE_TEMPLATE.read_text(encoding="utf-8")
    return template.replace("{{TITLE}}", html.escape(title)).replace("{{DATA}}", embed_json(data))


def default_out(sources: list[str | Path]) -> Path:
    if len(sources) == 1 and Path(sources[0]).is_dir():
        return Path(sources[0]) / "viz.html"
    return Path("tokenprobe-viz.html")


def visualize(
    sources: list[str | Path],
    *,
    text: str | None = None,
    file: str | Path | None = None,
    corpus_sample: int | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    progress: bool = False,
    write: bool = True,
    family: str | None = None,
) -> VizResult:
    """Runs the probes in `sources` (run folders or probe files) over one text and writes the page.

    Give exactly one of `text`, `file` or `corpus_sample` (held-out chunks of the run's corpus).
    Pass `loaded` to reuse a model; it is checked against every probe all the same.
    """
    if sum(x is not None for x in (text, file, corpus_sample)) != 1:
        raise TokenprobeError("give exactly one of --text, --file or --corpus-sample")
    if not sources:
        raise TokenprobeError("name a run folder or probe files to visualise")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    probes = load_probe_set(sources, family)
    meta = probes[0].meta
    if loaded is None:
        if progress:
            print(f"Loading model {meta.model.source} ({meta.dtype}) named in the probe files ...",
                  file=sys.stderr)
        loaded = load_model(meta.model.source, meta.dtype or "auto", device, cache_dir, progress=progress)
    check_probes_fit(probes, loaded)

    context_length = int(meta.context_length)
    if corpus_sample is not None:
        prep = _prepare_corpus_sample(probes, loaded, corpus_sample, cache_dir, progress)
    else:
        if file is not None:
            path = Path(file)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise TokenprobeError(f"--file {path} not found") from None
            except UnicodeDecodeError as exc:
                raise TokenprobeError(f"--file {path} is not UTF-8 text (byte {exc.start}); convert it") from None
            title = path.name
        else:
            title = None
        if not text or not text.strip():
            raise TokenprobeError("the text is empty; pass some text with --text or --file")
        prep = _prepare_texts([(title, text)], loaded.tokenizer, context_length)

    per_chunk = layer_probabilities(loaded, probes, prep.chunks)
    probabilities = np.empty((len(probes), len(prep.token_ids)), dtype=np.float32)
    for t, (c, pos) in enumerate(zip(prep.token_chunk, prep.token_pos)):
        probabilities[:, t] = per_chunk[c][:, pos]
    if meta.target_ids and meta.task in ("next", "current"):
        labels = token_labels(make_labeler(meta.task, meta.target_ids), prep.token_ids, prep.next_ids)
    else:  # span labels (--labels, --label-regex) and ahead:K: the page shows no truth (yet)
        labels = [None] * len(prep.token_ids)

    data = page_data(probes, prep, probabilities, labels)
    path = None
    if write:
        path = Path(out) if out is not None else default_out(sources)
        try:
            atomic_write_bytes(path, render_html(data).encode("utf-8"))
        except OSError as exc:
            raise TokenprobeError(f"cannot write the page to {path}: {exc.strerror or exc}") from exc
    return VizResult(path=path, data=data, layers=[p.layer for p in probes],
                     token_ids=np.asarray(prep.token_ids, dtype=np.int64), probabilities=probabilities,
                     labels=labels)
