import os
import threading
import time

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


class _Stop(Exception):
    pass


def test_files_that_belong_together_are_renamed_together_even_when_a_signal_lands_between(tmp_path, monkeypatch):
    """A SIGTERM arriving while the first of two files is renamed waits until the second is in place too; an
    exception before the renames removes both temporary files and keeps the old pair."""
    import signal

    from reidcli.fileio import atomic_paths

    a, b = tmp_path / "index.faiss", tmp_path / "index.faiss.json"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError), atomic_paths((a, ".faiss"), (b, "")) as (ta, tb):
        ta.write_text("new a")
        raise RuntimeError("failed before the renames")
    assert (a.read_text(), b.read_text()) == ("old a", "old b") and sorted(tmp_path.iterdir()) == [a, b]

    replace = os.replace
    renamed = []

    def replace_then_signal(src, dst):
        replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # lands between the two renames

    def on_term(signum, frame):
        raise _Stop(f"signal after {len(renamed)} renames")

    monkeypatch.setattr(os, "replace", replace_then_signal)
    old_handler = signal.signal(signal.SIGTERM, on_term)
    # other threads, as torch's workers in a real run: the kernel may hand the signal to any of them
    stop = threading.Event()
    others = [
        threading.Thread(target=lambda: [time.sleep(1e-3) for _ in iter(stop.is_set, True)], daemon=True)
        for _ in range(4)
    ]
    for t in others:
        t.start()
    try:
        with pytest.raises(_Stop, match="signal after 2 renames"), atomic_paths((a, ".faiss"), (b, "")) as (ta, tb):
            ta.write_text("new a")
            tb.write_text("new b")
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, old_handler)
    assert (a.read_text(), b.read_text()) == ("new a", "new b") and sorted(tmp_path.iterdir()) == [a, b]
