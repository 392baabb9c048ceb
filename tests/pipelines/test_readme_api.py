"""The README's Python API snippet runs as written, on the real default model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.real_model

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its run folders go under ./runs
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    runs, pred, acts = namespace["runs"], namespace["pred"], namespace["acts"]
    assert sorted(runs) == ["current", "next"]
    assert all(run.out_dir.resolve().parent == tmp_path.resolve() / "runs" for run in runs.values())
    assert runs["current"].best.primary.balanced_accuracy > 0.95  # reading the current token is easy
    assert runs["next"].best.primary.balanced_accuracy > 0.75
    assert pred.layers == list(range(19)) and pred.probabilities.shape == (19, len(pred.tokens))
    assert "".join(pred.tokens) == "The capital of France is Paris, and the"
    assert np.isfinite(pred.probabilities).all()
    assert acts[18].shape == (5, 640) and acts.layers == [9, 18]
    out = capsys.readouterr().out
    assert "best layer" in out and "' Paris'" in out
