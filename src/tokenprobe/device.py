"""Hardware facts in one place: native bfloat16, dtype and device choice, free memory, placement.

Placement names two devices apart, because they differ once a model is spread over devices
(``device_map``) or ranks: the *input* device, where token ids go (the embedding's), and the *probe*
device, where probes are fitted and scored. Hooks never assume either is where a layer runs: each
layer's hidden states are indexed on their own device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenprobe.errors import TokenprobeError


def cpu_has_native_bfloat16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (where bfloat16 matmuls run natively)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bfloat16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 products are cheaper than float32 ones here (a CPU with native bfloat16)."""
    return device.type == "cpu" and cpu_has_native_bfloat16()


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (MemAvailable), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return None


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


def release_memory(device: torch.device) -> None:
    """Hands freed working memory back: the CUDA cache, or on the CPU the free pages glibc keeps."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_heap()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA and CPU allocation failures, whatever type torch gives them."""
    if isinstance(exc, (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass(frozen=True)
class Placement:
    """Where token ids enter the model, and where probes are fitted and scored."""

    input: torch.device
    probes: torch.device

    @classmethod
    def of_model(cls, model: nn.Module) -> Placement:
        """The embedding's device takes the input; probes go to the first accelerator holding a
        parameter, else the CPU (a model split over devices keeps its probes in one place)."""
        embedding = model.get_input_embeddings()
        input_device = _execution_device(embedding) if embedding is not None else next(model.parameters()).device
        devices = {p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}
        probes = min(devices, key=lambda d: (d.type, d.index or 0)) if devices else torch.device("cpu")
        return cls(input=input_device, probes=probes)


def _execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its parameters' device, or, for weights a ``device_map`` offloaded (kept on
    the meta device and brought in by an Accelerate hook at each call), the hook's execution device."""
    device = next(module.parameters()).device
    if device.type != "meta":
        return device
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is None:
        return torch.device("cpu")
    return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
