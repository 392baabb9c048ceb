"""Loading only what is probed (``load_model(blocks=K)``), ``--baselines`` subsets, and ``device_map``.

A model loaded with its first K blocks must give exactly the activations of the whole model at layers
0..K, report the whole model's depth and identity, and hold no deeper block; `train` loads only the
blocks a run needs and says so in the run record. A model split by a ``device_map`` between the CPU
and disk (Accelerate offload: no GPU here) must give the activations of the unsplit one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenprobe import RunConfig, train
from tokenprobe.data.positions import SUBSETS, PositionSet
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.extract import extract_positions
from tokenprobe.models.loading import load_model, truncated_config
from tokenprobe.models.surgery import find_final_norm

FAST = dict(context_length=32, batch_size=8, train_positions=600, eval_positions=300, dtype="float32",
            device="cpu", bootstrap=0, control=False)


def _positions(n_chunks: int, length: int) -> PositionSet:
    chunk, position = np.meshgrid(np.arange(n_chunks), np.arange(length), indexing="ij")
    n = chunk.size
    return PositionSet(chunk=chunk.ravel(), position=position.ravel(), label=np.zeros(n, bool),
                       subset=np.full(n, SUBSETS.index("train"), np.int8))


def _activations(loaded, layers: list[int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chunks = torch.randint(3, 390, (4, 20), generator=generator).numpy()
    acts, stats = extract_positions(loaded, chunks, _positions(4, 20), layers, batch_size=2, progress=False)
    assert stats.bad_batches == 0
    return acts.values


@pytest.fixture(scope="module")
def full_models(tiny_model_dirs):
    return {arch: load_model(str(folder), "float32", "cpu") for arch, folder in tiny_model_dirs.items()}


@pytest.mark.parametrize("arch", ["gemma3", "llama", "gpt2", "qwen2"])
def test_first_blocks_give_the_whole_models_activations(arch, tiny_model_dirs, full_models):
    full = full_models[arch]
    n = full.num_layers
    for blocks in range(1, n):
        part = load_model(str(tiny_model_dirs[arch]), "float32", "cpu", blocks=blocks)
        assert part.num_layers == n and part.loaded_blocks == blocks and part.partial
        assert len(part.layer_stack) == blocks
        assert part.weights_hash == full.weights_hash and part.tokenizer_hash == full.tokenizer_hash
        assert part.load_note and f"blocks 0-{blocks - 1} of {n}" in part.load_note
        layers = list(range(blocks + 1))
        assert torch.equal(_activations(part, layers), _activations(full, layers)), f"{arch}, {blocks} blocks"
        # the deeper blocks are not there at all: fewer parameters, none of a deeper block
        names = [name for name, _ in part.model.named_parameters()]
        assert not any(f"layers.{blocks}." in name or f".h.{blocks}." in name for name in names)
        assert sum(p.numel() for p in part.model.parameters()) < sum(p.numel() for p in full.model.parameters())
        # the final norm and the unembedding (the logit lens needs them) are the whole model's
        assert torch.equal(part.model.get_output_embeddings().weight, full.model.get_output_embeddings().weight)
        norm, full_norm = find_final_norm(part.model), find_final_norm(full.model)
        assert all(torch.equal(a, b) for a, b in zip(norm.parameters(), full_norm.parameters()))


def test_blocks_callable_and_whole_model(tiny_model_dirs):
    seen = []
    whole = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", blocks=lambda n: seen.append(n) or None)
    assert seen == [3] and not whole.partial and whole.loaded_blocks == whole.num_layers == 3
    assert whole.load_note is None
    assert not load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", blocks=3).partial  # K >= depth: all


def test_truncated_config_cuts_every_per_layer_list(tiny_model_dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dirs["gemma3"])
    assert len(config.layer_types) == 4
    cut = truncated_config(config, 2)
    assert cut.num_hidden_layers == 2 and cut.layer_types == config.layer_types[:2]
    assert config.num_hidden_layers == 4 and len(config.layer_types) == 4  # the original is untouched


def test_a_layer_beyond_the_loaded_blocks_is_refused(tiny_model_dirs, corpus_file, cache_dir):
    part = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", blocks=1)
    config = RunConfig(model=str(tiny_model_dirs["llama"]), corpus=str(corpus_file), layers="0,2",
                       baselines="none", **FAST)
    with pytest.raises(TokenprobeError, match="layer 2 is needed but this model holds only blocks 0-0 of 3"):
        train(config, loaded=part, cache_dir=cache_dir, save=False, progress=False)


# ----------------------------------------------------------------------------------------- in train


@pytest.mark.parametrize("baselines", ["none", "lens,stats"])
def test_train_loads_only_the_blocks_it_probes_and_says_so(baselines, tiny_model_dirs, corpus_file, cache_dir,
                                                           tmp_path):
    """The same figures as a run on the whole model, from blocks 0..1 of 4 (gemma3)."""
    model = str(tiny_model_dirs["gemma3"])
    config = RunConfig(model=model, corpus=str(corpus_file), layers="0,2", baselines=baselines, **FAST)
    part = train(config, out_dir=tmp_path / "part", cache_dir=cache_dir, progress=False)
    whole = train(config, loaded=load_model(model, "float32", "cpu", cache_dir), cache_dir=cache_dir,
                  save=False, progress=False)
    record = json.loads((tmp_path / "part" / "run.json").read_text())
    assert record["model"]["num_layers"] == 4 and record["model"]["loaded_blocks"] == 2
    assert "blocks 0-1 of 4" in record["model"]["loaded"] and "deepest probed layer is 2" in record["model"]["loaded"]
    assert whole.record["model"]["loaded_blocks"] == 4 and "loaded" not in whole.record["model"]
    assert record["model"]["weights_hash"] == whole.record["model"]["weights_hash"]
    for a, b in zip(part.layers, whole.layers):
        assert a.layer == b.layer and a.primary == b.primary
        assert a.logit_lens == b.logit_lens
    names = sorted(b.name for b in part.baselines)
    assert names == ([] if baselines == "none" else ["majority", "token_stats"])
    assert [b.name for b in part.baselines] == [b.name for b in whole.baselines]
    if baselines == "lens,stats":
        assert all(r.logit_lens for r in part.layers) and not any(r.auroc_fraction_of_model for r in part.layers)
        assert record["baselines"]["kinds"] == ["lens", "stats"]
    report = (tmp_path / "part" / "report.md").read_text()
    assert ("## Compared with the baselines" in report) == (baselines != "none")
    assert (tmp_path / "part" / "plot.png").stat().st_size > 0


def test_train_with_the_models_own_prediction_loads_every_block(tiny_model_dirs, corpus_file, cache_dir):
    config = RunConfig(model=str(tiny_model_dirs["llama"]), corpus=str(corpus_file), layers="0,1",
                       baselines="model", **FAST)
    result = train(config, cache_dir=cache_dir, save=False, progress=False)
    assert result.record["model"]["loaded_blocks"] == 3 and "loaded" not in result.record["model"]
    assert [b.name for b in result.baselines] == ["model", "majority"]
    assert not any(r.logit_lens for r in result.layers)


def test_baselines_option_parsing():
    assert RunConfig().baseline_kinds() == ("model", "lens", "stats")
    assert RunConfig(baselines="none").baseline_kinds() == ()
    assert RunConfig(baselines="stats, lens").baseline_kinds() == ("lens", "stats")
    assert RunConfig(baselines=False).baselines == "none" and RunConfig(baselines=True).baselines == "all"
    assert RunConfig.from_dict({"baselines": False}).baseline_kinds() == ()  # a run.json from before
    for bad in ("foo", "lens,lens", "", "model,"):
        with pytest.raises(TokenprobeError, match="--baselines"):
            RunConfig(baselines=bad).validate()


# ---------------------------------------------------------------------------------------- device_map


def _split_map(arch: str, folder) -> dict[str, str]:
    """Half the blocks on the CPU, the other half (and the final norm) offloaded to disk."""
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(folder).num_hidden_layers
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    device_map = {f"{prefix}.{i}": ("cpu" if i < n // 2 else "disk") for i in range(n)}
    if arch == "gpt2":
        device_map.update({"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "disk",
                           "lm_head": "cpu"})
    else:
        device_map.update({"model.embed_tokens": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu",
                           "lm_head": "cpu"})
    return device_map


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_device_map_split_gives_the_unsplit_activations(arch, tiny_model_dirs, full_models, cache_dir, tmp_path):
    folder = tiny_model_dirs[arch]
    full = full_models[arch]
    layers = list(range(full.num_layers + 1))
    map_file = tmp_path / "device_map.json"
    map_file.write_text(json.dumps(_split_map(arch, folder)))
    split = load_model(str(folder), "float32", "cpu", cache_dir, device_map=str(map_file))
    assert getattr(split.model, "hf_device_map", None) and "disk" in set(split.model.hf_device_map.values())
    assert split.placement.input == torch.device("cpu")
    assert torch.equal(_activations(split, layers), _activations(full, layers))


def test_device_map_with_only_the_first_blocks(tiny_model_dirs, full_models, cache_dir):
    full = full_models["llama"]
    split = load_model(str(tiny_model_dirs["llama"]), "float32", "cpu", cache_dir, blocks=2, device_map="auto")
    assert split.loaded_blocks == 2 and split.num_layers == 3
    assert torch.equal(_activations(split, [0, 1, 2]), _activations(full, [0, 1, 2]))


def test_device_map_and_load_in_errors_are_one_line(tiny_model_dirs, tmp_path):
    from tokenprobe.models.loading import check_load_in, read_device_map

    with pytest.raises(TokenprobeError, match="--device-map nowhere.json: not one of auto"):
        read_device_map("nowhere.json")
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(TokenprobeError, match="must hold one object mapping module names to devices"):
        read_device_map(str(bad))
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        with pytest.raises(TokenprobeError, match="--load-in 8bit needs"):
            check_load_in("8bit")


# ------------------------------------------------------------------------------------- CLI, errors


@pytest.mark.parametrize("args, match", [
    (["--baselines", "lens,foo"], ["--baselines 'lens,foo': use all, none, or a comma-separated subset of model, "
                                   "lens, stats", "'foo' is not one"]),
    (["--baselines", "stats,stats"], ["--baselines 'stats,stats'", "a kind is named twice"]),
    (["--device-map", "everywhere"], ["--device-map 'everywhere': use auto, balanced", "or a JSON file"]),
    (["--load-in", "3bit"], ["argument --load-in: invalid choice: '3bit'"]),
])
def test_option_errors_are_one_line_before_the_model_loads(args, match, tmp_path, corpus_file):
    """A model that does not exist: the option's error comes first, so it is checked before any loading."""
    from cli_helpers import FAST as CLI_FAST, assert_nothing_written, run_cli

    out = tmp_path / "run"
    proc = run_cli(["train", "--model", tmp_path / "no-such-model", "--corpus", corpus_file, "--out", out,
                    "--cache-dir", tmp_path / "cache", *CLI_FAST, *args])
    output = proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "error:" in line]
    assert len(lines) == 1, output
    for part in match:
        assert part in lines[0], lines[0]
    assert_nothing_written(out)


def test_load_in_without_bitsandbytes_or_gpu_is_one_line(tmp_path, corpus_file):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        pytest.skip("bitsandbytes and a GPU are both here")
    from cli_helpers import FAST as CLI_FAST, error_line, run_cli

    proc = run_cli(["train", "--model", tmp_path / "no-such-model", "--corpus", corpus_file, "--out", tmp_path / "run",
                    "--cache-dir", tmp_path / "cache", *CLI_FAST, "--load-in", "4bit"])
    line = error_line(proc)
    assert "--load-in 4bit needs" in line and ("bitsandbytes" in line or "CUDA GPU" in line), line


def test_cli_no_baselines_loads_only_the_probed_blocks(tiny_model_dirs, corpus_file, tmp_path):
    from cli_helpers import FAST as CLI_FAST, run_cli

    out = tmp_path / "run"
    proc = run_cli(["train", "--model", tiny_model_dirs["gemma3"], "--corpus", corpus_file, "--out", out,
                    "--cache-dir", tmp_path / "cache", *[a for a in CLI_FAST if a != "--quiet"], "--layers", "0,1",
                    "--no-baselines", "--bootstrap", "0", "--no-control"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loaded the embedding and blocks 0-0 of 4" in proc.stderr and "--no-baselines" in proc.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["baselines"] == "none" and record["model"]["loaded_blocks"] == 1


def test_loading_benchmark_help_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "loading.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--partial-model", "--first-load-model", "--repeats", "--skip-first-load"):
        assert flag in proc.stdout
