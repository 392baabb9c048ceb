"""tokenprobe: train, evaluate and explore probes on the hidden states of causal language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokenprobe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

from tokenprobe.config import RunConfig
from tokenprobe.errors import TokenprobeError
from tokenprobe.models import LoadedModel, load_model
from tokenprobe.probes import LinearProbe, load_probe
from tokenprobe.train import RunResult, train

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
