"""Builds text corpora for `tokenprobe eval` from what is installed on this machine (no internet).

    python scripts/make_corpora.py OUT_DIR [--min-chars N]

writes, as JSONL (one ``{"text": ...}`` per document, each at least --min-chars long, without duplicates or
near-duplicates):

- ``python-docs.jsonl``: the topics of Python's own documentation (``pydoc_data.topics``, the text
  ``help()`` shows: the language reference's statements, operators and types): English technical prose
  with code, from the interpreter running this script;
- ``package-readmes.jsonl``: the long descriptions (README) of the installed Python packages, from each
  distribution's METADATA: Markdown/reStructuredText project documentation, install commands, examples;
- ``licenses.jsonl``: the license texts of the installed packages (their LICENSE/COPYING/NOTICE files)
  and of the system (/usr/share/common-licenses): legal English.

Each is printed with its documents and characters. The documents are in a fixed order (by package or topic
name), so a rerun on the same machine writes the same files. Generated corpora are not committed (the
repository's .gitignore lists ``/corpora/``, the suggested OUT_DIR); use one with
``tokenprobe eval RUN --corpus corpora/python-docs.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

MIN_CHARS = 500
NEAR_DUPLICATE = 0.8  # shared share of 8-word shingles above which two documents are one
LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice)([._-].*)?$", re.IGNORECASE)
SYSTEM_LICENSES = Path("/usr/share/common-licenses")


def _clean(text: str) -> str:
    """Line ends as \\n, no trailing spaces, at most one blank line in a row, no outer blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _key(text: str) -> str:
    """Documents equal up to whitespace and case count as one."""
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def _shingles(text: str, width: int = 8) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i:i + width]) for i in range(max(1, len(words) - width + 1))}


def unique(texts: Iterable[str], min_chars: int = MIN_CHARS, near: float = NEAR_DUPLICATE) -> list[str]:
    """The cleaned texts at least `min_chars` long, each once, in order: a text equal to an earlier one up
    to whitespace and case, or sharing more than `near` of its 8-word shingles with one (Jaccard: the same
    license with another copyright line, the same README in two packages), is left out."""
    seen: set[str] = set()
    kept: list[set[str]] = []
    out = []
    for text in texts:
        text = _clean(text)
        key = _key(text)
        if len(text) < min_chars or key in seen:
            continue
        seen.add(key)
        shingles = _shingles(text)
        if any(len(shingles & other) > near * len(shingles | other) for other in kept):
            continue
        kept.append(shingles)
        out.append(text)
    return out


def _distributions() -> list[metadata.Distribution]:
    """The installed distributions, each once (the first on sys.path), by normalised name."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", (dist.metadata.get("Name") or "")).lower()
        if name:
            found.setdefault(name, dist)
    return [found[name] for name in sorted(found)]


def python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def package_readmes() -> list[str]:
    texts = []
    for dist in _distributions():
        meta = dist.metadata
        body = meta.get_payload() if hasattr(meta, "get_payload") else None
        if not isinstance(body, str) or not body.strip():
            # Metadata 1.x keeps it in a header, continuation lines prefixed with 8 spaces and "|".
            body = re.sub(r"\n {7}\|", "\n", meta.get("Description") or "")
        if body.strip() and body.strip().upper() != "UNKNOWN":
            texts.append(body)
    return texts


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def licenses() -> list[str]:
    texts = []
    for dist in _distributions():
        for file in sorted(dist.files or [], key=str):
            if LICENSE_NAME.match(Path(str(file)).name):
                text = _read(Path(dist.locate_file(file)))
                if text:
                    texts.append(text)
    if SYSTEM_LICENSES.is_dir():
        for path in sorted(SYSTEM_LICENSES.iterdir()):
            if path.is_file() and not path.is_symlink():  # GPL -> GPL-3 and the like: the target is listed
                text = _read(path)
                if text:
                    texts.append(text)
    return texts


CORPORA = {"python-docs": python_docs, "package-readmes": package_readmes, "licenses": licenses}


def write_jsonl(path: Path, documents: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder for the .jsonl corpora")
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS,
                        help=f"shortest document kept, in characters (default: {MIN_CHARS})")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, source in CORPORA.items():
        documents = unique(source(), args.min_chars)
        if not documents:
            print(f"{name}: nothing found on this machine, not written", file=sys.stderr)
            continue
        path = args.out_dir / f"{name}.jsonl"
        write_jsonl(path, documents)
        print(f"{path}: {len(documents):,} documents, {sum(len(d) for d in documents):,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
