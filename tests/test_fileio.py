import os

import pytest

from reidcli.fileio import atomic_path


def test_atomic_path_renames_on_success_with_normal_permissions(tmp_path):
    final = tmp_path / "out.bin"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"data")
        assert not final.exists()
    assert final.read_bytes() == b"data"
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert final.read_bytes() == b"old" and list(tmp_path.iterdir()) == [final]


def test_a_writer_interrupted_outside_its_except_is_cleaned_up_at_exit(tmp_path):
    """A signal can land in contextlib's frames, where the writer's own cleanup never runs (the generator stays
    suspended): the temporary name was registered before the file existed, and the exit hook removes it."""
    from reidcli import fileio

    final = tmp_path / "curves.png"
    cm = atomic_path(final, suffix=".png")
    tmp = cm.__enter__()  # the body ran; the exception arrives before __exit__ resumes the generator
    tmp.write_bytes(b"half a picture")
    assert tmp in fileio._LIVE and tmp.name.startswith(".curves.png.") and tmp.name.endswith(".png.tmp")
    fileio._remove_leftovers()  # what atexit runs
    assert not tmp.exists() and not final.exists()
    cm.gen.close()  # the suspended writer, closed late, finds nothing left to remove
    assert tmp not in fileio._LIVE
