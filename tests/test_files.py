"""ditlab/files.py: atomic writes honour the umask, write through symlinks, never replace what is not a
regular file."""

import contextlib
import os
import stat

import pytest

from ditlab.files import NotARegularFile, atomic_write, write_json, write_page


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_files_get_the_mode_open_would_give(tmp_path, mask, mode):
    path = tmp_path / "out.json"
    with umask(mask):
        write_json(str(path), {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # the independent reference: what open() gives
            f.write("x")
    assert stat.S_IMODE(os.stat(path).st_mode) == mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_a_replaced_file_keeps_its_own_mode(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    with umask(0o022):
        atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_symlink_is_written_through(tmp_path):
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "metrics.json"
    target.write_text("{}")
    link = tmp_path / "metrics.json"
    link.symlink_to(target)
    write_json(str(link), {"fd": 3.5})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert '"fd": 3.5' in target.read_text()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # the temp file went next to the target


def test_a_pipe_or_directory_is_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile, match="not a regular file"):
        atomic_write(str(fifo), lambda f: f.write(b"x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(NotARegularFile, match="is a directory"):
        atomic_write(str(tmp_path), lambda f: f.write(b"x"))
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temp file left behind


def test_write_page_puts_the_figures_beside_the_page_and_rewrites_only_their_links(tmp_path):
    out, page = tmp_path / "out", tmp_path / "docs" / "results" / "study.md"
    out.mkdir()
    page.parent.mkdir(parents=True)
    (out / "curves.png").write_bytes(b"png-1")
    text = "# Study\n\n![curves](curves.png)\n\n![grid](grid.png)\n\n[other](curves.png.md)\n"
    # grid.png was not drawn: its link is left as it was, nothing is copied for it
    write_page(str(page), text, str(out), {"curves.png": "study_curves.png", "grid.png": "study_grid.png"})
    figures = tmp_path / "docs" / "figures"
    assert sorted(os.listdir(figures)) == ["study_curves.png"]
    assert (figures / "study_curves.png").read_bytes() == b"png-1"
    assert page.read_text() == text.replace("](curves.png)", "](../figures/study_curves.png)")
    assert "](curves.png.md)" in page.read_text() and "](grid.png)" in page.read_text()
