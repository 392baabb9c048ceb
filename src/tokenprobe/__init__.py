"""tokenprobe: train, evaluate and explore probes on the hidden states of causal language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokenprobe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

from tokenprobe.config import RunConfig
from tokenprobe.errors import TokenprobeError

# The rest import torch and transformers (seconds): loaded on first use, so `tokenprobe --help`,
# `tokenprobe inspect` and `import tokenprobe.config` stay fast.
_LAZY = {
    "LoadedModel": "tokenprobe.models.loading",
    "load_model": "tokenprobe.models.loading",
    "LinearProbe": "tokenprobe.probes.linear",
    "load_probe": "tokenprobe.probes.base",
    "load_probes": "tokenprobe.pipelines.apply",
    "activations": "tokenprobe.pipelines.apply",
    "Activations": "tokenprobe.pipelines.apply",
    "Prediction": "tokenprobe.pipelines.apply",
    "ProbeSet": "tokenprobe.pipelines.apply",
    "RunResult": "tokenprobe.pipelines.train",
    "train": "tokenprobe.pipelines.train",
    "scan": "tokenprobe.pipelines.scan",
    "ScanOptions": "tokenprobe.pipelines.scan",
    "evaluate_run": "tokenprobe.pipelines.evaluate",
    "ablate": "tokenprobe.pipelines.ablate",
    "AblateOptions": "tokenprobe.pipelines.ablate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenprobe' has no attribute {name!r}")


__all__ = [
    "__version__",
    "AblateOptions",
    "Activations",
    "LinearProbe",
    "LoadedModel",
    "Prediction",
    "ProbeSet",
    "RunConfig",
    "RunResult",
    "ScanOptions",
    "TokenprobeError",
    "ablate",
    "activations",
    "evaluate_run",
    "load_model",
    "load_probe",
    "load_probes",
    "scan",
    "train",
]
