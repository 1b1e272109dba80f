"""Atomic folders: complete at the target, or not there at all."""

from __future__ import annotations

import pytest

from atelier.home import atomic_dir, atomic_write_text, umask


def test_a_folder_appears_complete_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "sub").mkdir()
        atomic_write_text(tmp / "sub" / "new.txt", "new")  # mkstemp: 0600
        assert (target / "old.txt").read_text() == "old"  # untouched until the block ends
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["sub", "sub/new.txt"]
    mask = umask()  # usual permissions, not mkdtemp's 0700 and mkstemp's 0600
    assert [p.stat().st_mode & 0o777 for p in (target, target / "sub" / "new.txt")] == [0o777 & ~mask, 0o666 & ~mask]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old folder left


def test_an_error_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def killed_mid_build():
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_mid_build()
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
