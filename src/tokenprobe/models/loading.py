"""Loading a causal LM once (the bundled GGUF, a .gguf file, a local folder or a hub id) and naming
what was loaded.

Every source ends in transformers' ``from_pretrained`` on safetensors (a GGUF file through its ready
copy, see ready_copy.py), which reads each tensor on its own from memory-mapped files. So a model can
be built from a config cut to its first blocks and never read the others (``blocks=``), placed over
devices (``device_map=``) or quantised (``load_in=``) by the same call; its identity (weights hash,
depth) stays the whole model's.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import importlib.util
import json
import logging
import os
import shutil
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
from tokenprobe.models.ready_copy import default_gguf_path, gguf_ready_copy, ready_tokenizer, ready_weights
from tokenprobe.models.surgery import find_layer_stack

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model loaded once and passed to everything that needs it.

    The tokenizer is loaded on first use of `tokenizer`: a run whose chunks and target come from the
    cache never needs it (Gemma 3's takes 1.3 s to load), so its forward pass starts that much sooner.

    A model may hold only its first blocks (``load_model(blocks=K)``: a run that probes no deeper
    needs no more): `num_layers` is always the full model's depth (layer N is the output of its last
    block), `loaded_blocks` how many blocks are here, and `load_note` why.
    """

    model: nn.Module
    load_tokenizer: Callable[[], Any]  # returns the tokenizer; called once, on first use of `tokenizer`
    name: str  # short display name, used in run names
    source: str  # what the user passed (hub id, directory or file)
    weights_hash: str  # sha256 of the weights (GGUF file or weight files), or a hub revision: the full model's
    tokenizer_hash: str
    dtype: torch.dtype
    placement: Placement  # where token ids go in, and where probes are fitted
    total_layers: int | None = None  # the full model's number of blocks, where fewer were loaded
    load_note: str | None = None  # what was loaded and why, where it was not the whole model

    @cached_property
    def tokenizer(self) -> Any:
        return self.load_tokenizer()

    @property
    def layer_stack(self) -> nn.ModuleList:
        return find_layer_stack(self.model)

    @property
    def num_layers(self) -> int:
        """The full model's number of decoder blocks (its last layer), loaded or not."""
        return self.total_layers or len(self.layer_stack)

    @property
    def loaded_blocks(self) -> int:
        """How many decoder blocks are loaded: the deepest layer this model can give is this one."""
        return len(self.layer_stack)

    @property
    def partial(self) -> bool:
        return self.loaded_blocks < self.num_layers

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


def _from_hub(source: str, dtype: torch.dtype, shape: _Shape) -> tuple[nn.Module, Callable[[], Any], bool]:
    """A hub id: from the hub, or from the local hub cache when the hub cannot be reached. Fails within
    seconds, not after the hub client's minute of retries, when it is neither reachable nor cached."""
    unreachable = _hub_unreachable()
    if unreachable and not _hub_cached(source):
        raise TokenprobeError(
            f"cannot load model {source!r}: the Hugging Face hub cannot be reached ({unreachable}) and the "
            "model is not in the local hub cache; pass a local model folder (save_pretrained) or a .gguf file"
        )
    model, load_tokenizer = _from_pretrained(source, dtype, shape, local_files_only=bool(unreachable))
    return model, load_tokenizer, bool(unreachable)


def _from_pretrained(source: str, dtype: torch.dtype, shape: _Shape, local_files_only: bool = False
                     ) -> tuple[nn.Module, Callable[[], Any]]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = shape.load(source, dtype, local_files_only=local_files_only)
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


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(
    source: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    blocks: int | Callable[[int], int | None] | None = None,
    device_map: str | dict | Path | None = None,
    load_in: str | None = None,
) -> LoadedModel:
    """Loads a model and tokenizer once; `source` is as for ``--model``.

    ``progress=False`` also silences transformers' own "Loading weights" bar (``--quiet``).

    `blocks`: load only the embedding and the first `blocks` decoder blocks (with the final norm and the
    unembedding, which the logit lens needs); the deeper blocks are never read. A callable gets the full
    model's number of blocks (read from its config before any weight) and returns how many to load, or
    None for all of them. `device_map`: as transformers' (``auto``, ``balanced``, ``sequential``, a
    dict or a JSON file of one), placing the blocks over GPUs, the CPU and disk. `load_in`: ``8bit`` or
    ``4bit`` weights with bitsandbytes (a GPU is needed).
    """
    source = str(source)  # a pathlib.Path to a model folder or .gguf file is as good as its string
    shape = _Shape(blocks=blocks, device_map=read_device_map(device_map), load_in=load_in, progress=progress)
    if progress:
        return _load_model(source, dtype, device, cache_dir, shape)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load_model(source, dtype, device, cache_dir, shape)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def read_device_map(spec: str | dict | Path | None) -> str | dict | None:
    """``--device-map`` as transformers takes it: a strategy name as it is, a JSON file as its dict."""
    if spec is None or isinstance(spec, dict) or str(spec) in DEVICE_MAP_NAMES:
        return spec
    path = Path(spec)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TokenprobeError(f"--device-map {spec}: not one of {', '.join(DEVICE_MAP_NAMES)}, nor a readable JSON "
                              f"file ({_first_line(exc)})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TokenprobeError(f"--device-map {spec}: the JSON file must hold one object mapping module names to "
                              'devices, e.g. {"model.embed_tokens": 0, "model.layers.0": 0, "": "cpu"}')
    return value


def check_load_in(load_in: str | None) -> None:
    """A one-line error, before anything is loaded, where ``--load-in`` cannot work here."""
    if load_in is None:
        return
    if load_in not in ("8bit", "4bit"):
        raise TokenprobeError(f"--load-in must be 8bit or 4bit, got {load_in!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TokenprobeError(f"--load-in {load_in} needs the bitsandbytes package: pip install bitsandbytes "
                              "(and a CUDA GPU)")
    if not torch.cuda.is_available():
        raise TokenprobeError(f"--load-in {load_in} needs a CUDA GPU (bitsandbytes quantises on the GPU) and none "
                              "is available; drop --load-in, or use --dtype bfloat16 to halve the memory")


def truncated_config(config, blocks: int):
    """A copy of `config` describing only its first `blocks` decoder blocks: ``num_hidden_layers`` and
    every per-layer list (``layer_types`` and the like: lists as long as the stack) cut to `blocks`."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    full = int(text.num_hidden_layers)
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == full and not key.startswith("_"):
            setattr(text, key, type(value)(value[:blocks]))
    text.num_hidden_layers = blocks
    return config


@dataclass
class _Shape:
    """How a model is loaded: all of it or its first blocks, where (device_map), in what (bitsandbytes)."""

    blocks: int | Callable[[int], int | None] | None = None
    device_map: str | dict | None = None
    load_in: str | None = None
    progress: bool = True
    total: int | None = None  # set by `load`: the full model's depth, where fewer blocks were loaded
    offload: Path | None = None  # where a device_map's "disk" share goes

    def load(self, folder: str | Path, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
        """`AutoModelForCausalLM.from_pretrained(folder)` in this shape. With fewer blocks the model is built
        from a config cut to them, so transformers never reads the deeper blocks' tensors (it reads
        each tensor on its own, from memory-mapped safetensors, and skips those no module wants)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        options: dict[str, Any] = dict(kwargs)
        if self.blocks is not None:
            try:
                config = AutoConfig.from_pretrained(folder, **kwargs)
                full = int(config.get_text_config().num_hidden_layers)
            except Exception:  # noqa: BLE001 - not a config we can read: from_pretrained says why below
                config, full = None, 0
            wanted = (self.blocks(full) if callable(self.blocks) else self.blocks) if full else None
            if wanted is not None and 1 <= wanted < full:
                options["config"] = truncated_config(config, wanted)
                self.total = full
        if self.device_map is not None:
            options["device_map"] = self.device_map
            if self.offload is not None:
                options["offload_folder"] = str(self.offload)
        if self.load_in is not None:
            from transformers import BitsAndBytesConfig

            options["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if self.load_in == "8bit" else
                                              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
            options.setdefault("device_map", {"": torch.cuda.current_device()})
        if self.total is None:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options)
        with _unexpected_keys_unreported():  # the deeper blocks' tensors, left unread on purpose
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options)

    @property
    def placed(self) -> bool:
        """Whether transformers placed the model itself (then it is not moved to one device after)."""
        return self.device_map is not None or self.load_in is not None


@contextlib.contextmanager
def _unexpected_keys_unreported():
    """transformers' load report, silenced where it lists only unexpected keys (a model cut to its first
    blocks leaves the others in the checkpoint); missing or mismatched keys are still reported."""
    def keep(record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "LOAD REPORT" not in text or any(word in text for word in ("MISSING", "MISMATCH", "CONVERSION"))

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _load_model(source: str, dtype: str | torch.dtype, device: str | torch.device, cache_dir: Path | None,
                shape: _Shape) -> LoadedModel:
    check_load_in(shape.load_in)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    device = resolve_device(device) if isinstance(device, str) else device
    if shape.placed and device.type == "cpu" and torch.cuda.is_available():
        device = torch.device("cuda")  # the dtype that suits where most of the model will run
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    if shape.device_map is not None:  # a "disk" share is read from the weight files, or written here
        shape.offload = cache_dir / "offload" / f"{os.getpid()}"
        atexit.register(shutil.rmtree, shape.offload, ignore_errors=True)
    started = time.perf_counter()
    tokenizer_hash = None

    if source == DEFAULT_MODEL or source.endswith(".gguf"):
        gguf_path = default_gguf_path(cache_dir) if source == DEFAULT_MODEL else Path(source)
        if not gguf_path.is_file():
            raise TokenprobeError(f"GGUF file not found: {gguf_path}")
        weights_hash = file_sha256(gguf_path, cache_dir)
        ready = gguf_ready_copy(gguf_path, cache_dir, weights_hash, dtype, progress=shape.progress)
        load_tokenizer, tokenizer_hash = ready_tokenizer(ready)
        model = shape.load(ready_weights(ready, dtype, gguf_path), dtype)
        name = source if source == DEFAULT_MODEL else slug(gguf_path.name)
    elif Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise TokenprobeError(
                f"--model {source!r} is a folder without config.json, so not a saved transformers model; pass a "
                "model folder (save_pretrained), a .gguf file, or a Hugging Face hub id"
            )
        model, load_tokenizer = _from_pretrained(source, dtype, shape)
        weights_hash = weights_fingerprint(Path(source), cache_dir)
        name = slug(str(Path(source).resolve()))
    elif Path(source).exists() or source.startswith((".", "/", "~")):
        raise TokenprobeError(
            f"--model {source!r} is not a model directory or a .gguf file; pass a directory with config.json, "
            "a .gguf file, or a Hugging Face hub id"
        )
    else:
        model, load_tokenizer, offline = _from_hub(source, dtype, shape)
        weights_hash = _hub_revision(source, cache_dir, offline)
        name = slug(source)

    if getattr(model.config, "is_encoder_decoder", False):
        raise TokenprobeError(f"{source!r} is an encoder-decoder model; tokenprobe probes decoder-only causal LMs")
    model.eval()
    model.requires_grad_(False)
    if not shape.placed:
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
        total_layers=shape.total,
    )
    loaded.layer_stack  # fail now, not mid-run, if the stack cannot be found
    if loaded.partial:
        loaded.load_note = (f"the embedding and blocks 0-{loaded.loaded_blocks - 1} of {loaded.num_layers}, with the "
                            "final norm and the unembedding; the deeper blocks were not loaded")
    trim_heap()  # what loading parsed and freed (the tokenizer's JSON: 180 MB for Gemma 3)
    log.info("loaded %s in %.1fs", source, time.perf_counter() - started)
    return loaded


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
