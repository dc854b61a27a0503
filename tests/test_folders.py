"""Tests for anomaly_flow.folders: finding image files in real folder trees on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from anomaly_flow.data import DataError, write_image_folder
from anomaly_flow.errors import one_line
from anomaly_flow.folders import find_images, search_images
from tests.test_data import rgb_pattern, save


def test_an_mlflow_store_inside_the_folder_is_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``anomaly-flow score .`` where ./mlruns is: its plots are not the user's images."""
    write_image_folder(np.zeros((2, 1, 8, 8), np.uint8), tmp_path / "parts", "p-")
    store = tmp_path / "mlruns"
    write_image_folder(np.zeros((3, 1, 8, 8), np.uint8), store / "artifacts" / "1", "plot-")
    (store / "mlflow.db").write_bytes(b"")
    (tmp_path / "like-a-store").mkdir()  # a database alone is not a store
    (tmp_path / "like-a-store" / "mlflow.db").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["parts/p-00000.png",
                                                                   "parts/p-00001.png"]
    assert f"left out 1 MLflow store folder(s) under {tmp_path} (e.g. {store})" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(find_images(store)) == 3  # asked for by name: searched, and said
    assert f"{store} is an MLflow store: its images are runs' plots and sample grids, not " \
        "data of yours" in caplog.text


def test_find_images_extensions_and_order(tmp_path: Path) -> None:
    names = ["b/z.PNG", "a.jpeg", "a.JPG", "c.bmp", "d.tif", "e.TIFF", "f.webp", "g.gif", "b/a.png",
             "h.x.png"]  # the extension is the last suffix, as Path's
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")
    for hidden in ("..png", "b/...jpg"):  # hidden, though named like images
        (tmp_path / hidden).write_bytes(b"x")
    for no_suffix in (".png", "b/.jpg", "png.", "jpg"):  # no extension at all
        (tmp_path / no_suffix).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder is never listed as an image
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == sorted(names)
    assert find_images(tmp_path) == find_images(tmp_path)


def test_find_images_says_which_files_it_leaves_out(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An image in a format it does not read (HEIC, say) is not silently dropped; hidden
    files and the files operating systems leave in folders are not worth a word."""
    save(rgb_pattern(8, 8), tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    for name in ("sub/photo.heic", "sub/other.HEIC", "notes.txt", "README", ".DS_Store",
                 "Thumbs.db", "sub/desktop.ini"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folders"):
        assert find_images(tmp_path) == [tmp_path / "a.png"]
        find_images(tmp_path)  # the same folder again: said once
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"4 file(s) under {tmp_path} are left out: their extensions "
                              "are not of images anomaly-flow reads (.heic 2, .txt 1, no "
                              "extension 1; it reads .bmp .gif .jpeg .jpg .png .tif .tiff "
                              ".webp); convert or rename any images among them")


def test_find_images_leaves_out_hidden_files_and_folders_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What macOS (``._x.png`` beside each copied file, ``.Trashes``) and Jupyter
    (``.ipynb_checkpoints``) leave in a folder is not the user's images: left out, in one
    warning that counts them and says how to include one; hidden clutter that is not named
    like an image (``.DS_Store``) is not worth a word, nor a hidden folder that holds no
    image file, or is a tool's (``.git``, ``.Trashes``)."""
    for folder in ("sub/.Trashes/501", ".ipynb_checkpoints", ".git/objects"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    save(rgb_pattern(8, 8), tmp_path / "a.png")
    save(rgb_pattern(8, 8), tmp_path / "sub" / "b.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "sub" / "._b.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    save(rgb_pattern(8, 8), tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    save(rgb_pattern(8, 8), tmp_path / "sub" / ".Trashes" / "501" / "old.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folders"):
        assert find_images(tmp_path) == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
        find_images(tmp_path)  # the same folder again: said once
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (f"left out 2 hidden image files and 1 hidden folder holding images "
                       f"under {tmp_path} (names starting with '.', e.g. ._a.png, "
                       ".ipynb_checkpoints): macOS's ._ "
                       "copies, .ipynb_checkpoints and .Trashes hold no images of yours; to "
                       "include one, rename it without the leading '.'")
    # the folder given may itself be hidden: only what is inside it is left out
    trash = tmp_path / "sub" / ".Trashes"
    assert find_images(trash) == [trash / "501" / "old.png"]
    # a folder of hidden images only: the refusal says where the images went
    only = tmp_path.parent / f"{tmp_path.name}-only"
    (only / ".ipynb_checkpoints").mkdir(parents=True)
    save(rgb_pattern(8, 8), only / ".ipynb_checkpoints" / "a-checkpoint.png")
    with pytest.raises(DataError) as refused:
        find_images(only)
    assert str(refused.value) == (
        f"no image files found in {only} but hidden ones: 1 hidden folder holding images "
        "(names starting with '.', e.g. .ipynb_checkpoints) left out; rename the ones that "
        "hold your images without the leading '.'")
    # images a level or more below a hidden folder (a file server's snapshots) count too
    snapshots = tmp_path.parent / f"{tmp_path.name}-snapshots"
    (snapshots / ".snapshot" / "day1").mkdir(parents=True)
    save(rgb_pattern(8, 8), snapshots / ".snapshot" / "day1" / "a.png")
    with pytest.raises(DataError, match=r"^no image files found in .* but hidden ones: 1 "
                       r"hidden folder holding images \(names starting with '\.', e\.g\. "
                       r"\.snapshot\) left out"):
        find_images(snapshots)
    # a folder of a git checkout only: nothing hidden to speak of, the plain refusal
    checkout = tmp_path.parent / f"{tmp_path.name}-checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    # nor a Python environment by another name, or a hidden MLflow store, with images
    # of their own (matplotlib's icons, runs' plots)
    (checkout / ".env" / "lib" / "mpl-data" / "images").mkdir(parents=True)
    (checkout / ".env" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    save(rgb_pattern(8, 8), checkout / ".env" / "lib" / "mpl-data" / "images" / "home.png")
    (checkout / ".mlruns" / "artifacts" / "1").mkdir(parents=True)
    (checkout / ".mlruns" / "mlflow.db").write_bytes(b"")
    save(rgb_pattern(8, 8), checkout / ".mlruns" / "artifacts" / "1" / "curves.png")
    with pytest.raises(DataError, match=r"^no image files found in .* \(looked recursively"):
        find_images(checkout)


DEEP = 1_100
"""Folders nested deeper than Python 3.11's recursive ``os.walk`` could go (about 980)."""


def remove_tree(folder: Path) -> None:
    """``shutil.rmtree(folder)`` without its recursion, which fails on a deep tree."""
    folders, stack = [], [folder]
    while stack:
        folders.append(stack.pop())
        with os.scandir(folders[-1]) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    os.unlink(entry.path)
    for each in reversed(folders):
        each.rmdir()


@contextlib.contextmanager
def deep_folder(root: Path, depth: int = DEEP) -> Iterator[Path]:
    """``root/d/d/.../d``, ``depth`` folders deep (the deepest given), removed after (as
    pytest's clean-up, recursive, could not)."""
    folder = root
    for _ in range(depth):
        folder = folder / "d"
        folder.mkdir()
    try:
        yield folder
    finally:
        remove_tree(root / "d")


def test_find_images_searches_a_folder_tree_a_thousand_folders_deep(tmp_path: Path) -> None:
    save(rgb_pattern(), tmp_path / "top.png")
    with deep_folder(tmp_path) as bottom:
        save(rgb_pattern(), bottom / "bottom.png")
        (bottom / "up").symlink_to(tmp_path)  # a loop at the bottom is still not followed
        found = search_images(tmp_path)
        assert found.paths == [tmp_path / ("d/" * DEEP + "bottom.png"), tmp_path / "top.png"]
        assert found.unlisted == []


@contextlib.contextmanager
def too_long_a_path(root: Path, levels: int = 20) -> Iterator[Path]:
    """``levels`` nested folders of 250-character names under ``root``: the whole path
    is longer than the system takes (4,096 bytes), so they are made, and removed after,
    from inside one another. Gives the first folder whose path is too long to list."""
    name, back = "x" * 250, os.getcwd()
    os.chdir(root)
    try:
        for _ in range(levels):
            os.mkdir(name)
            os.chdir(name)
        depth = next(i for i in range(1, levels + 1)
                     if len(os.fsencode(root)) + i * (len(name) + 1) >= 4096)
        yield root.joinpath(*[name] * depth)
    finally:
        for _ in range(levels):
            os.chdir("..")
            os.rmdir(name)
        os.chdir(back)


def test_a_folder_whose_path_is_too_long_is_named_with_what_to_do(tmp_path: Path) -> None:
    """Making it readable would not help: the names on its path must be shorter."""
    with too_long_a_path(tmp_path) as unlistable:
        with pytest.raises(DataError) as refused:
            find_images(tmp_path)
        save(rgb_pattern(), tmp_path / "a.png")
        found = search_images(tmp_path)
    assert str(refused.value) == (
        f"no image files found in {tmp_path}, and 1 folder(s) inside it could not be listed "
        f"(e.g. {unlistable}: File name too long); shorten the names of the folders on "
        "their path, or move them nearer the top of the tree")
    assert found.paths == [tmp_path / "a.png"]
    assert found.unlisted == [(unlistable, "File name too long")]


def test_find_images_survives_a_symlinked_folder_loop(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save(rgb_pattern(), tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "again").symlink_to("sub")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["sub/a.png"]


def test_find_images_survives_a_folder_removed_while_it_searches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that goes between being listed and being looked at (an ingest job
    moving it away) is passed over, not a raw FileNotFoundError with a traceback."""
    save(rgb_pattern(), tmp_path / "a.png")
    (tmp_path / "gone").mkdir()
    save(rgb_pattern(), tmp_path / "gone" / "b.png")
    scandir = os.scandir

    def list_then_remove(path: str | int) -> object:
        if isinstance(path, int) or Path(path).name != "gone":  # rmtree lists by descriptor
            return scandir(path)
        with scandir(path) as entries:
            listed = list(entries)
        shutil.rmtree(path)  # listed already, and now away
        return contextlib.nullcontext(iter(listed))

    monkeypatch.setattr(os, "scandir", list_then_remove)
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png"]


def test_search_images_names_the_folders_it_could_not_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    save(rgb_pattern(), tmp_path / "a.png")
    (tmp_path / "locked").mkdir()
    save(rgb_pattern(), tmp_path / "locked" / "b.png")
    scandir = os.scandir

    def refuse_locked(path: object = ".") -> object:
        if Path(os.fsdecode(path)).name == "locked":  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fsdecode(path))  # type: ignore[arg-type]
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", refuse_locked)
    with caplog.at_level(logging.WARNING):
        paths, unlisted, _ = search_images(tmp_path)
    assert [p.name for p in paths] == ["a.png"]
    assert unlisted == [(tmp_path / "locked", "Permission denied")]
    assert "cannot list folder" in caplog.text
    (tmp_path / "a.png").unlink()  # nothing found: the error says a folder was not listed
    with pytest.raises(DataError, match=r"no image files found in .*, and 1 folder\(s\) "
                                        r"inside it could not be listed \(e\.g\. .*locked: "
                                        r"Permission denied\); make them readable"):
        find_images(tmp_path)


def test_a_folder_name_that_cannot_be_listed_cannot_forge_a_log_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    save(rgb_pattern(), tmp_path / "a.png")
    forged = "locked\nERROR anomaly_flow: all fine"
    (tmp_path / forged).mkdir()
    scandir = os.scandir

    def refuse_locked(path: object = ".") -> object:
        if Path(os.fsdecode(path)).name == forged:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fsdecode(path))  # type: ignore[arg-type]
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", refuse_locked)
    with caplog.at_level(logging.WARNING):
        search_images(tmp_path)
    [message] = [r.getMessage() for r in caplog.records if "cannot list" in r.getMessage()]
    assert "\n" not in message and "locked\\nERROR anomaly_flow: all fine" in message


def test_one_line_escapes_control_characters() -> None:
    assert one_line("x.png\nERROR fake\r\t\x1b[31m\x7f") == (
        "x.png\\nERROR fake\\r\\t\\x1b[31m\\x7f")
    assert one_line("plain é name.png") == "plain é name.png"


def test_find_images_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found: .*nowhere"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(DataError, match=f"no image files found in {tmp_path}"):
        find_images(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        find_images(tmp_path / "only.txt")
