"""`tokenprobe ablate`: the edit removes exactly the direction's component, a zero edit changes nothing,
and a direction the model demonstrably reads (a planted one) has an effect no random direction has."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, load_model, load_probe, train
from tokenprobe.extract.capture import LayerCapture
from tokenprobe.models.surgery import find_final_norm
from tokenprobe.pipelines.ablate import AblateOptions, ablate, edit_hidden, edited, unit
from cli_helpers import error_line, run_cli


def _config(model_dir, corpus, **kw) -> RunConfig:
    base = dict(model=str(model_dir), corpus=str(corpus), layers="all", context_length=32, dtype="float32",
                device="cpu", max_tokens=20_000, train_positions=600, eval_positions=300, max_iter=50,
                bootstrap=0, control=False)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tiny_model_dirs, corpus_file, session_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "run"
    config = _config(tiny_model_dirs["llama"], corpus_file, probe="linear,mlp")
    loaded = load_model(config.model, "float32", "cpu", session_cache, progress=False)
    train(config, out_dir=out, loaded=loaded, cache_dir=session_cache, progress=False)
    return out, loaded


def test_the_edit_removes_the_component_exactly_and_a_zero_direction_changes_nothing():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16)
    d = unit(torch.randn(16))
    assert torch.allclose(edit_hidden(hidden, d, "project") @ d, torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(edit_hidden(hidden, d, "mean", 2.5) @ d, torch.full((3, 5), 2.5), atol=1e-5)
    rest = hidden - (hidden @ d)[..., None] * d  # everything orthogonal to d is kept
    assert torch.allclose(edit_hidden(hidden, d, "project"), rest, atol=1e-6)
    assert torch.equal(edit_hidden(hidden, unit(torch.zeros(16)), "project"), hidden)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_the_hooked_residual_has_no_component_along_the_direction(run, layer):
    _, loaded = run
    d = unit(torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(layer)))
    ids = torch.tensor([[2, 50, 61, 72, 83, 94, 105, 116]])
    rows, cols = torch.zeros(8, dtype=torch.long), torch.arange(8)
    with torch.inference_mode(), LayerCapture(loaded, [layer]) as capture:
        clean = capture.run(loaded.model, ids, rows, cols)[0][layer]
    with torch.inference_mode(), edited(loaded, layer, d, "project"), LayerCapture(loaded, [layer]) as capture:
        after = capture.run(loaded.model, ids, rows, cols)[0][layer]
    assert (clean @ d).abs().max() > 1e-3  # there was a component to remove
    assert torch.allclose(after @ d, torch.zeros(8), atol=1e-5)
    assert torch.allclose(after, clean - (clean @ d)[:, None] * d, atol=1e-5)


def test_ablating_the_zero_vector_changes_nothing(run, session_cache, monkeypatch):
    out, loaded = run
    from tokenprobe.probes.linear import LinearProbe

    monkeypatch.setattr(LinearProbe, "direction", lambda self: torch.zeros_like(self.weight))
    result = ablate(out, AblateOptions(layers="1", random=2, max_tokens=320, resamples=0), loaded=loaded,
                    cache_dir=session_cache, save=False, progress=False)
    probe = result.data["layers"][0]["probe"]
    assert probe["log_ratio"]["mean"] == 0.0 and probe["kl"]["mean"] == 0.0 and probe["top1_lost"]["mean"] in (0.0, None)


def test_a_planted_direction_is_used_and_random_ones_are_not(run, session_cache, tmp_path):
    """A tiny model made to read the target from one direction: its target logit at the last layer is
    (x / rms(x)) . (g * W_t), g the final norm's weight, and W_t (the target's unembedding row) is set to a
    large multiple of the normalised residual's mean difference between the positions where the target comes
    next and the others. The model then predicts the target through d = g * W_t; removing d from the residual
    sets its logit to 0, so P(target) falls where it comes next. Random unit directions barely move it."""
    import shutil

    source, _ = run
    out = tmp_path / "planted"
    shutil.copytree(source, out)
    config = json.loads((out / "run.json").read_text())["config"]
    loaded = load_model(config["model"], "float32", "cpu", session_cache, progress=False)  # a copy to change
    last = loaded.num_layers
    path = out / "probes" / f"layer{last:02d}.safetensors"
    probe = load_probe(path)
    target = probe.meta.target_ids[0]
    norm = find_final_norm(loaded.model)
    from tokenprobe.data.prepare import prepare_chunks

    prepared = prepare_chunks(RunConfig.from_dict(config), loaded, session_cache, progress=False)
    chunks = torch.from_numpy(prepared.chunks[np.sort(prepared.split.eval[:20])])
    follows = torch.zeros_like(chunks, dtype=torch.bool)
    follows[:, :-1] = chunks[:, 1:] == target
    rows, cols = torch.nonzero(torch.ones_like(chunks, dtype=torch.bool), as_tuple=True)
    with torch.inference_mode(), LayerCapture(loaded, [last]) as capture:
        states = norm(capture.run(loaded.model, chunks, rows, cols)[0][last]).float()
    y = follows[rows, cols]
    difference = states[y].mean(0) - states[~y].mean(0)
    head = loaded.model.get_output_embeddings().weight
    with torch.no_grad():
        head[target] = 8.0 * difference / difference.norm()
    d = head[target].detach().float() * norm.weight.detach().float()
    probe.weight, probe.scale = d.clone(), torch.ones_like(d)
    probe.save(path)
    result = ablate(out, AblateOptions(layers=str(last), random=8, max_tokens=640, steer=3.0), loaded=loaded,
                    cache_dir=session_cache, progress=False)
    entry = result.data["layers"][0]
    effect = entry["probe"]["log_ratio"]
    assert result.data["clean_log_probability"] > -3  # the changed model does predict the target
    assert effect["high"] < entry["random_band"]["min"]  # below every random direction, interval included
    assert entry["beyond_random"] and entry["direction_of_effect"] == "lowers"
    assert effect["mean"] < -1.0 and abs(entry["random_band"]["median"]) < 0.3
    assert entry["steer"]["log_ratio"]["mean"] > 0  # adding the direction raises P(target)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["layers"][0]["probe"]["log_ratio"]["mean"] == pytest.approx(effect["mean"])
    report = (out / "report.md").read_text()
    assert "## Does the model use the direction?" in report
    assert f"beyond every random direction at layer {last}" in report
    assert (out / "ablation.png").stat().st_size > 0
    # the report keeps the section when rebuilt
    assert run_cli(["report", out]).returncode == 0
    assert "## Does the model use the direction?" in (out / "report.md").read_text()


def test_ablate_refuses_what_it_cannot_measure(run, tmp_path):
    out, _ = run
    line = error_line(run_cli(["ablate", out, "--probe", "mlp"]))
    assert "has no single direction" in line
    line = error_line(run_cli(["ablate", out, "--layers", "7"]))
    assert "--layers 7" in line
    line = error_line(run_cli(["ablate", tmp_path]))
    assert "no run.json" in line


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
@pytest.mark.parametrize("layer", [1, 2, 4])
def test_a_pass_resumed_from_the_clean_residual_equals_a_full_pass(tiny_model_dirs, session_cache, arch, layer):
    """Edited passes start from the clean residual at their layer (the blocks below are not run): the
    same last-layer states as a full forward pass with the edit hooked in."""
    from tokenprobe.pipelines.ablate import Passes

    loaded = load_model(tiny_model_dirs[arch], "float32", "cpu", session_cache, progress=False)
    layer = min(layer, loaded.num_layers)
    chunks = np.random.default_rng(0).integers(3, 300, size=(5, 24))
    targets = np.array([[0, 3], [1, 7], [4, 23]])
    others = np.array([[2, 5], [3, 0], [3, 11]])
    d = unit(torch.randn(loaded.hidden_size, generator=torch.Generator().manual_seed(1)))
    fast, full = (Passes(loaded, chunks, targets, others, batch_size=2, resume=r) for r in (True, False))
    fast.run(), full.run()
    for mode, value in (("project", 0.0), ("mean", 0.7), ("steer", 3.0)):
        a = fast.run((layer, d, mode, value))
        b = full.run((layer, d, mode, value))
        torch.testing.assert_close(a.target, b.target, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.other, b.other, atol=1e-5, rtol=1e-5)
    assert list(loaded.layer_stack) == list(full.loaded.layer_stack)  # every block put back
    assert all(type(m).__name__ != "_Resume" for m in loaded.layer_stack)


def test_random_directions_stay_off_dimensions_of_huge_variance(run):
    """Residual streams have a few dimensions of huge variance; a direction drawn isotropic in the raw
    stream catches them, and removing it breaks the model whatever the target. Drawn in standardised
    coordinates (as probes are fitted), a random direction puts almost no weight there."""
    from tokenprobe.pipelines.ablate import Passes

    _, loaded = run
    passes = Passes(loaded, np.zeros((2, 4), dtype=np.int64), np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), 2)
    width = loaded.hidden_size
    states = torch.randn(2, 4, width, generator=torch.Generator().manual_seed(0))
    states[..., 3] *= 1000.0  # an outlier dimension
    states[..., 5] = 7.0  # a constant one
    passes.residual[1] = states
    scale = passes.standardising_scale(1)
    assert scale[5] == 0 and scale[3] < 0.01 * scale[0]
    r = unit(torch.randn(width, generator=torch.Generator().manual_seed(1)) * scale)
    raw = unit(torch.randn(width, generator=torch.Generator().manual_seed(1)))
    flat = states.reshape(-1, width)
    assert (flat @ r).std() < 0.1 * (flat @ raw).std()  # the removed component is small, not the outlier's
