"""Files we write are atomic and take the permissions any file the user creates takes (umask)."""

from __future__ import annotations

import os
import stat

import pytest

from tokenprobe.files import atomic_write_bytes, current_umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        atomic_write_bytes(tmp_path / "a.json", b"[]", durable=False)  # replacing keeps the same rule
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert (tmp_path / "a.json").read_bytes() == b"[]" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
