"""Interrupt a real `tokenprobe train` mid-extraction, run the same command again, and get the same run.

The interrupted process runs through tests/fault_cli.py with a short sleep before each batch, so the
signal lands while batches are being extracted (the test waits for finished batches on disk, not for
a time). The resumed run is the plain CLI with the same arguments; its probes and metrics are
compared with an uninterrupted run of the same command in a fresh cache.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import FAST, cli_env, command, run_cli

WAIT_LIMIT_S = 300  # a guard against a hung test, not a timing assertion


def resume_args(model: Path, corpus: Path, out: Path, cache: Path, quiet: bool = True) -> list:
    fast = [a for a in FAST if quiet or a != "--quiet"]
    return ["train", "--model", model, "--corpus", corpus, "--out", out, "--cache-dir", cache, *fast,
            "--layers", "all", "--batch-size", "4", "--seed", "3"]


def shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("extraction/*/bs*/batch*.safetensors"))


def start_and_wait_for_batches(args: list, cache: Path, n: int) -> subprocess.Popen:
    """Starts a slowed-down run and returns once `n` batches are on disk (the run still going)."""
    # SIGINT at its default in the child: a shell starts background jobs with it ignored, Python keeps
    # an inherited SIG_IGN (as `nohup tokenprobe train &` should), and the signal would then do nothing.
    proc = subprocess.Popen(command(args, faults=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(TP_FAULT_DELAY="0.3"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + WAIT_LIMIT_S
    while len(shards(cache)) < n:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before {n} batches were extracted:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no extracted batches appeared")
        time.sleep(0.1)
    return proc


def run_figures(out: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    results = json.loads((out / "results.json").read_text())
    metrics = {r["layer"]: r["sets"] for r in results["layers"]}
    probes = {p.name: load_file(str(p)) for p in sorted((out / "probes").glob("*.safetensors"))}
    return metrics, probes


def assert_same_run(resumed: Path, reference: Path) -> None:
    metrics, probes = run_figures(resumed)
    ref_metrics, ref_probes = run_figures(reference)
    assert metrics == ref_metrics  # every metric of every evaluation set, exactly
    assert probes.keys() == ref_probes.keys() and probes
    for name in probes:
        for key, tensor in probes[name].items():
            assert torch.equal(tensor, ref_probes[name][key]), (name, key)
    run, ref_run = (json.loads((d / "run.json").read_text()) for d in (resumed, reference))
    assert run["positions"] == ref_run["positions"]
    assert run["extraction"]["batches"] == ref_run["extraction"]["batches"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dirs, corpus_file) -> Path:
    """The uninterrupted run, in a cache of its own."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    proc = run_cli(resume_args(tiny_model_dirs["llama"], corpus_file, out, root / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["extraction"]["resumed_batches"] == 0
    assert not shards(root / "cache"), "the checkpoint must be deleted after a successful run"
    return out


def test_sigint_mid_extraction_then_same_command_resumes_to_the_same_run(tmp_path, tiny_model_dirs, corpus_file,
                                                                          reference):
    model, cache, out = tiny_model_dirs["llama"], tmp_path / "cache", tmp_path / "run"
    proc = start_and_wait_for_batches(resume_args(model, corpus_file, out, cache), cache, 5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=WAIT_LIMIT_S)

    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "finished batches are kept in" in stderr and "run the same command again to resume" in stderr
    assert stderr.rstrip().endswith("tokenprobe: interrupted")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    kept = len(shards(cache))
    total = json.loads((reference / "run.json").read_text())["extraction"]["batches"]
    assert 5 <= kept < total, (kept, total)

    resumed = run_cli(resume_args(model, corpus_file, out, cache, quiet=False))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming: {kept} batches were already extracted by an interrupted run" in resumed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["extraction"]["resumed_batches"] == kept
    # Only computed tokens count towards the rate; the resumed ones are recorded apart.
    ref_extraction = json.loads((reference / "run.json").read_text())["extraction"]
    assert record["extraction"]["resumed_tokens"] > 0 and ref_extraction["resumed_tokens"] == 0
    assert record["extraction"]["tokens"] + record["extraction"]["resumed_tokens"] == ref_extraction["tokens"]
    assert not shards(cache) and not list(cache.glob("extraction/*")), "checkpoint not cleaned up"
    assert_same_run(out, reference)


def test_kill_9_then_corrupted_batches_are_recomputed_and_the_run_is_the_same(tmp_path, tiny_model_dirs,
                                                                               corpus_file, reference):
    """SIGKILL gives no chance to clean up: what is on disk must still be trustworthy or detected."""
    model, cache, out = tiny_model_dirs["llama"], tmp_path / "cache", tmp_path / "run"
    proc = start_and_wait_for_batches(resume_args(model, corpus_file, out, cache), cache, 6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=WAIT_LIMIT_S)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()

    kept = shards(cache)
    # One shard cut short (a torn write that somehow got its final name), one hand-edited value.
    truncated, edited = kept[1], kept[3]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(edited.read_bytes())
    data[-8:] = b"\x00\x00\xc0\x7f" * 2  # two float32 NaNs in place of the last values
    edited.write_bytes(bytes(data))

    resumed = run_cli(resume_args(model, corpus_file, out, cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["extraction"]["resumed_batches"] == len(kept) - 2
    assert record["extraction"]["bad_batches"] == 0
    assert_same_run(out, reference)


def test_sigterm_is_an_interrupt_that_keeps_batches_and_releases_the_lock(tmp_path, tiny_model_dirs, corpus_file):
    model, cache, out = tiny_model_dirs["llama"], tmp_path / "cache", tmp_path / "run"
    proc = start_and_wait_for_batches(resume_args(model, corpus_file, out, cache), cache, 2)
    lock = tmp_path / ".run.lock"
    assert lock.exists() and lock.read_text().strip() == str(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT_LIMIT_S)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "run the same command again to resume" in stderr
    assert len(shards(cache)) >= 2 and not out.exists() and not lock.exists()
