"""Loading a causal LM once (the bundled GGUF, a .gguf file, a local folder or a hub id) and naming
what was loaded."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprobe.config import DEFAULT_MODEL, slug
from tokenprobe.device import Placement, resolve_device, resolve_dtype, trim_heap
from tokenprobe.errors import TokenprobeError
from tokenprobe.files import default_cache_dir, file_sha256
from tokenprobe.models.identity import tokenizer_fingerprint, weights_fingerprint
from tokenprobe.models.ready_copy import default_gguf_path, gguf_ready_copy, load_ready_copy
from tokenprobe.models.surgery import find_layer_stack

log = logging.getLogger(__name__)


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
    placement: Placement  # where token ids go in, and where probes are fitted

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



HUB_TIMEOUT = 5.0  # seconds to wait for the hub before saying it cannot be reached


def _hub_unreachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hugging Face hub cannot be reached (one short request, no retries), or None if it can.

    huggingface_hub retries an unreachable host for about 50 s before giving up; this asks once."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{endpoint} did not answer within {timeout:.0f} s: {reason}"
    return None


def _hub_cached(source: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def _from_hub(source: str, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], Any], bool]:
    """A hub id: from the hub, or from the local hub cache when the hub cannot be reached. Fails within
    seconds, not after the hub client's minute of retries, when it is neither reachable nor cached."""
    unreachable = _hub_unreachable()
    if unreachable and not _hub_cached(source):
        raise TokenprobeError(
            f"cannot load model {source!r}: the Hugging Face hub cannot be reached ({unreachable}) and the "
            "model is not in the local hub cache; pass a local model folder (save_pretrained) or a .gguf file"
        )
    model, load_tokenizer = _from_pretrained(source, dtype, local_files_only=bool(unreachable))
    return model, load_tokenizer, bool(unreachable)


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool = False
                     ) -> tuple[nn.Module, Callable[[], Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
    except OSError as exc:
        raise TokenprobeError(
            f"cannot load model {source!r}: not a local model directory, and not a reachable Hugging Face "
            f"hub id ({str(exc).splitlines()[0]})"
        ) from exc
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenprobeError(f"{source!r} is not a causal language model transformers can load: {first}") from exc
    return model, lambda: tokenizer  # loaded already: its fingerprint is computed from it


def _hub_revision(source: str, cache_dir: Path, offline: bool = False) -> str:
    """A hub model's identity: the commit of the snapshot it was loaded from (its folder's name)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    config_path = cached_file(source, "config.json", local_files_only=offline)
    commit = extract_commit_hash(config_path, None) if config_path else None
    if commit:
        return f"hub:{source}@{commit}"
    return weights_fingerprint(Path(config_path).parent, cache_dir) if config_path else "unknown"


def load_model(
    source: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: Path | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Loads a model and tokenizer once; `source` is as for ``--model``.

    ``progress=False`` also silences transformers' own "Loading weights" bar (``--quiet``).
    """
    source = str(source)  # a pathlib.Path to a model folder or .gguf file is as good as its string
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
        ready = gguf_ready_copy(gguf_path, cache_dir, weights_hash)
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
        model, load_tokenizer, offline = _from_hub(source, dtype)
        weights_hash = _hub_revision(source, cache_dir, offline)
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
        placement=Placement.of_model(model),
    )
    loaded.layer_stack  # fail now, not mid-run, if the stack cannot be found
    trim_heap()  # what loading parsed and freed (the tokenizer's JSON: 180 MB for Gemma 3)
    log.info("loaded %s in %.1fs", source, time.perf_counter() - started)
    return loaded
