"""Writing files so that an interrupted write never leaves something a later run would trust."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``$TOKENPROBE_CACHE``, else ``$XDG_CACHE_HOME/tokenprobe``, else ``~/.cache/tokenprobe``."""
    if os.environ.get("TOKENPROBE_CACHE"):
        return Path(os.environ["TOKENPROBE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tokenprobe"


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Writes to a temporary file beside `path`, then renames it over `path`.

    The file gets the permissions any file the user creates gets (0666 less the umask), not the
    0600 of a temporary file, so collaborators on a shared disk can read a run. `durable` also
    flushes the data to disk before the rename (so it survives a power cut, not just a killed
    process); files that carry a checksum and are rebuilt when damaged can skip that.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """Replaces NaN and infinities with None (JSON null) and numpy scalars with Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps_json(value: Any) -> str:
    """Strict JSON: NaN becomes null, and a stray NaN raises instead of writing invalid JSON."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, dumps_json(value).encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of a file's content, remembered per (path, size, mtime) so large files hash once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = (cache_dir or default_cache_dir()) / "file-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    try:
        atomic_write_bytes(index_path, json.dumps(index).encode())
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return index[key]
