"""tokenprobe: train, evaluate and explore probes on the hidden states of causal language models."""

import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokenprobe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

from tokenprobe.config import RunConfig
from tokenprobe.errors import TokenprobeError

# The rest import torch and transformers (seconds): loaded on first use, so `tokenprobe --help` and
# `import tokenprobe.config` stay fast.
_LAZY = {
    "LoadedModel": "tokenprobe.models",
    "load_model": "tokenprobe.models",
    "LinearProbe": "tokenprobe.probes",
    "load_probe": "tokenprobe.probes",
    "RunResult": "tokenprobe.train",
    "train": "tokenprobe.train",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenprobe' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule tokenprobe.train binds it here; `tokenprobe.train` stays the function.
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "__version__",
    "LinearProbe",
    "LoadedModel",
    "RunConfig",
    "RunResult",
    "TokenprobeError",
    "load_model",
    "load_probe",
    "train",
]
