"""Probe families and the control task in a run: one extraction feeds every family, the primary
family's results are those of a linear-only run, and every family's files load through one interface."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, load_model, load_probe, load_probes, train
from tokenprobe.data.labels import ControlTask
from tokenprobe.viz.explore import visualize
from cli_helpers import FAST, assert_nothing_written, error_line, run_cli

FAMILIES = ["linear", "mlp", "mean-diff", "sparse"]


def _config(model_dir, corpus, **kw) -> RunConfig:
    base = dict(model=str(model_dir), corpus=str(corpus), layers="all", context_length=32, dtype="float32",
                device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300, max_iter=50)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def family_run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("families") / "run"
    config = _config(tiny_model_dirs["llama"], corpus_file, probe=",".join(FAMILIES), control=True, mdl=True)
    train(config, out_dir=out, cache_dir=session_cache, progress=False)
    return out


def test_every_family_at_every_layer_with_control_selectivity_and_mdl(family_run):
    results = json.loads((family_run / "results.json").read_text())
    fam = results["families"]
    assert fam["primary"] == "linear" and fam["families"] == FAMILIES
    assert [(r["layer"], r["family"]) for r in fam["layers"]] == [(l, f) for l in range(4) for f in FAMILIES]
    assert fam["control_task"]["rate"] == pytest.approx(0.5, abs=0.01)  # balanced training positions
    by_layer = {r["layer"]: r for r in results["layers"]}
    for row in fam["layers"]:
        assert row["n"] == by_layer[row["layer"]]["n"] and row["control"]["n"] == row["n"]  # the same positions
        sel = row["selectivity"]["balanced_accuracy"]
        assert sel["difference"] == pytest.approx(row["balanced_accuracy"] - row["control"]["balanced_accuracy"])
        assert sel["low"] <= sel["difference"] <= sel["high"]
        assert row["mdl"]["uniform_bits"] == pytest.approx(row["sets"]["train"]["n"])
        assert row["mdl"]["compression"] > 1  # the tiny model's states do carry the label
        if row["family"] == "linear":  # the primary family's figures are the run's own
            assert "minus_primary" not in row
            for key in ("balanced_accuracy", "auroc", "balanced_accuracy_low", "auroc_high", "tp", "fn"):
                assert row[key] == by_layer[row["layer"]][key], key
        else:
            gap = row["minus_primary"]["balanced_accuracy"]["difference"]
            linear = next(r for r in fam["layers"] if r["layer"] == row["layer"] and r["family"] == "linear")
            assert gap == pytest.approx(row["balanced_accuracy"] - linear["balanced_accuracy"])
    sparse = [r for r in fam["layers"] if r["family"] == "sparse"]
    assert all(0 < r["fit"]["kept"] <= 64 and len(r["fit"]["kept_dims"]) == min(50, r["fit"]["kept"]) for r in sparse)
    assert (family_run / "families.png").is_file() and (family_run / "families.csv").is_file()
    assert "## Probe families and the control task" in (family_run / "report.md").read_text()


def test_each_family_file_loads_through_one_interface(family_run):
    kinds = {}
    for path in sorted((family_run / "probes").glob("*.safetensors")):
        probe = load_probe(path)
        kinds.setdefault(probe.kind, []).append(probe.meta.layer)
        expected = "linear" if path.name.startswith("layer") else path.name.rsplit("-layer", 1)[0]
        assert probe.kind == expected and probe.meta.metrics["eval"]["n"] > 0
        assert probe.meta.run_name.startswith("probe-layer" if expected == "linear" else f"probe-{expected}-layer")
    assert kinds == {f: [0, 1, 2, 3] for f in FAMILIES}


def test_primary_probes_are_those_of_a_linear_only_run(family_run, tiny_model_dirs, corpus_file, session_cache,
                                                      tmp_path):
    """Extra families, the control task and MDL change nothing of the primary probes or their figures."""
    out = tmp_path / "linear-only"
    config = _config(tiny_model_dirs["llama"], corpus_file, control=False)
    train(config, out_dir=out, cache_dir=session_cache, progress=False)
    for layer in range(4):
        name = f"layer{layer:02d}.safetensors"
        a, b = load_probe(family_run / "probes" / name), load_probe(out / "probes" / name)
        for key, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[key]), (layer, key)
    ra = json.loads((family_run / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert "families" not in rb
    for x, y in zip(ra["layers"], rb["layers"]):
        assert {k: v for k, v in x.items() if k != "probe_file"} == {k: v for k, v in y.items() if k != "probe_file"}


def test_a_nonlinear_primary_family_and_the_explorer_per_family(family_run, tiny_model_dirs, session_cache):
    llama = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", session_cache)
    text = "The cat sat on the mat. The king walked to the market."
    default = visualize([family_run], text=text, loaded=llama, cache_dir=session_cache, write=False)
    mlp = visualize([family_run], text=text, loaded=llama, cache_dir=session_cache, write=False, family="mlp")
    assert default.data["family"] == "linear" and mlp.data["family"] == "mlp"
    pred = load_probes(family_run).predict(text, loaded=llama)
    for i, layer in enumerate(mlp.layers):
        np.testing.assert_array_equal(mlp.probabilities[i], pred.get(layer, kind="mlp"))
        np.testing.assert_array_equal(default.probabilities[i], pred.get(layer, kind="linear"))


def test_mlp_alone_is_the_primary_family(tiny_model_dirs, corpus_file, session_cache, tmp_path):
    config = _config(tiny_model_dirs["gpt2"], corpus_file, layers="1,3", probe="mlp", control=False)
    result = train(config, out_dir=tmp_path / "run", cache_dir=session_cache, progress=False)
    assert [type(p).__name__ for p in result.probes.values()] == ["MLPProbe", "MLPProbe"]
    assert all(r.l2 is None for r in result.layers)
    assert load_probe(tmp_path / "run" / "probes" / "layer03.safetensors").kind == "mlp"
    assert result.families is None  # one family, no control task, no MDL: the run's files as before


def test_control_labels_follow_the_current_token(family_run):
    """The run's control task relabels each position by its current token's type, at the recorded rate."""
    record = json.loads((family_run / "results.json").read_text())["families"]["control_task"]
    control = ControlTask(record["rate"], record["seed"])
    ids = np.arange(400)
    assert abs(control.labels_of(ids).mean() - record["rate"]) < 0.1


def test_unknown_family_is_an_error_before_the_model_loads(tmp_path):
    out = tmp_path / "run"
    line = error_line(run_cli(["train", "--model", tmp_path / "missing", "--probe", "linear,deep", "--out", out,
                               *FAST]))
    assert "--probe 'deep' is not a probe family" in line and "linear, mlp, mean-diff, sparse" in line
    assert_nothing_written(out)
