"""`--batch-size auto`: parsed by the CLI, validated, and resolved to a concrete size that the run records."""

from __future__ import annotations

import argparse

import pytest

from tokenprobe import RunConfig, train
from tokenprobe.config import add_config_arguments, config_from_args
from tokenprobe.errors import TokenprobeError


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_cli_accepts_auto_and_integers():
    assert _parse("--batch-size", "auto").batch_size == "auto"
    assert _parse("--batch-size", "8").batch_size == 8
    assert _parse().batch_size == 16
    with pytest.raises(SystemExit):
        _parse("--batch-size", "big")


@pytest.mark.parametrize("bad", [0, -3, "huge"])
def test_validate_refuses_bad_batch_sizes(bad):
    with pytest.raises(TokenprobeError, match="--batch-size"):
        RunConfig(batch_size=bad).validate()


def test_auto_picks_a_size_and_records_it(tiny_model_dirs, corpus_file, session_cache, capsys):
    config = RunConfig(model=str(tiny_model_dirs["gemma3"]), corpus=str(corpus_file), batch_size="auto",
                       layers="0,1", max_tokens=4096, context_length=32, baselines=False, bootstrap=0)
    result = train(config, cache_dir=session_cache, save=False, progress=True)
    picked = result.record["extraction"]["batch_size"]
    assert isinstance(picked, int) and picked >= 1
    assert result.record["config"]["batch_size"] == "auto"
    assert f"--batch-size auto: {picked} (" in capsys.readouterr().err


def test_cpu_probe_times_doubling_sizes_within_its_budget_or_falls_back(tiny_model_dirs, monkeypatch):
    import numpy as np

    from tokenprobe.extract import batch_size as batching
    from tokenprobe.models.loading import load_model

    loaded = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu")
    chunks = np.random.default_rng(0).integers(3, 300, (64, 32))
    calls = []
    run = batching._run
    monkeypatch.setattr(batching, "_run", lambda loaded, capture, ids: calls.append(len(ids)) or run(loaded, capture, ids))
    # A long run: every size up to 64 fits the budget (3% of 100,000 chunks through 3 blocks, the
    # probe running 2 of them).
    size, why = batching.choose_batch_size(loaded, chunks, 100_000, [3])
    assert sorted(set(calls)) == [1, 2, 4, 8, 16, 32, 64] and len(calls) == 3 * 7  # a warm-up round, two timed
    assert size in {1, 2, 4, 8, 16, 32, 64} and "tokens/s by batch: 1:" in why and "64:" in why
    # A shorter run affords sizes up to 16 only, and says so.
    calls.clear()
    size, why = batching.choose_batch_size(loaded, chunks, 3_000, [3])
    assert max(calls) == 16 and size <= 16 and "larger batches not tried" in why
    # A run too short to repay a probe runs none and uses the default batch size.
    calls.clear()
    size, why = batching.choose_batch_size(loaded, chunks, 100, [3])
    assert calls == [] and size == 16 and "too short for a throughput probe" in why
