"""A Hugging Face hub id, loaded offline from a local hub cache (the hub itself is unreachable here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_id_loads_from_the_hub_cache_and_records_its_revision(tiny_model_dirs, corpus_file, tmp_path):
    hub = tmp_path / "hub"
    repo = hub / "models--tinyorg--tiny-llama"
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TOKENPROBE_CACHE": str(tmp_path / "c")}
    code = (
        "from tokenprobe import load_model, RunConfig, train\n"
        "m = load_model('tinyorg/tiny-llama', 'float32', 'cpu')\n"
        "print(m.weights_hash, m.name, m.num_layers)\n"
        f"r = train(RunConfig(model='tinyorg/tiny-llama', corpus={str(corpus_file)!r}, layers='1', "
        "context_length=64, train_positions=200, eval_positions=100), loaded=m, save=False, progress=False)\n"
        "print(r.layers[0].run_name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()[-2:]
    assert first == f"hub:tinyorg/tiny-llama@{COMMIT} tiny-llama 3"
    assert second == "probe-layer1-ctx64-all-next-tiny-llama"
