"""Contract tests of the seams, run on every implementation (in the style of scikit-learn's estimator checks):
Labeler, Probe (every registered family), ActivationSink / ActivationSource, Prepared, Placement, the vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenprobe.config import RunConfig
from tokenprobe.data.labels import OFFSET_TASKS, make_labeler
from tokenprobe.data.prepare import prepare, prepare_chunks
from tokenprobe.device import Placement
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.plan import Batch
from tokenprobe.extract.sinks import CheckpointSink, MemorySink
from tokenprobe.probes.base import FAMILIES, ModelIdentity, ProbeMeta, family, load_probe, read_probe_meta
from tokenprobe.vocabulary import ScorerKey, baseline_key, best_index, lens_key, probe_key

# ------------------------------------------------------------------------------------------- Labeler

LABELERS = [make_labeler(task, ids) for task in OFFSET_TASKS.values() for ids in ([7], [7, 9])]


@pytest.mark.parametrize("labeler", LABELERS, ids=lambda lab: f"{lab.spec}-{len(lab.target_ids)}")
def test_labeler_contract(labeler):
    chunks = np.random.default_rng(0).integers(0, 12, (6, 20))
    for has_bos in (True, False):
        labels, valid = labeler.labels(chunks, has_bos=has_bos)
        assert labels.shape == valid.shape == chunks.shape and labels.dtype == valid.dtype == bool
        assert not has_bos or not valid[:, 0].any()  # the BOS position is never used
        offset = 1 if labeler.predicts_next_token else 0
        targets = np.isin(chunks, labeler.target_ids)
        rows, cols = np.nonzero(valid)
        assert np.array_equal(labels[rows, cols], targets[rows, cols + offset])  # the token it asks about
    assert make_labeler(labeler.spec, labeler.target_ids) == labeler  # round-trips through the run record
    assert labeler.predicts_next_token == (labeler.spec == "next") and isinstance(labeler.question, str)


def test_unknown_task_is_an_error():
    with pytest.raises(TokenprobeError, match="unknown task"):
        make_labeler("sideways", [1])


# --------------------------------------------------------------------------------------------- Probe


def _problem(n=400, hidden=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g) * torch.linspace(0.5, 3, hidden) + 2
    y = (x[:, 0] - 0.5 * x[:, 3] + 0.3 * torch.randn(n, generator=g) > 0.5).float()
    return x, y


def _meta(kind: str, hidden: int) -> ProbeMeta:
    return ProbeMeta(kind=kind, layer=3, task="next", target=" the", target_ids=[7],
                     model=ModelIdentity("m", "/models/m", "w" * 64, "t" * 64, hidden), context_length=32,
                     dtype="float32", run_name="probe-layer3", tokenprobe_version="0", config={"seed": 0},
                     corpus={"name": "c", "sha256": "s"})


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_probe_contract(kind, tmp_path):
    x, y = _problem()
    cls = family(kind)
    probe = cls()
    assert probe.fit(x, y) is probe and probe.kind == kind
    proba = probe.predict_proba(x)
    assert proba.shape == (len(x),) and proba.dtype == torch.float32 and ((proba >= 0) & (proba <= 1)).all()
    torch.testing.assert_close(torch.sigmoid(probe.decision_function(x)), proba)
    assert torch.equal(probe.predict(x), proba >= 0.5)
    # it learned the (nearly) separable problem; the class-mean direction ignores the features' unequal
    # variances, so mean-diff's best threshold reaches only 0.85 here
    assert ((proba >= 0.5).float() == y).float().mean() > (0.8 if kind == "mean-diff" else 0.9)
    direction = probe.direction()
    if direction is not None:  # the logit moves along the direction: logit(x) - x . direction is a constant
        offset = probe.decision_function(x) - x @ direction
        torch.testing.assert_close(offset, offset[:1].expand_as(offset), rtol=0, atol=1e-3)
    probe.meta = _meta(kind, x.shape[1])
    path = tmp_path / "p.safetensors"
    probe.save(path)
    again = load_probe(path)  # through the registry, by the kind stored in the file
    assert type(again) is cls and again.meta == probe.meta == read_probe_meta(path)
    assert torch.equal(again.predict_proba(x), proba)

    class Other:
        source, weights_hash, tokenizer_hash, hidden_size = "/models/other", "w" * 64, "x" * 64, x.shape[1]

    with pytest.raises(TokenprobeError, match="another tokenizer"):
        again.check_compatible(Other)


def test_probe_meta_reads_format_version_1():
    """A version-1 file carried the whole run record under 'run'; its config and corpus still come through."""
    old = {"format": "tokenprobe.linear-probe", "format_version": 1, "layer": 2, "task": "next", "target": " the",
           "target_ids": [506], "model": "gemma-3-270m", "model_source": "gemma-3-270m", "weights_hash": "w",
           "tokenizer_hash": "t", "hidden_size": 640, "context_length": 256, "dtype": "float32",
           "run_name": "probe-layer2", "tokenprobe_version": "0.1.0", "l2": 0.01, "l2_method": "fixed",
           "metrics": {}, "run": {"config": {"seed": 4}, "corpus": {"name": "wiki", "sha256": "abc", "chunks": 9},
                                  "sweep_name": "sweep-x", "created": "2026-12-01"}}
    meta = ProbeMeta.from_dict(old)
    assert meta.kind == "linear" and meta.config == {"seed": 4} and meta.corpus == {"name": "wiki", "sha256": "abc"}
    assert meta.sweep_name == "sweep-x" and meta.fit == {"l2": 0.01, "l2_method": "fixed"}
    assert meta.model == ModelIdentity("gemma-3-270m", "gemma-3-270m", "w", "t", 640)


# ------------------------------------------------------------------------------------ sinks, sources


def _batches(hidden=4):
    g = torch.Generator().manual_seed(1)
    index = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]
    captured = [{1: torch.randn(len(i), hidden, generator=g), 3: torch.randn(len(i), hidden, generator=g)}
                for i in index]
    batches = [Batch(first=2 * k, size=2, chunks=np.array([k]), index=i, rows=np.zeros(len(i), int), length=8)
               for k, i in enumerate(index)]
    return batches, captured


@pytest.mark.parametrize("make", [lambda tmp: MemorySink([1, 3], 6, 4, torch.float32),
                                  lambda tmp: CheckpointSink(tmp / "ckpt")], ids=["memory", "checkpoint"])
def test_sink_contract(make, tmp_path):
    """Every sink takes each finished batch, good or bad (NaN/Inf), and gives back what it was given."""
    sink = make(tmp_path)
    batches, captured = _batches()
    for k, (batch, hidden) in enumerate(zip(batches, captured)):
        sink.write(batch, hidden, {3} if k == 1 else set())
    if isinstance(sink, MemorySink):  # also the source probes read from
        assert sink.keep.tolist() == [True, True, True, False, False, True]
        for layer in (1, 3):
            for k in (0, 2):
                assert torch.equal(sink.layer(layer)[batches[k].index], captured[k][layer])
    else:
        for k in (0, 2):
            got, nonfinite = sink.read(batches[k], [1, 3])
            assert not nonfinite and all(torch.equal(got[layer], captured[k][layer]) for layer in (1, 3))
        assert sink.read(batches[1], [1, 3])[1] == {3}
        other = batches[0]._replace(index=np.array([9, 9, 9]))
        assert sink.read(other, [1, 3]) is None  # a shard of other positions is never used


# ----------------------------------------------------------------------------- Prepared and placement


def test_prepare_is_one_data_path(tiny_model_dirs, corpus_file, cache_dir):
    """The same config gives the same chunks, split and positions, and viz's corpus sample sees that split."""
    from tokenprobe import load_model

    loaded = load_model(str(tiny_model_dirs["gpt2"]), "float32", "cpu", cache_dir)
    assert loaded.placement == Placement(torch.device("cpu"), torch.device("cpu"))
    config = RunConfig(model=str(tiny_model_dirs["gpt2"]), corpus=str(corpus_file), context_length=32,
                       train_positions=400, eval_positions=100, seed=5)
    a, b = prepare(config, loaded, cache_dir, progress=False), prepare(config, loaded, cache_dir, progress=False)
    assert np.array_equal(a.chunks, b.chunks) and np.array_equal(a.split.eval, b.split.eval)
    for field in ("chunk", "position", "label", "subset"):
        assert np.array_equal(getattr(a.positions, field), getattr(b.positions, field))
    assert a.labeler.spec == "next" and a.target.token_ids == tuple(loaded.tokenizer(" the")["input_ids"])
    chunks_only = prepare_chunks(config, loaded, cache_dir, progress=False)
    assert np.array_equal(chunks_only.split.eval, a.split.eval) and chunks_only.positions is None
    labels, valid = a.labeler.labels(a.chunks, has_bos=a.bos_id is not None)
    assert np.array_equal(labels, a.labels) and np.array_equal(valid, a.valid)
    assert a.labels[a.positions.chunk, a.positions.position].tolist() == a.positions.label.tolist()


# -------------------------------------------------------------------------------------- vocabulary


def test_scorer_keys_and_best_layer():
    assert [str(k) for k in (probe_key(3), lens_key(3), baseline_key("model"))] == ["probe/3", "logit_lens/3", "model"]
    assert [k.label for k in (probe_key(3), lens_key(3), baseline_key("model"))] == ["probe", "logit_lens", "model"]
    assert probe_key(3).layer == 3 and baseline_key("model").layer is None and probe_key(3) == ScorerKey("probe", 3)
    assert best_index([0.5, math.nan, 0.7, None, 0.7]) == 2  # the first of ties; missing values never win
    assert best_index([math.nan, None]) == 0 and best_index([]) == 0


# ------------------------------------------------------------------------------------------ layout

LAYERS = [{"errors", "files", "config", "vocabulary"}, {"device", "locks", "distributed"}, {"data"}, {"models"}, {"extract"},
          {"probes"}, {"analysis"}, {"report"}, {"viz"}, {"pipelines"}, {"cli", "__main__", "tokenprobe"}]


def test_packages_import_only_downward():
    """Module-level imports between rooms go down the stage order: no cycles, no reaching up."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "tokenprobe"
    rank = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}

    def room(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "tokenprobe"

    upward = []
    for path in src.rglob("*.py"):
        module = ".".join(path.relative_to(src.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenprobe."):
                if rank[room(node.module)] > rank[room(module)]:
                    upward.append(f"{module} -> {node.module}")
    assert not upward


def test_reading_files_needs_no_torch():
    """`tokenprobe inspect` and `tokenprobe report` read probe files and results.json without torch."""
    import subprocess
    import sys

    code = ("import sys, tokenprobe.cli, tokenprobe.probes.base, tokenprobe.report.markdown; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_a_probe_file_with_wrong_shapes_is_a_corrupt_file(kind, tmp_path):
    """Every family checks its tensors' shapes when loading: a mangled file fails there, in one line,
    not later inside predict_proba."""
    from safetensors.torch import save_file

    x, y = _problem()
    probe = family(kind)().fit(x, y)
    probe.meta = _meta(kind, x.shape[1])
    path = tmp_path / "p.safetensors"
    probe.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first_vector = next(k for k, t in sorted(tensors.items()) if t.dim() >= 1)
    tensors[first_vector] = torch.cat([tensors[first_vector], tensors[first_vector]], dim=-1)  # another width
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(TokenprobeError, match="corrupt probe file"):
        load_probe(path)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_family_fits_on_a_named_device_and_returns_cpu_tensors(kind):
    x, y = _problem()
    probe = family(kind)().fit(x, y, device="cpu", seed=1)
    assert all(t.device.type == "cpu" for t in probe.tensors().values())
