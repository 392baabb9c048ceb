"""What every probe is: the Probe protocol, its typed metadata (ProbeMeta), the registry of families
and the file format.

A probe file is safetensors: the probe's tensors, and in the header a JSON document (:class:`ProbeMeta`)
with everything needed to use it again: its family (``kind``), layer, task, target, the model's
identity (name, source, weights and tokenizer hashes, width), context length, dtype, metrics, the run
config, and where its run record is (``../run.json`` beside the ``probes/`` folder). Loading never
unpickles, and reading the metadata needs neither torch nor transformers (``tokenprobe inspect``).

Files of format version 1 (``tokenprobe.linear-probe``, which carried a copy of the whole run
record under ``run``) are still read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from safetensors import SafetensorError, safe_open

from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes, dumps_json

FORMAT = "tokenprobe.probe"
FORMAT_VERSION = 2
LEGACY_FORMATS = {"tokenprobe.linear-probe": "linear"}  # format version 1 -> its family
METADATA_KEY = "tokenprobe"
RUN_RECORD = "../run.json"  # a run's probe files sit in <run>/probes/

# The registry: a family's kind, as stored in its files, -> the class that loads it ("module:Class").
# Import paths, so that reading metadata imports no family (and no torch).
FAMILIES = {
    "linear": "tokenprobe.probes.linear:LinearProbe",
    "mean-diff": "tokenprobe.probes.mean_diff:MeanDiffProbe",
    "sparse": "tokenprobe.probes.sparse:SparseProbe",
    "mlp": "tokenprobe.probes.mlp:MLPProbe",
}


@dataclass(frozen=True)
class ModelIdentity:
    """The model a probe was trained on; a probe refuses any model whose identity differs."""

    name: str
    source: str
    weights_hash: str
    tokenizer_hash: str
    hidden_size: int

    @classmethod
    def of(cls, loaded) -> ModelIdentity:
        return cls(loaded.name, loaded.source, loaded.weights_hash, loaded.tokenizer_hash, loaded.hidden_size)

    def check(self, loaded) -> None:
        """Refuses a model or tokenizer other than this one."""
        if self.tokenizer_hash and self.tokenizer_hash != loaded.tokenizer_hash:
            raise TokenprobeError(
                f"probe was trained with another tokenizer (model {self.name}, tokenizer "
                f"{self.tokenizer_hash[:12]}) than {loaded.source!r} has (tokenizer {loaded.tokenizer_hash[:12]}); "
                "use the model named in the probe file"
            )
        if self.weights_hash and self.weights_hash != loaded.weights_hash:
            raise TokenprobeError(
                f"probe was trained on model {self.name} (weights {self.weights_hash[:12]}), not on "
                f"{loaded.source!r} (weights {loaded.weights_hash[:12]}); use the model named in the probe file"
            )
        if self.hidden_size and self.hidden_size != loaded.hidden_size:
            raise TokenprobeError(
                f"probe expects hidden size {self.hidden_size}, model {loaded.source!r} has {loaded.hidden_size}"
            )


@dataclass
class ProbeMeta:
    """Everything a probe file says about its probe. Flat in the file (``to_dict``), typed here."""

    kind: str
    layer: int
    task: str
    target: str
    target_ids: list[int]
    model: ModelIdentity
    context_length: int
    dtype: str
    run_name: str
    tokenprobe_version: str
    fit: dict[str, Any] = field(default_factory=dict)  # how it was fitted, e.g. l2, l2_method, l2_path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # set -> BinaryMetrics.to_dict()
    config: dict[str, Any] = field(default_factory=dict)  # the run's RunConfig
    corpus: dict[str, Any] = field(default_factory=dict)  # name and sha256 of the training corpus
    sweep_name: str | None = None
    created: str | None = None
    run_record: str | None = RUN_RECORD  # the run record, relative to the probe file

    @property
    def bos(self) -> str:
        """The run's --bos (auto, always, never), or ``legacy`` for a probe saved before --bos existed:
        its chunks started with the tokenizer's BOS wherever the tokenizer has one."""
        from tokenprobe.config import LEGACY_BOS

        return (self.config or {}).get("bos", LEGACY_BOS)

    def to_dict(self) -> dict[str, Any]:
        """The flat form stored in the file (and shown by ``inspect --json``)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "fit")}
        identity = self.model
        out.update({"model": identity.name, "model_source": identity.source, "weights_hash": identity.weights_hash,
                    "tokenizer_hash": identity.tokenizer_hash, "hidden_size": identity.hidden_size, **self.fit})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeMeta:
        """From a file's header: this format, or version 1 (whole run record under ``run``)."""
        run = data.get("run") or {}
        names = {f.name for f in dataclasses.fields(cls)} - {"model", "fit"}
        values = {k: data[k] for k in names if k in data}
        values.setdefault("kind", LEGACY_FORMATS.get(data.get("format"), "linear"))
        values.setdefault("config", run.get("config", {}))
        values.setdefault("corpus", {k: v for k, v in (run.get("corpus") or {}).items() if k in ("name", "sha256")})
        values.setdefault("sweep_name", run.get("sweep_name"))
        values.setdefault("created", run.get("created"))
        model = ModelIdentity(name=data.get("model", ""), source=data.get("model_source", ""),
                              weights_hash=data.get("weights_hash", ""), tokenizer_hash=data.get("tokenizer_hash", ""),
                              hidden_size=int(data.get("hidden_size") or 0))
        # Everything else in the header is how the probe was fitted (l2 for linear, l1 and the kept
        # dimensions for sparse, width and epochs for mlp, ...), flat as to_dict wrote it.
        fit = {k: v for k, v in data.items() if k not in names | _NOT_FIT}
        return cls(model=model, fit=fit, **values)


_NOT_FIT = {"format", "format_version", "run", "model", "model_source", "weights_hash", "tokenizer_hash",
            "hidden_size"}


class Probe(Protocol):
    """A probe of one layer: scores raw hidden states (each probe carries its own input scaling)."""

    kind: str  # the family, as stored in its files
    meta: ProbeMeta | None

    def decision_function(self, hidden): ...  # (..., hidden) -> (...) float32 logits

    def predict_proba(self, hidden): ...  # (..., hidden) -> (...) float32 probabilities

    def predict(self, hidden, threshold: float = 0.5): ...

    def direction(self): ...  # (hidden,) in the residual stream's coordinates, or None

    def tensors(self) -> dict[str, Any]: ...  # what the file stores

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], meta: ProbeMeta): ...


class ProbeBase:
    """What every family shares beyond its tensors and its logits: its layer and flat metadata,
    probabilities and decisions from `decision_function`, saving, and the model check."""

    meta: ProbeMeta | None
    fit_info: dict[str, Any]

    @property
    def layer(self) -> int | None:
        return self.meta.layer if self.meta else None

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's metadata as a flat dict (``metadata["layer"]``, ``metadata["metrics"]``, ...)."""
        return self.meta.to_dict() if self.meta else dict(self.fit_info)

    def predict_proba(self, hidden, out=None):
        """Probability that the label is positive, float32, shape (...); `out`: see `decision_function`."""
        import torch

        return torch.sigmoid(self.decision_function(hidden, out))

    def predict(self, hidden, threshold: float = 0.5):
        return self.predict_proba(hidden) >= threshold

    def save(self, path) -> None:
        save_probe(self, path)

    def check_compatible(self, loaded) -> None:
        """Refuses a model or tokenizer other than the one this probe was trained on."""
        if self.meta is not None:
            self.meta.model.check(loaded)


def probe_header(probe: Probe) -> dict[str, str]:
    """The safetensors metadata of a probe file."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **(probe.meta.to_dict() if probe.meta else {}),
              "kind": probe.kind}
    return {METADATA_KEY: dumps_json(header)}


def save_probe(probe: Probe, path: Path) -> None:
    """Writes a probe file atomically (safetensors: no code runs when it is loaded)."""
    from safetensors.torch import save  # torch: only where tensors are written

    atomic_write_bytes(Path(path), save(probe.tensors(), metadata=probe_header(probe)))


def read_header(path: Path) -> dict[str, Any]:
    """A probe file's metadata as stored, checked for format; reads no tensor and imports no torch."""
    path = Path(path)
    if not path.is_file():
        raise TokenprobeError(f"probe file not found: {path}")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise TokenprobeError(f"{path} is not a readable probe file (corrupt, or not safetensors): {exc}") from exc
    if raw is None:
        raise TokenprobeError(f"{path} is a safetensors file but not a tokenprobe probe (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenprobeError(f"{path} has corrupt probe metadata: {exc.msg}") from exc
    if meta.get("format") != FORMAT and meta.get("format") not in LEGACY_FORMATS:
        raise TokenprobeError(f"{path} is not a tokenprobe probe (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise TokenprobeError(
            f"{path} was written by a newer tokenprobe ({meta.get('tokenprobe_version')}, probe format "
            f"{meta['format_version']}); upgrade tokenprobe to read it"
        )
    return meta


def read_probe_meta(path: Path) -> ProbeMeta:
    return ProbeMeta.from_dict(read_header(path))


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


def family(kind: str) -> type:
    """The class of a probe family, from the registry."""
    if kind not in FAMILIES:
        raise TokenprobeError(f"unknown probe family {kind!r} (known: {', '.join(FAMILIES)}); upgrade tokenprobe")
    module, name = FAMILIES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def probe_files(sources: list[str | Path]) -> list[Path]:
    """Expands run folders (their ``probes/*.safetensors``) and probe files into a list of files."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted((path / "probes").glob("*.safetensors")) or sorted(path.glob("*.safetensors"))
            if not found:
                raise TokenprobeError(
                    f"{path} holds no probe files (looked in {path / 'probes'} and {path}); "
                    "pass a run folder written by `tokenprobe train` or .safetensors probe files"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise TokenprobeError(f"{path} is neither a run folder nor a probe file")
    return files


def check_shapes(tensors: dict[str, Any], vectors: tuple[str, ...], scalars: tuple[str, ...] = (),
                 width: int = 0) -> None:
    """A probe file's tensors have the shapes its family needs: `vectors` all (width,) (the model's
    width, where the metadata gives one), `scalars` (); a ValueError otherwise (load_probe reports it
    as a corrupt file)."""
    missing = [k for k in (*vectors, *scalars) if k not in tensors]
    if missing:
        raise ValueError(f"missing tensor {missing[0]!r}")
    shapes = {tuple(tensors[k].shape) for k in vectors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"tensors {', '.join(vectors)} must be vectors of one width, got "
                         f"{', '.join(f'{k} {tuple(tensors[k].shape)}' for k in vectors)}")
    if width and next(iter(shapes)) != (width,):
        raise ValueError(f"tensors {', '.join(vectors)} have width {next(iter(shapes))[0]}, the model {width}")
    bad = [k for k in scalars if tuple(tensors[k].shape) != ()]
    if bad:
        raise ValueError(f"tensor {bad[0]!r} must be a scalar, got shape {tuple(tensors[bad[0]].shape)}")


def load_probe(path: Path) -> Probe:
    """Loads a probe file of any family, with its metadata (safetensors: no code runs on load)."""
    meta = read_probe_meta(path)
    cls = family(meta.kind)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_tensors(tensors, meta)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise TokenprobeError(f"{path} is a corrupt probe file: {exc}") from exc


def check_fits(probe: Probe, loaded) -> None:
    """Refuses a model the probe was not trained on (tokenizer, weights, width) or lacking its layer."""
    meta = probe.meta
    layer = meta.layer if meta else None
    try:
        if meta is not None:
            meta.model.check(loaded)
        direction = probe.direction()
        width = direction.shape[-1] if direction is not None else (meta.model.hidden_size if meta else 0)
        if width and width != loaded.hidden_size:
            raise TokenprobeError(
                f"probe has width {width}, model {loaded.source!r} has {loaded.hidden_size}; "
                "use the model named in the probe file"
            )
    except TokenprobeError as exc:
        raise TokenprobeError(f"layer {layer} probe does not fit: {exc}") from None
    if layer is None or not 0 <= layer <= loaded.num_layers:
        raise TokenprobeError(
            f"layer {layer} probe does not fit: {loaded.source!r} has layers 0 to {loaded.num_layers}"
        )
