"""The run folder: its name, the lock that keeps one run per folder, the staging folder a run is
assembled in, and publishing it in one move, so an interrupted run leaves nothing half-written."""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenprobe.config import RunConfig, sweep_name
from tokenprobe.errors import TokenprobeError
from tokenprobe.locks import RunLock

RUN_RECORD = "run.json"


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuses a folder holding another run (unless overwrite) or anything that is not a run."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise TokenprobeError(f"--out {out_dir} exists and is not a folder; choose another --out")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / RUN_RECORD).exists():
        raise TokenprobeError(f"--out {out_dir} is a non-empty folder that is not a tokenprobe run; choose another --out")
    if not overwrite:
        raise TokenprobeError(f"--out {out_dir} holds another run; pass --overwrite to replace it, or choose another --out")


def default_out_dir(config: RunConfig, model_name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{sweep_name(config, model_name)}-{stamp}"


class RunDir:
    """One run's folder: locked from before the model loads (when the folder is known) until published."""

    def __init__(self, out_dir: Path | None, overwrite: bool):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.overwrite = overwrite
        self.lock: RunLock | None = None
        if self.out_dir is not None:
            check_out_dir(self.out_dir, overwrite)
            # Held until the run is published; released by the kernel if the process dies first.
            self.lock = RunLock(self.out_dir).acquire()

    def publish(self, default: Path, write: Callable[[Path], None]) -> Path:
        """Writes the run into a staging folder with `write(staging)`, then moves it into place (at
        `default` when no folder was given), replacing an old run only at the last moment."""
        out_dir = self.out_dir or default
        check_out_dir(out_dir, self.overwrite)
        if self.lock is None:
            self.lock = RunLock(out_dir).acquire()
        try:
            with _staging(out_dir) as staging:
                write(staging)
                _replace(staging, out_dir)
        except OSError as exc:
            raise TokenprobeError(f"cannot write the run to {out_dir}: {exc.strerror or exc}") from exc
        finally:
            self.release()
        return out_dir

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, out_dir: Path) -> None:
    """Moves a finished staging folder into place, replacing an old run only at the last moment."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
