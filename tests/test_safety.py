"""Nothing runs code on load, nothing touches the network offline, nothing half-written is trusted,
and two runs never write one folder at once."""

from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe.data.chunks import _load_cached

from cli_helpers import FAST, assert_nothing_written, error_line, run_cli
from test_resume import shards, start_and_wait_for_batches

SRC = Path(__file__).parents[1] / "src" / "tokenprobe"


def train_args(model: Path, corpus: Path, out: Path, cache: Path, *extra: str) -> list:
    return ["train", "--model", model, "--corpus", corpus, "--out", out, "--cache-dir", cache, *FAST, *extra]


# ------------------------------------------------------------------------------------------- pickles


class _Bomb:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the pickle ran code')",))


@pytest.mark.parametrize("kind", ["raw-pickle.pth", "torch-save.pth", "disguised.safetensors"])
def test_pickle_bomb_probe_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned.txt"
    bomb = tmp_path / kind
    if kind.startswith("torch-save"):
        torch.save({"weight": _Bomb(marker)}, bomb)
    else:
        bomb.write_bytes(pickle.dumps(_Bomb(marker), protocol=4))

    for args in (["inspect", bomb], ["viz", bomb, "--text", "the cat", "--out", tmp_path / "p.html",
                                     "--cache-dir", tmp_path / "cache"]):
        line = error_line(run_cli(args))
        assert "is a pickle (torch.save / .pth format), not a tokenprobe probe" in line
        assert "never unpickles" in line
        assert not marker.exists(), "the pickle's code ran"

    # The bomb is live: plain unpickling does run it (so the refusal above is what saved us).
    if kind.startswith("torch-save"):
        loader = f"import torch; torch.load({str(bomb)!r}, weights_only=False)"
    else:
        loader = f"import pickle; pickle.load(open({str(bomb)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", loader], capture_output=True, cwd=Path(__file__).parent)
    assert marker.exists()


def test_no_unpickling_anywhere_in_the_package():
    """No pickle import, and every torch.load (if any) passes weights_only=True."""
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), path
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(getattr(node.func, "value", None), "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, path


# -------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("case", ["local-run", "hub-model", "hub-dataset"])
def test_offline_nothing_touches_the_network(tmp_path, tiny_model_dirs, corpus_file, case):
    record = tmp_path / "network.txt"
    model, corpus = tiny_model_dirs["llama"], corpus_file
    if case == "hub-model":
        model = "google/gemma-3-270m"
    if case == "hub-dataset":
        corpus = "wikitext"
    proc = run_cli(train_args(model, corpus, tmp_path / "run", tmp_path / "cache"), faults=True,
                   TP_FAULT_NO_NETWORK=str(record))
    assert not record.exists(), record.read_text()
    if case == "local-run":
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        line = error_line(proc)
        assert ("google/gemma-3-270m" if case == "hub-model" else "wikitext") in line
        assert_nothing_written(tmp_path / "run")


# ------------------------------------------------------------------------------------- atomic writes


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from tokenprobe import files

    target = tmp_path / "results.json"
    files.write_json(target, {"version": 1})

    def fail(fd):
        raise KeyboardInterrupt  # Ctrl-C between writing and renaming

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(target, {"version": 2, "big": list(range(10000))})
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_corrupted_chunk_cache_is_detected_and_rebuilt(tmp_path, tiny_model_dirs, corpus_file):
    model, cache = tiny_model_dirs["llama"], tmp_path / "cache"

    def run(name: str) -> dict:
        proc = run_cli(train_args(model, corpus_file, tmp_path / name, cache, "--layers", "2"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "results.json").read_text())

    first = run("first")
    (entry,) = cache.glob("chunks/*.safetensors")
    good = entry.read_bytes()
    good_chunks = _load_cached(entry)
    assert good_chunks is not None
    good_chunks = good_chunks.ids.copy()  # not a view of the file the test is about to cut short

    def rebuilt() -> bool:  # a valid entry again, holding the same chunks (header order may differ)
        chunks = _load_cached(entry)
        return chunks is not None and np.array_equal(chunks.ids, good_chunks)
    assert run("cached")["run"]["corpus"]["chunks_from_cache"] is True

    entry.write_bytes(good[: len(good) // 2])  # truncated
    truncated = run("after-truncation")
    assert truncated["run"]["corpus"]["chunks_from_cache"] is False
    assert rebuilt()

    edited = bytearray(good)
    last = int.from_bytes(good[-4:], "little")
    edited[-4:] = (last ^ 1).to_bytes(4, "little")  # a hand-edited token id; the header is intact
    entry.write_bytes(bytes(edited))
    after_edit = run("after-edit")
    assert after_edit["run"]["corpus"]["chunks_from_cache"] is False
    assert rebuilt()
    for later in (truncated, after_edit):
        assert [r["sets"] for r in later["layers"]] == [r["sets"] for r in first["layers"]]


# ---------------------------------------------------------------------------------------------- locks


def test_two_runs_on_one_out_dir_the_second_is_refused(tmp_path, tiny_model_dirs, corpus_file):
    model, out = tiny_model_dirs["llama"], tmp_path / "run"
    args = ["train", "--model", model, "--corpus", corpus_file, "--out", out, "--cache-dir", tmp_path / "cache-a",
            *FAST, "--batch-size", "4"]
    first = start_and_wait_for_batches(args, tmp_path / "cache-a", 1)
    try:
        second = run_cli(["train", "--model", model, "--corpus", corpus_file, "--out", out,
                          "--cache-dir", tmp_path / "cache-b", *FAST])
        line = error_line(second)
        assert f"another tokenprobe run (pid {first.pid}) is writing to --out {out}" in line
        assert "wait for it to finish or choose another --out" in line
        assert "Model " not in second.stderr  # refused before loading anything
        assert not shards(tmp_path / "cache-b")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)
    assert first.returncode == 130
    # The first run's lock died with it: the same command now runs to the end.
    third = run_cli(args[:])
    assert third.returncode == 0, third.stderr[-3000:]
    assert (out / "run.json").exists() and not (tmp_path / ".run.lock").exists()


def test_stale_lock_file_from_a_dead_run_does_not_block(tmp_path, tiny_model_dirs, corpus_file):
    out = tmp_path / "run"
    (tmp_path / ".run.lock").write_text("999999\n")  # left by a run that was killed
    proc = run_cli(train_args(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache", "--layers", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "run.json").exists() and not (tmp_path / ".run.lock").exists()


def test_lock_in_process(tmp_path):
    from tokenprobe.errors import TokenprobeError
    from tokenprobe.locks import RunLock

    with RunLock(tmp_path / "run") as held:
        assert held.path.read_text().strip() == str(os.getpid())
        with pytest.raises(TokenprobeError, match="another tokenprobe run"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / ".run.lock").exists()
    RunLock(tmp_path / "run").acquire().release()


# ------------------------------------------------------------------------------------------------ HTML


def test_viz_page_escapes_text_from_the_corpus_and_probe_metadata(tmp_path, tiny_model_dirs, corpus_file):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    proc = run_cli(train_args(tiny_model_dirs["llama"], corpus_file, run, tmp_path / "cache", "--layers", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    evil = '</script><script>window.pwned=1</script><img src=x onerror="alert(1)">'
    (probe,) = (run / "probes").glob("*.safetensors")
    with safe_open(str(probe), framework="pt") as f:
        meta = json.loads(f.metadata()["tokenprobe"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["run_name"] = evil
    save_file(tensors, str(probe), metadata={"tokenprobe": json.dumps(meta)})
    page = tmp_path / "page.html"
    proc = run_cli(["viz", run, "--text", f"The cat {evil} sat on the mat.", "--out", page,
                    "--cache-dir", tmp_path / "cache", "--device", "cpu", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = page.read_text(encoding="utf-8")
    assert "\\u003c" in html  # the text's '<' is on the page, escaped...
    assert "<script>window" not in html and "<img src=x" not in html  # ...but never as markup
    assert html.count("<script") == html.count("</script>")
