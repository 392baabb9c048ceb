"""The real `tokenprobe` command line, with faults injected from environment variables (tests only).

Run as ``python tests/fault_cli.py train ...``; everything after the script name goes to
``tokenprobe.cli.main`` unchanged. The faults hook the first decoder block of the loaded model, so
each forward pass of a batch counts as one call:

TP_FAULT_DELAY=S           sleep S seconds before each batch (so a signal lands mid-extraction)
TP_FAULT_NAN_BATCHES=1,3   make the first block's output NaN on those calls (0-based); "all" for every one
TP_FAULT_OOM_ABOVE=N       fail with an out-of-memory error on any batch of more than N chunks
TP_FAULT_OOM_KIND=K        cuda (torch.OutOfMemoryError, the default) or cpu (the allocator's RuntimeError)
TP_FAULT_CRASH=1           raise an unexpected ZeroDivisionError in the first batch
TP_FAULT_NO_NETWORK=FILE   any internet connection or name lookup is written to FILE and fails
TP_FAULT_RANK=R            under torchrun: the model faults above hit only the process of that RANK
TP_FAULT_CRASH_AFTER=N     with TP_FAULT_CRASH: raise on the call after N good ones instead of the first
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch


def _block_network(record: str) -> None:
    def refuse(what: str):
        with open(record, "a") as f:
            f.write(what + "\n")
        raise OSError(f"network blocked by the test: {what}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(f"connect {address}")
        return real_connect(self, address)

    socket.socket.connect = connect
    socket.getaddrinfo = lambda host, *a, **k: refuse(f"getaddrinfo {host}")
    socket.gethostbyname = lambda host: refuse(f"gethostbyname {host}")


def _install_model_faults() -> None:
    import importlib

    train_module = importlib.import_module("tokenprobe.pipelines.train")  # the package exports a function of that name

    delay = float(os.environ.get("TP_FAULT_DELAY", "0") or 0)
    nan_spec = os.environ.get("TP_FAULT_NAN_BATCHES", "")
    nan_batches = None if nan_spec == "all" else {int(x) for x in nan_spec.split(",") if x}
    oom_above = int(os.environ.get("TP_FAULT_OOM_ABOVE", "0") or 0)
    oom_kind = os.environ.get("TP_FAULT_OOM_KIND", "cuda")
    crash = os.environ.get("TP_FAULT_CRASH") == "1"
    crash_after = int(os.environ.get("TP_FAULT_CRASH_AFTER", "0") or 0)
    if os.environ.get("TP_FAULT_RANK", "") not in ("", os.environ.get("RANK", "0")):
        return  # another rank's faults
    real_load_model = train_module.load_model
    calls = {"n": -1}

    def pre_hook(module, args, kwargs):
        calls["n"] += 1
        hidden = args[0] if args else kwargs["hidden_states"]
        if crash and calls["n"] >= crash_after:
            raise ZeroDivisionError("injected crash")
        if oom_above and hidden.shape[0] > oom_above:
            if oom_kind == "cpu":
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 68719476736 bytes. Error code 12")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if delay:
            time.sleep(delay)

    def hook(module, args, output):
        if nan_spec and (nan_batches is None or calls["n"] in nan_batches):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.fill_(float("nan"))
        return output

    def load_model(*args, **kwargs):
        loaded = real_load_model(*args, **kwargs)
        block = loaded.layer_stack[0]
        block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        block.register_forward_hook(hook)
        return loaded

    train_module.load_model = load_model


if __name__ == "__main__":
    if os.environ.get("TP_FAULT_NO_NETWORK"):
        _block_network(os.environ["TP_FAULT_NO_NETWORK"])
    _install_model_faults()
    from tokenprobe.cli import main

    sys.exit(main(sys.argv[1:]))
