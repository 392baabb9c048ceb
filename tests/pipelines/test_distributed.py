"""Data-parallel extraction on torch.distributed: real `torchrun` runs (gloo, on the CPU) of a tiny model.

Each rank runs every Nth batch of the plan into the shared activation store and rank 0 fits, scores
and publishes: the run must equal the one-process run bit for bit, whatever the world size, and a
rank that dies or raises must stop the run with an error naming it, leaving a store a rerun with any
number of processes resumes from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import FAST, FAULT_CLI, assert_nothing_written, cli_env, command, error_line, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from compare_runs import IGNORED_KEYS, compare_probes, compare_results_csv, compare_results_json  # noqa: E402

# 23 batches of 8 chunks: split unevenly over 2 ranks (12 + 11) and over 3 (8 + 8 + 7).
ARGS = ["--layers", "all", "--seed", "1"]


def train_args(model: Path, corpus: Path, out: Path, cache: Path) -> list:
    return ["train", "--model", model, "--corpus", corpus, "--out", out, "--cache-dir", cache, *FAST, *ARGS]


def torchrun(n: int, args: list, faults: bool = False, timeout: float = 300, background: bool = False, **env: str):
    """`torchrun --standalone --nproc-per-node n` of the CLI (or of the fault injector)."""
    target = [str(FAULT_CLI)] if faults else ["-m", "tokenprobe"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *target,
           *map(str, args)]
    environment = cli_env(**env)
    environment.pop("OMP_NUM_THREADS")  # torchrun gives each rank 1 thread
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    return subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=timeout)


def one_process(args: list, faults: bool = False, **env: str) -> subprocess.CompletedProcess:
    # Rank 0 of a distributed run fits with one thread per core of its node, as one process does by default.
    from tokenprobe.pipelines.train import fit_threads

    return run_cli(args, faults=faults, OMP_NUM_THREADS=str(fit_threads()), **env)


def assert_same_run(a: Path, b: Path, resumed: bool = False) -> None:
    """results.json's every figure (not the distributed block, the timings, nor, after a resume, which batches
    were read back), every probe tensor bit for bit, and results.csv byte for byte."""
    ignored = IGNORED_KEYS | {"distributed"} | ({"resumed_batches", "resumed_tokens", "tokens"} if resumed else set())
    for compare in (compare_results_json, compare_probes, compare_results_csv):
        summary, diffs = compare(a, b, ignored)
        assert not diffs, (summary, diffs[:10])
        assert "identical" in summary, summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dirs, corpus_file) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("one-process")
    args = train_args(tiny_model_dirs["llama"], corpus_file, root / "run", root / "cache")
    proc = one_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", args


@pytest.mark.parametrize("world", [2, 3])
def test_several_processes_give_the_one_process_run_bit_for_bit(world, tmp_path, tiny_model_dirs, corpus_file,
                                                                 reference):
    out = tmp_path / "run"
    proc = torchrun(world, train_args(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert_same_run(reference[0], out)

    record = json.loads((out / "run.json").read_text())
    shared = record["distributed"]
    assert shared["world_size"] == world and shared["backend"] == "gloo"
    ranks = shared["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world))
    # Every batch ran exactly once, split by batch number: the shares differ by at most one batch.
    assert sum(r["batches"] for r in ranks) == record["extraction"]["batches"] == 23
    assert max(r["batches"] for r in ranks) - min(r["batches"] for r in ranks) <= 1
    assert sum(r["tokens"] for r in ranks) == record["extraction"]["tokens"]
    assert all(r["tokens_per_second"] > 0 and r["threads"] == 1 for r in ranks)
    # The other ranks' logs are in the run; only rank 0 printed the table.
    assert sorted(p.name for p in (out / "logs").iterdir()) == [f"rank{r}.log" for r in range(1, world)]
    assert "rank 1:" in (out / "logs" / "rank1.log").read_text()
    assert proc.stdout.count("run written to") == 1
    shares = " + ".join(str(r["batches"]) for r in ranks)
    assert f"The forward pass ran on {world} processes (gloo), {shares} batches" in (out / "report.md").read_text()
    assert not (out / "activations" / "ranks").exists()
    assert not (tmp_path / "cache" / "logs").exists()  # moved into the run


def test_two_nodes_through_torchruns_rendezvous(tmp_path, tiny_model_dirs, corpus_file, reference):
    """Two torchrun agents ("nodes", here on one machine) meeting at a c10d rendezvous, one rank each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache")
    environment = cli_env()
    environment.pop("OMP_NUM_THREADS")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                               "-m", "tokenprobe", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    assert_same_run(reference[0], out)
    shared = json.loads((out / "run.json").read_text())["distributed"]
    assert shared["world_size"] == 2 and shared["processes_per_node"] == 1
    assert sum("run written to" in o for o in outputs) == 1  # only the agent holding rank 0 printed the run


def test_accelerate_launch_runs_the_same(tmp_path, tiny_model_dirs, corpus_file, reference):
    out = tmp_path / "run"
    environment = cli_env()
    environment.pop("OMP_NUM_THREADS")
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    proc = subprocess.run([*launcher, "--multi_gpu",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "tokenprobe",
                           *map(str, train_args(tiny_model_dirs["llama"], corpus_file, out, tmp_path / "cache"))],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert_same_run(reference[0], out)
    assert json.loads((out / "run.json").read_text())["distributed"]["world_size"] == 2


def test_bad_batches_are_judged_over_every_ranks_share(tmp_path, tiny_model_dirs, corpus_file):
    """7 of rank 1's 11 batches NaN is 7 of the run's 23: skipped and counted, as one process does with the same
    batches poisoned (plan batches 3, 5, ..., 15), not an error for the rank whose share is mostly bad. (A rank whose
    first 4 batches are all bad stops the run early, as one process does when its first 4 are.)"""
    one = tmp_path / "one"
    proc = one_process(train_args(tiny_model_dirs["llama"], corpus_file, one, tmp_path / "cache-one"), faults=True,
                       TP_FAULT_NAN_BATCHES="3,5,7,9,11,13,15")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    proc = torchrun(2, train_args(tiny_model_dirs["llama"], corpus_file, two, tmp_path / "cache-two"), faults=True,
                    TP_FAULT_RANK="1", TP_FAULT_NAN_BATCHES="1,2,3,4,5,6,7")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "skipped 7 of 23 batches with NaN/Inf hidden states" in proc.stderr
    record = json.loads((two / "run.json").read_text())
    assert record["extraction"]["bad_batches"] == 7 and record["extraction"]["bad_layers"] == {"1": 7, "2": 7, "3": 7}
    assert_same_run(one, two)


def _wait_for(path_glob, root: Path, until: float, what: str) -> Path:
    while time.time() < until:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {what} in {root}")


def test_a_killed_rank_is_named_and_a_rerun_with_another_world_size_resumes(tmp_path, tiny_model_dirs, corpus_file,
                                                                             reference):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = train_args(tiny_model_dirs["llama"], corpus_file, out, cache)
    # Rank 1 is slowed down so it is still running when it is killed; rank 0 finishes its share and waits.
    proc = torchrun(2, args, faults=True, background=True, TP_FAULT_RANK="1", TP_FAULT_DELAY="0.4")
    until = time.time() + 120
    status = _wait_for("extraction/*/ranks/rank1.json", cache, until, "rank 1 status")
    store = status.parent.parent
    while len(list((store / "bs8").glob("batch*.safetensors"))) < 14 and time.time() < until:
        time.sleep(0.1)  # rank 0's 12 batches and at least two of rank 1's
    os.kill(json.loads(status.read_text())["pid"], signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("tokenprobe: error:")]
    assert len(errors) == 1 and "rank 1 (pid" in errors[0] and "died before finishing" in errors[0], output[-3000:]
    assert "run the same command again" in errors[0]
    assert_nothing_written(out)
    finished = len(list((store / "bs8").glob("batch*.safetensors")))
    assert 14 <= finished < 23

    # The same command in one process: the finished batches are read back, not recomputed.
    proc = one_process(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extraction = json.loads((out / "run.json").read_text())["extraction"]
    assert extraction["resumed_batches"] == finished and extraction["batches"] == 23
    assert_same_run(reference[0], out, resumed=True)


def test_a_one_process_run_interrupted_is_resumed_by_three(tmp_path, tiny_model_dirs, corpus_file, reference):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = train_args(tiny_model_dirs["llama"], corpus_file, out, cache)
    proc = subprocess.Popen(command(args, faults=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(TP_FAULT_DELAY="0.3"))
    store_shard = _wait_for("extraction/*/bs8/batch000040.safetensors", cache, time.time() + 120, "sixth batch")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    finished = len(list(store_shard.parent.glob("batch*.safetensors")))
    assert 6 <= finished < 23

    proc = torchrun(3, args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert record["extraction"]["resumed_batches"] == finished
    assert sum(r["resumed_batches"] for r in record["distributed"]["ranks"]) == finished
    assert_same_run(reference[0], out, resumed=True)


def test_a_rank_that_raises_stops_the_run_with_its_error(tmp_path, tiny_model_dirs, corpus_file):
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = torchrun(2, train_args(tiny_model_dirs["llama"], corpus_file, out, cache), faults=True,
                    TP_FAULT_RANK="1", TP_FAULT_CRASH="1", TP_FAULT_CRASH_AFTER="3")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tokenprobe: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "rank 1 (pid" in errors[0] and "ZeroDivisionError: injected crash" in errors[0]
    log = errors[0].split("its log: ")[1].split(";")[0]
    assert "injected crash" in Path(log).read_text()
    assert_nothing_written(out)
    # What rank 1 finished before it raised is kept for the rerun.
    shards = list(cache.glob("extraction/*/bs8/batch*.safetensors"))
    assert len(shards) >= 3


# ------------------------------------------------------------------------------- without a launcher


def test_batches_are_shared_by_number_each_exactly_once():
    from tokenprobe.distributed import World

    for size in range(1, 6):
        owners = [[rank for rank in range(size) if World(size=size, rank=rank).owns(k)] for k in range(37)]
        assert all(len(o) == 1 for o in owners)
        assert [o[0] for o in owners] == [k % size for k in range(37)]


def test_a_half_set_up_launch_is_a_clear_error(tmp_path, tiny_model_dirs, corpus_file):
    args = train_args(tiny_model_dirs["llama"], corpus_file, tmp_path / "run", tmp_path / "cache")
    proc = run_cli(args, WORLD_SIZE="2", RANK="0")
    assert "WORLD_SIZE is 2 but MASTER_ADDR, MASTER_PORT are not set" in error_line(proc)
    proc = run_cli(["scan", "--model", tiny_model_dirs["llama"], "--corpus", corpus_file], WORLD_SIZE="2")
    assert "only `train` splits its forward pass" in error_line(proc)
    proc = run_cli(args, WORLD_SIZE="2", RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1",
                   TOKENPROBE_RANK_TIMEOUT="soon")
    assert "TOKENPROBE_RANK_TIMEOUT='soon' is not a number" in error_line(proc)


def test_rank_zero_names_a_silent_rank_and_a_rank_it_cannot_see(tmp_path, monkeypatch):
    import numpy as np

    from tokenprobe.data.positions import PositionSet
    from tokenprobe.distributed import World
    from tokenprobe.errors import TokenprobeError
    from tokenprobe.extract.peers import Peers
    from tokenprobe.extract.plan import RunPlan

    monkeypatch.setenv("TOKENPROBE_RANK_TIMEOUT", "0.3")
    n = 40
    positions = PositionSet(chunk=np.arange(n), position=np.full(n, 3), label=np.zeros(n, dtype=bool),
                            subset=np.zeros(n, dtype=np.int8))
    plan = RunPlan.of(positions)
    rank0 = Peers(tmp_path, World(size=2, rank=0), plan, 4)
    with pytest.raises(TokenprobeError, match="rank 1's files are not in .* every node shares"):
        rank0.check_visible()
    # Rank 1 on another host wrote its status once and then fell silent.
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank1.json").write_text(json.dumps(
        {"rank": 1, "host": "elsewhere", "pid": 1, "status": "running", "beats": 7, "log": None}))
    rank0.check_visible()
    assert rank0.trouble() is None  # first seen now
    time.sleep(0.5)
    problem = rank0.trouble()
    assert problem is not None and "rank 1 (pid 1 on elsewhere) has not been heard from for 0.3 s" in problem
    # Its batches are rank 0's to wait for: every odd batch of 10, with their tokens.
    assert sorted(rank0.pending) == [4, 12, 20, 28, 36] and all(v == 16 for v in rank0.pending.values())
    with pytest.raises(TokenprobeError, match="rank 1 .* has not been heard from"):
        rank0.wait(lambda tokens: None)
