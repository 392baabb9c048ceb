"""`viz`: one self-contained HTML page showing every layer's probe on every token of a text.

Everything about the probes (model, layer, task, target, context length, dtype) comes from the probe
files; the user names no layer and no model. The model named there is loaded once, checked against
every probe (tokenizer and weight hashes, hidden size), and run once over the text, chunked to the
probes' context length with BOS at the start of each chunk exactly as training chunked the corpus.
That single pass (training's own extraction) feeds all probes, so the page carries the
probabilities of every layer.

A scan folder (`tokenprobe scan`: scan.json and one probe folder per target) gives one page for all
its targets: the same single pass feeds every target's probes at every layer, the page embeds each
target's probabilities (compactly: 4 decimals as base64 uint16), and a selector switches target.

A next-token run's page also shows the model's own P(target next) at every token, read from the same
pass's last layer (the final norm, the unembedding and a softmax over the whole vocabulary; a target set
is "any of them", the sum). A run folder holding ablation.json (`tokenprobe ablate`) adds, for each layer
ablated there, one more pass over the text with the probe's direction edited at that layer as ablate
edits it (same family, mode and value), and the model's P(target next) from it: the page shows P with
and without the direction, and colours tokens by the change.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenprobe.config import RunConfig, task_offset
from tokenprobe.data.labels import make_labeler
from tokenprobe.data.prepare import prepare_chunks
from tokenprobe.data.text import chunk_ids, pieces_from_decoding, resolve_bos, tokenize_text
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.extract import extract_chunks
from tokenprobe.files import atomic_write_bytes, default_cache_dir, json_safe
from tokenprobe.models.loading import LoadedModel, load_model
from tokenprobe.models.surgery import Unembedding
from tokenprobe.probes.base import Probe, ProbeMeta, check_fits, load_probe, probe_files
from tokenprobe.vocabulary import EVAL, EVAL_NATURAL

log = logging.getLogger(__name__)

# Probe metadata that must agree across all probes shown on one page.
SHARED_KEYS = ("model", "task", "target_ids", "context_length", "bos", "dtype")
PAGE_TEMPLATE = Path(__file__).with_name("page.html")
SCAN_RESULTS = "scan.json"  # tokenprobe.pipelines.scan.SCAN_RESULTS (not imported: it pulls in all of training)
# A scan page's probabilities: round(p * PROB_SCALE) as little-endian uint16, PROB_NAN where NaN, base64.
PROB_SCALE = 10_000
PROB_NAN = 65_535
ABLATION_RESULTS = "ablation.json"  # tokenprobe.report.ablation.ABLATION (not imported: it pulls in plotting)
FLOAT32_ENCODING = "base64 of little-endian float32 (tokens), a float32 nan where unknown"


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
    scan: ScanView | None = None  # a scan folder's page: every target's probabilities
    # the model's own P(target next) per token (next-token runs; None otherwise), float64, NaN where unknown
    model_probabilities: np.ndarray | None = None
    ablation: AblationView | None = None  # a run folder with ablation.json: P(target next) with each edit


@dataclass
class AblationEdit:
    """One layer of ablation.json, as the page re-runs it: the probe's unit direction edited at `layer`
    (`mode` and `value` as ablate used them), and ablate's own verdict on held-out text."""

    layer: int
    direction: torch.Tensor  # unit, float32
    value: float
    entry: dict[str, Any]  # the layer's entry in ablation.json


@dataclass
class AblationView:
    """What a run folder's ablation.json adds to its page: per ablated layer, the model's P(target next)
    at every token with the probe's direction edited at that layer."""

    run: Path
    family: str
    mode: str
    edits: list[AblationEdit]
    probabilities: np.ndarray  # (n_edits, n_tokens) float64, NaN where unknown

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.edits]


@dataclass
class ScanTarget:
    """One scanned target of a scan folder: its entry in scan.json and its probes, sorted by layer."""

    text: str
    token_id: int
    token: str | None
    rank: int
    best_layer: int | None
    best: dict[str, Any]
    probes: list[Probe]


@dataclass
class ScanView:
    """What a scan folder's page carries; `probabilities`, `labels` and `model_probabilities` are every
    target's, in the order of `targets` (the scan's own)."""

    run: Path
    targets: list[ScanTarget]
    selected: int  # index into `targets` of the target shown first
    probabilities: np.ndarray  # (n_targets, n_layers, n_tokens) float32, NaN where the hidden state was not finite
    truth_ids: list[int | None]  # per token: the token the task asks about (this, next, K ahead); None: unknown
    labels: np.ndarray  # (n_targets, n_tokens) float: 1 / 0, NaN where unknown
    model_probabilities: np.ndarray | None  # (n_targets, n_tokens) float64 for the next-token task, else None


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


def scan_folder(sources: list[str | Path]) -> Path | None:
    """The scan folder among `sources` (one holding scan.json), which must then be the only source."""
    found = [Path(s) for s in sources if Path(s).is_dir() and (Path(s) / SCAN_RESULTS).is_file()]
    if not found:
        return None
    if len(sources) > 1:
        raise TokenprobeError(f"{found[0]} is a scan folder: show it on its own (or one target's probes, "
                              f"e.g. {found[0] / 'probes' / 't000262'}, among other probe files)")
    return found[0]


def load_scan(run: Path, family: str | None = None) -> list[ScanTarget]:
    """Every scanned target of a scan folder with its probes (all layers), in the scan's order; the
    targets must share model, task, context, dtype and layers (one scan's do)."""
    path = run / SCAN_RESULTS
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenprobeError(f"{path} cannot be read ({exc}); rerun `tokenprobe scan`") from None
    entries = results.get("targets") if isinstance(results, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TokenprobeError(f"{path} lists no targets; is {run} a folder written by `tokenprobe scan`?")
    usable = [e for e in entries if not e.get("error") and e.get("probe_dir")]
    if not usable:
        raise TokenprobeError(f"scan folder {run} has no target with probes ({len(entries)} target"
                              f"{'' if len(entries) == 1 else 's'} listed, none scanned)")
    if len(usable) < len(entries):
        log.warning(f"{len(entries) - len(usable)} of the scan's {len(entries)} targets were skipped by the scan "
                    "(no probes): the page shows the others")
    targets: list[ScanTarget] = []
    for entry in usable:
        text, token_id = entry.get("text"), entry.get("token_id")
        folder = run / str(entry["probe_dir"])
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise TokenprobeError(f"scan folder {run}: the probes of target {text!r} are missing ({folder} holds "
                                  "no probe files)")
        probes = load_probe_set([folder], family)
        if probes[0].meta.target_ids != [token_id]:
            raise TokenprobeError(f"scan folder {run}: {folder} holds probes for {probes[0].meta.target!r} "
                                  f"(token ids {probes[0].meta.target_ids}), scan.json says {text!r} ({token_id})")
        targets.append(ScanTarget(text=text, token_id=int(token_id), token=entry.get("token"),
                                  rank=int(entry.get("rank") or len(targets) + 1), best_layer=entry.get("best_layer"),
                                  best=entry.get("best") or {}, probes=probes))
    first = targets[0]
    for target in targets[1:]:
        for key in ("model", "task", "context_length", "dtype", "kind"):
            mine = getattr(target.probes[0].meta, key) if key != "kind" else target.probes[0].kind
            theirs = getattr(first.probes[0].meta, key) if key != "kind" else first.probes[0].kind
            if mine != theirs:
                raise TokenprobeError(f"scan folder {run}: targets {first.text!r} and {target.text!r} disagree on "
                                      f"{key} ({_shown(theirs)!r} vs {_shown(mine)!r}); rerun `tokenprobe scan`")
        if [p.layer for p in target.probes] != [p.layer for p in first.probes]:
            raise TokenprobeError(
                f"scan folder {run}: target {target.text!r} has probes for layers "
                f"{','.join(str(p.layer) for p in target.probes)}, target {first.text!r} for "
                f"{','.join(str(p.layer) for p in first.probes)}; a page needs every layer of every target")
    return targets


def pick_target(targets: list[ScanTarget], wanted: str | None) -> int:
    """The index of `--target` among the scan's targets (its text, else its token id); 0 when not given."""
    if wanted is None:
        return 0
    for i, target in enumerate(targets):
        if target.text == wanted:
            return i
    if wanted.strip().isdigit():
        for i, target in enumerate(targets):
            if target.token_id == int(wanted):
                return i
    shown = ", ".join(repr(t.text) for t in targets[:8]) + (", ..." if len(targets) > 8 else "")
    raise TokenprobeError(f"--target {wanted!r} is not among the scan's {len(targets)} targets ({shown}); "
                          "give its text exactly (leading spaces count) or its token id")


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
    _, lengths, probs = _extract_probabilities(loaded, probes, chunks, batch_size)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [probs[:, starts[i] : starts[i + 1]] for i in range(len(chunks))]


def _extract_probabilities(loaded: LoadedModel, probes: list[Probe], chunks: list[np.ndarray], batch_size: int = 8,
                           also: tuple[int, ...] = ()):
    """One extraction for all `probes` (any number per layer) and the layers in `also`: the activations,
    the chunks' lengths and a (n_probes, n_rows) float32 array of probabilities (NaN: not finite)."""
    acts, lengths = extract_chunks(loaded, chunks, sorted({p.layer for p in probes} | set(also)), batch_size)
    probs = np.empty((len(probes), int(lengths.sum())), dtype=np.float32)
    with torch.inference_mode():
        for j, probe in enumerate(probes):
            probs[j] = probe.predict_proba(acts.layer(probe.layer)).numpy()
    probs[:, ~acts.keep] = np.nan
    return acts, lengths, probs


# ------------------------------------------------------------------------------------------- sources


@dataclass
class _Prepared:
    documents: list[Document]
    chunks: list[np.ndarray]  # model input, BOS included
    token_ids: list[int]  # shown tokens, in order
    token_chunk: list[int]  # index into `chunks` of each shown token
    token_pos: list[int]  # position of each shown token in its chunk
    next_ids: list[int | None]  # the token that truly follows each shown token (None: unknown)
    # per document: how many tokens it shows, and those tokens followed by what truly follows them
    streams: list[tuple[int, list[int]]] = field(default_factory=list)

    def ids_ahead(self, k: int) -> list[int | None]:
        """Each shown token's token `k` ahead in its document's stream (k=0: itself; None: unknown)."""
        out: list[int | None] = []
        for count, stream in self.streams:
            out.extend(stream[i + k] if i + k < len(stream) else None for i in range(count))
        return out


def _prepare_texts(texts: list[tuple[str | None, str]], tokenizer, context_length: int,
                   bos_mode: str = "auto") -> _Prepared:
    """The texts chunked as the probes' run chunked its corpus: `context_length`, BOS as its --bos."""
    bos = resolve_bos(tokenizer, bos_mode)
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
        prep.streams.append((len(ids), list(ids)))
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
        after = [int(t) for t in chunks[c + 1, start:]] if c + 1 < len(chunks) else []
        prep.streams.append((len(body), body + after))
    return prep


def ahead_labels(prep: _Prepared, offset: int, target_ids: list[int]) -> list[bool | None]:
    """Is the token `offset` ahead (ahead:K) one of the targets, read from the text itself (not cut at
    the chunks' ends as training's labels are: the text goes on); None where the text ends first."""
    wanted = set(target_ids)
    return [None if a is None else a in wanted for a in prep.ids_ahead(offset)]


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


def encode_probabilities(values: np.ndarray) -> str:
    """Probabilities for a scan page: round(p * PROB_SCALE) as little-endian uint16 (PROB_NAN where NaN),
    base64; 2.67 characters a value, against about 7 for JSON numbers of 5 decimals."""
    values = np.asarray(values, dtype=np.float64)
    quantised = np.full(values.shape, PROB_NAN, dtype="<u2")
    finite = np.isfinite(values)
    quantised[finite] = np.rint(np.clip(values[finite], 0.0, 1.0) * PROB_SCALE).astype("<u2")
    return base64.b64encode(quantised.tobytes()).decode("ascii")


def decode_probabilities(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of encode_probabilities (as the page decodes it): float64, NaN where NaN."""
    quantised = np.frombuffer(base64.b64decode(text), dtype="<u2").reshape(shape)
    return np.where(quantised == PROB_NAN, np.nan, quantised / PROB_SCALE)


def encode_float32(values: np.ndarray) -> str:
    """Little-endian float32, base64 (the model's own probabilities: small ones keep their digits)."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_float32(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def _rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    return value


def scan_page_data(base: dict[str, Any], view: ScanView) -> dict[str, Any]:
    """A scan folder's page: `base` (page_data of the target shown first, without its plain
    probabilities) and every target's probabilities, metrics and model probability, encoded."""
    targets = []
    for j, target in enumerate(view.targets):
        targets.append({
            "text": target.text, "token_id": target.token_id, "token": target.token, "rank": target.rank,
            "best_layer": target.best_layer,
            "best": {k: _rounded(target.best.get(k)) for k in ("balanced_accuracy", "auroc")},
            "metrics": [_rounded(_metrics_of(p)) for p in target.probes],
            "probs": encode_probabilities(view.probabilities[j]),
            "model_prob": None if view.model_probabilities is None else encode_float32(view.model_probabilities[j]),
        })
    data = dict(base)
    data["probs"] = None  # the page decodes the selected target's from scan.targets
    data["tokens"] = {**base["tokens"], "model_prob": None}
    data["scan"] = {
        "run": view.run.name,
        "encoding": {"probs": "base64 of little-endian uint16 (layers x tokens): round(p * scale), nan for NaN",
                     "scale": PROB_SCALE, "nan": PROB_NAN,
                     "model_prob": "base64 of little-endian float32 (tokens), NaN where unknown"},
        "selected": view.selected,
        "truth_id": view.truth_ids,
        "targets": targets,
    }
    return json_safe(data)


def embed_json(data: Any) -> str:
    """JSON safe to place inside <script>: no '<', '>' or '&' survive, so '</script>' cannot close it."""
    text = json.dumps(json_safe(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any]) -> str:
    if data.get("scan"):
        count = len(data["scan"]["targets"])
        title = (f"tokenprobe: {data.get('model')} {data.get('task')} scan of {count} target{'' if count == 1 else 's'} "
                 f"({data.get('family', 'linear')} probes)")
    else:
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
    target: str | None = None,
) -> VizResult:
    """Runs the probes in `sources` (run folders or probe files) over one text and writes the page.

    Give exactly one of `text`, `file` or `corpus_sample` (held-out chunks of the run's corpus).
    Pass `loaded` to reuse a model; it is checked against every probe all the same.
    A scan folder (from `tokenprobe scan`) gives a page of all its targets, `target` (its text or
    token id) shown first; the page switches between them.
    """
    if sum(x is not None for x in (text, file, corpus_sample)) != 1:
        raise TokenprobeError("give exactly one of --text, --file or --corpus-sample")
    if not sources:
        raise TokenprobeError("name a run folder or probe files to visualise")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    scan_run = scan_folder(sources)
    targets: list[ScanTarget] = []
    selected = 0
    if scan_run is not None:
        targets = load_scan(scan_run, family)
        selected = pick_target(targets, target)
        probes = [p for t in targets for p in t.probes]
        shown = targets[selected].probes
    else:
        if target is not None:
            raise TokenprobeError("--target picks the target shown first on a scan folder's page (from "
                                  "`tokenprobe scan`); these probes have one target")
        probes = shown = load_probe_set(sources, family)
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
        prep = _prepare_texts([(title, text)], loaded.tokenizer, context_length, meta.bos)

    offset = _task_offset(meta.task)
    # A next-token page shows the model's own probability of the target(s): the last layer too.
    why = None if targets else no_model_probability_reason(meta)
    own = offset == 1 and why is None
    unembed = None
    if own and not targets:
        try:
            unembed = Unembedding.of(loaded.model)
        except TokenprobeError as exc:
            log.warning(f"the page shows no model probabilities: {exc}")
            own, why = False, f"the model's own P is not shown: {exc}"
    if progress and targets:
        print(f"Running {len(targets)} targets x {len(shown)} layers of probes over {len(prep.token_ids):,} tokens "
              "(one forward pass) ...", file=sys.stderr)
    acts, lengths, probs = _extract_probabilities(loaded, probes, prep.chunks,
                                                  also=(loaded.num_layers,) if own else ())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = starts[np.asarray(prep.token_chunk, dtype=np.int64)] + np.asarray(prep.token_pos, dtype=np.int64)
    by_token = probs[:, rows]  # (n_probes, n_tokens)

    view = ablation = None
    model_probabilities = None
    if targets:
        n_layers = len(shown)
        everything = by_token.reshape(len(targets), n_layers, len(prep.token_ids))
        truth_ids = prep.ids_ahead(offset) if offset is not None else [None] * len(prep.token_ids)
        wanted = np.asarray([t.token_id for t in targets], dtype=np.int64)[:, None]
        known = np.asarray([a is not None for a in truth_ids])
        following = np.asarray([-1 if a is None else a for a in truth_ids], dtype=np.int64)[None, :]
        truth = np.where(known[None, :], (following == wanted).astype(np.float64), np.nan)
        model_probabilities = _own_probabilities(loaded, acts, rows, [t.token_id for t in targets]) if own else None
        view = ScanView(run=scan_run, targets=targets, selected=selected, probabilities=everything,
                        truth_ids=truth_ids, labels=truth, model_probabilities=model_probabilities)
        probabilities = everything[selected]
        labels = [None if np.isnan(v) else bool(v) for v in truth[selected]]
    else:
        probabilities = by_token
        if meta.target_ids and meta.task in ("next", "current"):
            labels = token_labels(make_labeler(meta.task, meta.target_ids), prep.token_ids, prep.next_ids)
        elif meta.target_ids and offset is not None:  # ahead:K: the token K ahead in the text
            labels = ahead_labels(prep, offset, meta.target_ids)
        else:  # span labels (--labels, --label-regex): the page shows no truth (yet)
            labels = [None] * len(prep.token_ids)
        if own:
            model_probabilities = _target_probabilities(unembed, acts, rows, loaded.num_layers, meta.target_ids)
            ablation = _ablation_view(sources, meta, loaded, prep.chunks, rows, unembed, progress)
    del acts

    data = page_data(shown, prep, probabilities, labels)
    if view is not None:
        data = scan_page_data(data, view)
    else:
        data = own_page_data(data, model_probabilities, ablation, why)
    path = None
    if write:
        path = Path(out) if out is not None else default_out(sources)
        try:
            atomic_write_bytes(path, render_html(data).encode("utf-8"))
        except OSError as exc:
            raise TokenprobeError(f"cannot write the page to {path}: {exc.strerror or exc}") from exc
    return VizResult(path=path, data=data, layers=[p.layer for p in shown],
                     token_ids=np.asarray(prep.token_ids, dtype=np.int64), probabilities=probabilities,
                     labels=labels, scan=view, model_probabilities=model_probabilities, ablation=ablation)


def _ablation_view(sources: list[str | Path], meta: ProbeMeta, loaded: LoadedModel, chunks: list[np.ndarray],
                   rows: np.ndarray, unembed: Unembedding, progress: bool) -> AblationView | None:
    """The page's ablation: ablation.json of the run folder shown, re-run on the page's text; else None."""
    run = ablation_run(sources)
    if run is None:
        return None
    found = load_ablation(run, meta, loaded)
    if found is None:
        return None
    family, mode, edits = found
    values = ablated_probabilities(loaded, chunks, rows, list(meta.target_ids), mode, edits, unembed,
                                   progress=progress)
    return AblationView(run=run, family=family, mode=mode, edits=edits, probabilities=values)


def _task_offset(task: str) -> int | None:
    """How many tokens ahead the task looks (next 1, current 0, ahead:K K); None for another task."""
    try:
        return task_offset(task)
    except TokenprobeError:
        return None


def _own_probabilities(loaded: LoadedModel, acts, rows: np.ndarray, token_ids: list[int]) -> np.ndarray | None:
    """(n_targets, n_tokens) float64: the model's own probability of each target as the next token, from
    the same pass's last layer (one full softmax per token for all targets); None without an unembedding."""
    try:
        unembed = Unembedding.of(loaded.model)
    except TokenprobeError as exc:
        log.warning(f"the page shows no model probabilities: {exc}")
        return None
    last = acts.layer(loaded.num_layers)
    hidden = last.index_select(0, torch.from_numpy(rows).to(last.device))
    values = unembed.each_probability(hidden, token_ids)  # (n_tokens, n_targets)
    values[~acts.keep[rows]] = np.nan
    return values.T.copy()


# ------------------------------------------------------------------------- the model's own P(target)


def no_model_probability_reason(meta: ProbeMeta) -> str | None:
    """Why a page of these probes shows no model P(target next), or None when it does: only a next-token
    run with a target token asks what the model's next-token distribution answers."""
    if not meta.target_ids:
        return ("the model's own P is not shown: these probes' labels are spans of text, not a token the model "
                "could predict next")
    offset = _task_offset(meta.task)
    if offset == 0:
        return ("the model's own P is not shown: these probes ask whether this token is the target, and the "
                "model predicts the next one")
    if offset is None:
        return f"the model's own P is not shown (task {meta.task})"
    if offset > 1:
        return (f"the model's own P is not shown: these probes ask about the token {offset} ahead, and the model "
                "predicts the next one")
    return None


def _target_probabilities(unembed: Unembedding, acts, rows: np.ndarray, layer: int,
                          target_ids: list[int]) -> np.ndarray:
    """(n_tokens,) float64: the model's own probability of the target (any of several: the sum) as the next
    token, from `layer` (the last) of an extraction at `rows`; NaN where the pass was not finite."""
    states = acts.layer(layer)
    hidden = states.index_select(0, torch.from_numpy(rows).to(states.device))
    values = np.asarray(unembed.target_probability(hidden, target_ids), dtype=np.float64)
    values[~acts.keep[rows]] = np.nan
    return values


def ablation_run(sources: list[str | Path]) -> Path | None:
    """The run folder whose ablation.json the page re-runs: the only source, a folder holding one."""
    if len(sources) != 1:
        return None
    folder = Path(sources[0])
    return folder if folder.is_dir() and (folder / ABLATION_RESULTS).is_file() else None


def load_ablation(run: Path, meta: ProbeMeta, loaded: LoadedModel) -> tuple[str, str, list[AblationEdit]] | None:
    """(family, mode, the edits) of a run folder's ablation.json, each layer's direction from the run's own
    probe file of ablate's family; None (with a warning: the page shows the rest) where it cannot be used."""
    path = run / ABLATION_RESULTS
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning(f"{path} cannot be read ({exc}): the page shows no ablation; rerun `tokenprobe ablate`")
        return None
    record = record if isinstance(record, dict) else {}
    entries, mode, family = record.get("layers"), record.get("mode"), record.get("family")
    if record.get("kind") != "ablation" or mode not in ("project", "mean") or not isinstance(family, str) \
            or not isinstance(entries, list) \
            or not all(isinstance(e, dict) and isinstance(e.get("layer"), int) for e in entries):
        log.warning(f"{path} is not an ablation written by `tokenprobe ablate` (its kind, mode, family or layers "
                    "are missing): the page shows no ablation")
        return None
    if record.get("target_ids") != list(meta.target_ids):
        log.warning(f"{path} ablated target ids {record.get('target_ids')}, the probes predict {meta.target_ids}: "
                    "the page shows no ablation; rerun `tokenprobe ablate`")
        return None
    try:
        probes = {}
        for file in probe_files([run]):
            probe = load_probe(file)
            if probe.kind == family:
                probes[probe.layer] = probe
        check_probes_fit(list(probes.values()), loaded)
    except TokenprobeError as exc:
        log.warning(f"the page shows no ablation: {exc}")
        return None
    from tokenprobe.pipelines.ablate import unit  # the edit ablate makes (imported here: it pulls in more)

    edits = []
    for entry in entries:
        probe = probes.get(entry["layer"])
        direction = probe.direction() if probe is not None else None
        if direction is None:
            log.warning(f"{path}: no {family} probe direction for layer {entry['layer']} in {run}: the page leaves "
                        "that layer's ablation out")
            continue
        value = entry.get("edit_value")
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
        edits.append(AblationEdit(layer=int(entry["layer"]), direction=unit(direction), value=value, entry=entry))
    return (family, mode, edits) if edits else None


def ablated_probabilities(loaded: LoadedModel, chunks: list[np.ndarray], rows: np.ndarray, target_ids: list[int],
                          mode: str, edits: list[AblationEdit], unembed: Unembedding, batch_size: int = 8,
                          progress: bool = False) -> np.ndarray:
    """(n_edits, n_tokens) float64: the model's P(target next) at `rows` with each edit hooked into the
    residual stream at its layer (ablate's own `edited`), one pass over the chunks per edit, stopped after
    the last block."""
    from tokenprobe.pipelines.ablate import edited

    out = np.empty((len(edits), len(rows)), dtype=np.float64)
    for k, edit in enumerate(edits):
        if progress:
            print(f"Running the model with the probe's direction {'removed' if mode == 'project' else 'at its mean'} "
                  f"at layer {edit.layer} ...", file=sys.stderr)
        with edited(loaded, edit.layer, edit.direction, mode, edit.value):
            acts, _ = extract_chunks(loaded, chunks, [loaded.num_layers], batch_size)
        out[k] = _target_probabilities(unembed, acts, rows, loaded.num_layers, target_ids)
    return out


def own_page_data(data: dict[str, Any], model_probabilities: np.ndarray | None, ablation: AblationView | None,
                  why: str | None) -> dict[str, Any]:
    """`data` with the model's own P(target next) (`own`), packed as float32: the clean pass's and, for each
    ablated layer, the edited pass's; or only `why` there is none."""
    out = dict(data)
    if model_probabilities is None:
        out["own"] = {"prob": None, "why": why} if why else None
        return json_safe(out)
    own: dict[str, Any] = {"encoding": FLOAT32_ENCODING, "prob": encode_float32(model_probabilities),
                           "ablation": None}
    if ablation is not None:
        def verdict(entry: dict[str, Any]) -> dict[str, Any]:
            log_ratio = (entry.get("probe") or {}).get("log_ratio") or {}
            return {"beyond_random": entry.get("beyond_random"), "direction_of_effect": entry.get("direction_of_effect"),
                    "log_ratio": _rounded({k: log_ratio.get(k) for k in ("mean", "low", "high")})}

        own["ablation"] = {
            "run": ablation.run.name, "family": ablation.family, "mode": ablation.mode,
            "layers": ablation.layers, "edit_value": [_rounded(e.value, 6) for e in ablation.edits],
            "verdict": [verdict(e.entry) for e in ablation.edits],
            "prob": [encode_float32(row) for row in ablation.probabilities],
        }
    out["own"] = own
    return json_safe(out)
