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
