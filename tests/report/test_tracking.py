"""`--wandb` without credentials: offline WandB runs in the run folder, read back with WandB's own protobuf."""

from __future__ import annotations

import struct

import pytest

from tokenprobe import RunConfig, train
from tokenprobe.config import run_name, sweep_name
from tokenprobe.report.tracking import choose_mode

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def read_wandb_records(path):
    """Records of a .wandb file: a 7-byte ':W&B' header, then LevelDB-log blocks of 32 KiB holding
    serialized `wandb_internal_pb2.Record` messages (FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        piece = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture()
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def test_mode_is_offline_without_credentials(no_wandb_credentials, monkeypatch):
    assert choose_mode()[0] == "offline" and "no WandB credentials" in choose_mode()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert choose_mode() == ("online", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_mode() == ("disabled", None)


def test_wandb_offline_run_has_group_names_and_metrics(no_wandb_credentials, tiny_model_dirs, corpus_file,
                                                       tmp_path, capsys):
    config = RunConfig(model=str(tiny_model_dirs["llama"]), corpus=str(corpus_file), layers="0,2", context_length=32,
                       train_positions=600, eval_positions=300, dtype="float32", device="cpu", bootstrap=100,
                       wandb=True, wandb_project="tokenprobe-test")
    result = train(config, out_dir=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    err = capsys.readouterr().err
    assert "offline" in err and "wandb sync" in err
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one WandB run per layer
    group = sweep_name(config, "llama")
    seen = {}
    for path in files:
        records = read_wandb_records(path)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                for item in r.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = item.value_json
        config_items = {item.key: item.value_json for item in run.config.update}
        assert run.run_group == group and run.project == "tokenprobe-test"
        layer = int(config_items["layer"])
        seen[layer] = run.display_name
        assert config_items["task"] == '"next"' and config_items["context_length"] == "32"
        layer_result = next(r for r in result.layers if r.layer == layer)
        assert float(summary["balanced_accuracy"]) == pytest.approx(layer_result.primary.balanced_accuracy)
        for key in ("tp", "fp", "tn", "fn"):
            assert int(summary[key]) == getattr(layer_result.primary, key)
        for key in ("auroc", "auroc_low", "auroc_high", "balanced_accuracy_low", "auroc_fraction_of_model",
                    "baseline/model/auroc", "baseline/token_stats/balanced_accuracy", "baseline/majority/auroc",
                    "baseline/logit_lens/auroc", "eval_natural/balanced_accuracy"):
            assert key in summary, key
    assert seen == {0: run_name(config, 0, "llama"), 2: run_name(config, 2, "llama")}
