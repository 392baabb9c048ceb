"""One run at a time per output folder: an advisory lock beside the folder.

The lock is ``fcntl.flock`` on ``.<name>.lock`` next to ``--out`` (the folder itself only appears
when the run is published). The kernel drops a flock when its process dies, however it dies, so a
lock can never go stale; the pid written into the file only serves the error message. Taking the
lock also proves, before any expensive work, that the folder's parent is writable.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tokenprobe.errors import TokenprobeError

try:
    import fcntl
except ImportError:  # Windows: no flock; O_EXCL below still refuses a second run
    fcntl = None


def lock_path_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def check_writable(out_dir: Path) -> None:
    """Refuses an --out whose nearest existing ancestor cannot hold new files."""
    ancestor = out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TokenprobeError(f"--out {out_dir} is not writable: {ancestor} is a file, not a folder; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TokenprobeError(f"--out {out_dir} is not writable: no write permission in {ancestor}; choose another --out")


class RunLock:
    """Held from before the model is loaded until the run is published (or the process ends)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = lock_path_for(self.out_dir)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        check_writable(self.out_dir)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                if not self._lock(fd):
                    os.close(fd)
                    raise TokenprobeError(
                        f"another tokenprobe run{self._holder()} is writing to --out {self.out_dir}; wait for it to "
                        f"finish or choose another --out (lock file {self.path})"
                    )
                # The previous holder may have unlinked the file between our open and our lock.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
        except OSError as exc:
            raise TokenprobeError(
                f"--out {self.out_dir} is not writable: cannot create {self.path.name} in {self.path.parent} "
                f"({exc.strerror or exc}); choose another --out"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _lock(self, fd: int) -> bool:
        if fcntl is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        return True

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so nobody locks a dead file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
