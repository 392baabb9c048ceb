"""Check that two tokenprobe run folders hold bit-identical results (e.g. before and after a refactor).

    python benchmarks/compare_runs.py RUN_A RUN_B [--limit N]

Compares three parts and prints one summary line for each:

- results.json  every leaf of both JSON trees, by type and exact value (floats must match bit for bit;
                1 and 1.0 differ). Keys ignored wherever they appear, because they vary between two
                runs of the same code: "timings", "created", "versions" (wall clock and environment),
                "tokens_per_second" (speed), "chunks_from_cache" (whether the tokenized corpus was
                already cached). Everything else, "probe_file" included, is compared.
- probes        probes/*.safetensors: the same file names, and in each file the same tensor names with
                the same dtype, shape and raw bytes. The metadata header (timestamps, versions) is not
                compared.
- results.csv   byte-identical, or else the same rows once parsed (line endings may differ).

``--ignore KEY`` ignores more keys (``--ignore fit --ignore activations`` compares a run with its refit).

Exit status: 0 when everything is identical, 1 when anything differs (the differences are listed,
up to --limit per part), 2 for bad arguments (not a run folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

IGNORED_KEYS = {"timings", "created", "versions", "tokens_per_second", "chunks_from_cache"}


def json_differences(a, b, path: str = "", ignored: set[str] = IGNORED_KEYS) -> tuple[int, list[str]]:
    """(number of leaves compared, list of differences) for two parsed JSON trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        count, diffs = 0, []
        for key in sorted(set(a) | set(b)):
            if key in ignored:
                continue
            where = f"{path}/{key}"
            if key not in a or key not in b:
                diffs.append(f"{where}: only in run {'A' if key in a else 'B'}")
                continue
            n, d = json_differences(a[key], b[key], where, ignored)
            count, diffs = count + n, diffs + d
        return count, diffs
    if isinstance(a, list) and isinstance(b, list):
        count, diffs = 0, []
        if len(a) != len(b):
            diffs.append(f"{path}: list length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            n, d = json_differences(x, y, f"{path}[{i}]", ignored)
            count, diffs = count + n, diffs + d
        return count, diffs
    # Leaves: type and repr together (repr of a float is exact; tells -0.0 from 0.0 and 1 from 1.0).
    same = type(a) is type(b) and repr(a) == repr(b)
    return 1, [] if same else [f"{path}: {a!r} != {b!r}"]


def compare_results_json(run_a: Path, run_b: Path, ignored: set[str] = IGNORED_KEYS) -> tuple[str, list[str]]:
    a = json.loads((run_a / "results.json").read_text())
    b = json.loads((run_b / "results.json").read_text())
    count, diffs = json_differences(a, b, ignored=ignored)
    return f"results.json: {count:,} values " + ("compared" if diffs else "identical"), diffs


def compare_probes(run_a: Path, run_b: Path, ignored: set[str] = IGNORED_KEYS) -> tuple[str, list[str]]:
    names_a = {p.name for p in (run_a / "probes").glob("*.safetensors")}
    names_b = {p.name for p in (run_b / "probes").glob("*.safetensors")}
    diffs = [f"probes/{n}: only in run {'A' if n in names_a else 'B'}" for n in sorted(names_a ^ names_b)]
    tensors = 0
    for name in sorted(names_a & names_b):
        ta, tb = load_file(run_a / "probes" / name), load_file(run_b / "probes" / name)
        diffs += [f"probes/{name}:{k}: only in run {'A' if k in ta else 'B'}" for k in sorted(ta.keys() ^ tb.keys())]
        for key in sorted(set(ta) & set(tb)):
            tensors += 1
            x, y = ta[key], tb[key]
            where = f"probes/{name}:{key}"
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{where}: {x.dtype}{list(x.shape)} != {y.dtype}{list(y.shape)}")
            elif x.tobytes() != y.tobytes():  # raw bytes: bit-for-bit, NaN payloads and -0.0 included
                changed = np.count_nonzero(x.reshape(-1) != y.reshape(-1))
                worst = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
                diffs.append(f"{where}: {changed} of {x.size} values differ, max |a-b| {worst:.3g}")
    summary = f"probes: {len(names_a & names_b)} files, {tensors} tensors "
    return summary + ("compared" if diffs else "bit-identical"), diffs


def compare_results_csv(run_a: Path, run_b: Path, ignored: set[str] = IGNORED_KEYS) -> tuple[str, list[str]]:
    raw_a, raw_b = (run_a / "results.csv").read_bytes(), (run_b / "results.csv").read_bytes()
    rows_a, rows_b = (list(csv.reader(raw.decode().splitlines())) for raw in (raw_a, raw_b))
    if raw_a == raw_b:
        return f"results.csv: {len(rows_a) - 1:,} rows, byte-identical", []
    header, diffs = rows_a[0] if rows_a else [], []
    if len(rows_a) != len(rows_b):
        diffs.append(f"{len(rows_a)} rows != {len(rows_b)} rows")
    for number, (x, y) in enumerate(zip(rows_a, rows_b), start=1):
        if x != y:  # the row's first fields (layer, set, scorer), then each differing column
            cells = [f"{name} {u!r} != {v!r}" for name, u, v in zip(header, x, y) if u != v]
            cells += [f"{len(x)} fields != {len(y)}"] if len(x) != len(y) else []
            diffs.append(f"row {number} ({','.join(x[:3])}): " + "; ".join(cells))
    return f"results.csv: {len(rows_a) - 1:,} rows, " + ("differ" if diffs else "row-identical (bytes differ)"), diffs


def compare(run_a: Path, run_b: Path, limit: int = 50, ignored: set[str] = IGNORED_KEYS) -> bool:
    """Prints one summary line per part (and up to `limit` differences); True when all are identical."""
    failed = False
    for part in (compare_results_json, compare_probes, compare_results_csv):
        try:
            summary, diffs = part(run_a, run_b, ignored)
        except (OSError, ValueError) as error:  # a missing or unreadable file is a difference too
            summary, diffs = f"{part.__name__[len('compare_'):]}: could not compare", [str(error)]
        print(summary + (f"; {len(diffs):,} difference(s):" if diffs else ""))
        shown = diffs if limit <= 0 else diffs[:limit]
        for line in shown:
            print(f"  {line}")
        if len(diffs) > len(shown):
            print(f"  ... and {len(diffs) - len(shown):,} more (--limit 0 lists all)")
        failed = failed or bool(diffs)
    return not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="first run folder")
    parser.add_argument("run_b", type=Path, help="second run folder")
    parser.add_argument("--limit", type=int, default=50, help="differences listed per part (0: all)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="also ignore this results.json key wherever it appears (repeatable), e.g. fit")
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / "results.json").is_file():
            parser.error(f"{run} is not a tokenprobe run folder (no results.json)")
    return 0 if compare(args.run_a, args.run_b, args.limit, IGNORED_KEYS | set(args.ignore)) else 1


if __name__ == "__main__":
    sys.exit(main())
