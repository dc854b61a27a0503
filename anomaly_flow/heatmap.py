"""Heatmaps: where in an image the model finds it unlikely.

The map is the exact per-pixel decomposition of the bits/dim
(:attr:`anomaly_flow.glow.LikelihoodBreakdown.pixel_bpd`): its mean over pixels is the
image's ``bpd``. Each map is colour-mapped and blended over the image the model saw
(converted to the model's mode and size), upsampled by an integer factor with nearest
neighbours so that one model pixel stays one block of screen pixels, then put back in
the shape of its file (:func:`in_source_shape`: stretched back, or the pad's bars cut).

Colour scale: **fixed**, the same for every image, so heatmaps can be compared with one
another: ``vmin = 0`` bits/dim (certain; a density above 1 gives less, clipped) to
``vmax = n_bits`` bits/dim (no better than uniform noise over the ``2**n_bits`` levels),
clipped at both ends, through matplotlib's ``inferno`` colormap (black → purple → orange
→ yellow). The overlay's
opacity grows with the value (``0.2`` at ``vmin`` to ``0.8`` at ``vmax``), so likely
regions show the image and unlikely regions glow. Each PNG records its scale and the
map's mean (the image's bpd) as text chunks (``anomaly-flow:*``).

When a model's decisions rest on its normal reference (its calibration chose
``typicality``, ``knn``, ``pixel_knn`` or ``ensemble``), the map drawn is the typicality score's
per-pixel terms instead: ``|m − μ| / (σ + floor)`` against the model's
normal reference (:meth:`anomaly_flow.glow.Glow.typicality`), whose mean over pixels is
the image's ``typicality``, on a fixed scale from 0 to :data:`TYPICALITY_VMAX` normal
standard deviations. Pixels that look as they do in normal images stay dark, whatever
their bits; the PNG then records ``anomaly-flow:typicality``.

Colour-mapping is a table look-up in numpy (no matplotlib figure per image), and files
are encoded on background threads, off the scoring loop.

Example:
    >>> rgb = render_heatmap(image, pixel_bpd, vmin=0.0, vmax=8.0)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from anomaly_flow.config import Resize
from anomaly_flow.data import content_box, display_path, is_regular_file
from anomaly_flow.errors import one_line
from anomaly_flow.folders import make_folders, walk_tree
from anomaly_flow.stopping import remove_leftovers

logger = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"\.hm\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
"""The name a heatmap has while it is written, the writer's process id as ``pid``."""

COLORMAP = "inferno"
MIN_SIDE = 256
"""Heatmaps are upsampled by the smallest integer factor that makes them at least this wide."""
ALPHA_RANGE = (0.2, 0.8)
"""Overlay opacity at ``vmin`` and at ``vmax`` (linear in between)."""
UNITS = {"bpd": "bits/dim", "typicality": "normal standard deviations"}
"""The quantities a heatmap can draw, and the unit its scale is written in."""
TYPICALITY_VMAX = 5.0
"""Top of the fixed colour scale of typicality heatmaps, in normal standard deviations."""


def colormap_table(name: str = COLORMAP) -> np.ndarray:
    """The matplotlib colormap ``name`` sampled at 256 levels: uint8 ``(256, 3)``."""
    import matplotlib  # imported here: only heatmaps need it

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}; use a matplotlib colormap name such as {COLORMAP!r}"
        ) from None
    return np.rint(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def render_heatmap(
    image: np.ndarray,
    pixel_bpd: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    table: np.ndarray | None = None,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """Blend the colour-mapped per-pixel bits/dim over the image.

    Args:
        image: uint8 ``(C, H, W)``, C = 1 or 3: the image as the model saw it.
        pixel_bpd: ``(H, W)`` per-pixel bits/dim.
        vmin: Bits/dim drawn in the colormap's first colour (values below are clipped).
        vmax: Bits/dim drawn in its last colour (values above are clipped).
        table: uint8 ``(256, 3)`` from :func:`colormap_table`; ``inferno`` when None.
        min_side: The output is upsampled (nearest, integer factor) to at least this size.

    Returns:
        uint8 ``(H * f, W * f, 3)`` RGB, ``f = ceil(min_side / W)`` (at least 1).
    """
    if not vmax > vmin:
        raise ValueError(f"heatmap scale needs vmax > vmin, got vmin={vmin}, vmax={vmax}")
    table = colormap_table() if table is None else table
    if image.shape[1:] != pixel_bpd.shape:
        raise ValueError(
            f"image {image.shape} and pixel map {pixel_bpd.shape} differ in height and width"
        )
    t = np.clip((np.nan_to_num(pixel_bpd, nan=vmax).astype(np.float32) - vmin) / (vmax - vmin),
                0.0, 1.0)
    colour = table[np.rint(t * 255).astype(np.intp)].astype(np.float32)  # (H, W, 3)
    alpha = (ALPHA_RANGE[0] + (ALPHA_RANGE[1] - ALPHA_RANGE[0]) * t)[..., None]
    base = np.moveaxis(image, 0, -1).astype(np.float32)  # (H, W, C)
    blended = np.rint((1 - alpha) * base + alpha * colour).astype(np.uint8)  # grey broadcasts
    factor = max(1, -(-min_side // blended.shape[1]))
    return blended.repeat(factor, axis=0).repeat(factor, axis=1)


def in_source_shape(rgb: np.ndarray, size: int, shape: tuple[int, int],
                    resize: Resize) -> np.ndarray:
    """A heatmap drawn over the model's ``size × size`` view (uint8 ``(S, S, 3)``, ``S`` a
    whole multiple of ``size``, from :func:`render_heatmap`) in the shape of its source
    file, upright ``(width, height)``: under ``pad`` without the black bars, under
    ``stretch`` stretched back to the file's aspect ratio, under ``crop`` as it is (the
    file's centred square, undistorted). The longer side keeps ``S`` pixels; the model's
    pixels stay blocks (nearest neighbour), a little unequal where the ratio is not whole.
    """
    if resize == "crop":
        return rgb
    side = rgb.shape[0]
    factor = side // size
    left, top, right, bottom = content_box(*shape, size, resize)
    view = rgb[top * factor : bottom * factor, left * factor : right * factor]
    width, height = shape
    target = ((side, max(1, round(side * height / width))) if width >= height
              else (max(1, round(side * width / height)), side))
    if (view.shape[1], view.shape[0]) == target:
        return view
    return np.asarray(Image.fromarray(view).resize(target, Image.Resampling.NEAREST))


def heatmap_names(relative_paths: Sequence[Path]) -> list[Path]:
    """Where each file's heatmap goes, relative to the heatmap folder; all different.

    The file's relative path with its suffix replaced by ``.png`` (``a/b.jpg`` →
    ``a/b.png``). Where two files would share a name (``b.jpg`` and ``b.png``), each of
    them keeps its whole name and gets ``.png`` appended (``b.jpg.png``, ``b.png.png``).
    A name still taken after that (``b.png.png`` was also a file there), or one that is
    a folder of other heatmaps (``x.jpg`` beside a folder ``x.png/``), gets ``~2``,
    ``~3``, ... before its suffix, in the order of ``relative_paths``. A name longer than
    file systems take (:data:`NAME_BYTES`, as a file named to the limit gets with
    ``.png`` added) is cut, and ends in a hash of the whole (see :func:`_fitted`).
    """
    plain = [p.with_suffix(".png") for p in relative_paths]
    counts = Counter(plain)
    wanted = [_fitted(name if counts[name] == 1 else path.with_name(path.name + ".png"))
              for name, path in zip(plain, relative_paths, strict=True)]
    folders = {parent for name in wanted for parent in name.parents}
    taken: set[Path] = set()
    return [_take_free(name, taken, folders) for name in wanted]


def _take_free(name: Path, taken: set[Path], folders: set[Path] | frozenset[Path] = frozenset()
               ) -> Path:
    """``name``, or the first of ``name~2.png``, ``name~3.png``, ... neither in ``taken``
    nor in ``folders``; added to ``taken``."""
    candidate, n = name, 1
    while candidate in taken or candidate in folders:
        n += 1
        candidate = _fitted(name.with_name(f"{name.stem}~{n}.png"))
    taken.add(candidate)
    return candidate


NAME_BYTES = 255
"""The longest file name, in bytes, that common file systems take (ext4, XFS, btrfs, APFS):
a heatmap's name must fit it wherever the heatmaps are written."""


def _fitted(name: Path) -> Path:
    """``name``, or, where its last part is over :data:`NAME_BYTES` bytes, that part cut
    to leave room for ``~N`` and ending in ``~`` and 12 hex digits of its SHA-256, then
    ``.png``: the same for the same name, different for different ones (the heatmap's
    text chunk keeps the scored file's path in full)."""
    whole = os.fsencode(name.name)
    if len(whole) <= NAME_BYTES:
        return name
    tail = f"~{hashlib.sha256(whole).hexdigest()[:12]}.png".encode()
    stem = os.fsencode(name.stem)
    end = NAME_BYTES - len(tail) - 8  # 8: room for a ~N
    for _ in range(3):  # not inside a UTF-8 character (of at most 4 bytes)
        if stem[end] & 0xC0 != 0x80:
            break
        end -= 1
    return name.with_name(os.fsdecode(stem[:end] + tail))


SOURCE_KEY = "anomaly-flow:source"
"""The PNG text chunk holding the scored file's path relative to the scored folder."""

FOLDER_KEY = "anomaly-flow:folder"
"""The PNG text chunk holding the scored folder's absolute path: a heatmap folder may
serve several scored folders, whose files' relative paths can be the same."""


MODEL_KEY = "anomaly-flow:model"
"""The PNG text chunk holding the digest of the model that drew the heatmap
(:meth:`anomaly_flow.glow.Glow.digest`): a resumed run keeps only its own model's."""


def _png_text(path: Path) -> dict[str, Any]:
    """The text chunks (and other header info) of the PNG at ``path``; empty for anything
    else, or a file that cannot be read."""
    if not is_regular_file(path):  # a pipe named .png would block the open
        return {}
    try:
        with Image.open(path) as image:
            return dict(image.info) if image.format == "PNG" else {}
    except (OSError, ValueError, Image.DecompressionBombError):
        return {}


class HeatmapMark(NamedTuple):
    """What a file's PNG header says of it as a heatmap (:func:`heatmap_mark`)."""

    is_heatmap: bool  # a PNG this module wrote: it carries an ``anomaly-flow:*`` chunk
    folder: str | None  # the scored folder it records (FOLDER_KEY); None: none recorded
    model: str | None  # the digest of the model that drew it (MODEL_KEY); None: none recorded

    def drawn_for(self, scored_folder: str | None, model: str | None) -> bool:
        """Whether it may be a heatmap of a run over ``scored_folder`` with the model of
        digest ``model`` (None: any): it records them, or nothing in their place (a
        version before it recorded them)."""
        return (scored_folder is None or self.folder in (None, scored_folder)) \
            and (model is None or self.model in (None, model))


def _text(info: dict[str, Any], key: str) -> str | None:
    value = info.get(key)
    return value if isinstance(value, str) else None


def _mark(info: dict[str, Any]) -> HeatmapMark:
    return HeatmapMark(any(str(key).startswith("anomaly-flow:") for key in info),
                       _text(info, FOLDER_KEY), _text(info, MODEL_KEY))


def heatmap_mark(path: Path) -> HeatmapMark:
    """Whether ``path`` is a heatmap, the scored folder and the model it records, from one
    read of its header."""
    return _mark(_png_text(path))


def recorded_heatmaps(folder: Path, scored_folder: str | None = None,
                      model: str | None = None) -> dict[str, tuple[Path, str | None]]:
    """For each source path recorded in a heatmap under ``folder`` (the :data:`SOURCE_KEY`
    chunk), the heatmap's path relative to ``folder`` (what a resumed run keeps) and what
    it draws (a key of :data:`UNITS`, from its ``anomaly-flow:<quantity>`` chunk; None
    when it records none). Reads only PNG headers. Heatmaps from versions that did not
    record their source are not listed, nor, with ``scored_folder``, those recording
    another scored folder (:data:`FOLDER_KEY`; one recording none may be any folder's),
    nor, with ``model`` (a :meth:`~anomaly_flow.glow.Glow.digest`), those another model
    drew (:data:`MODEL_KEY`; one recording none may be any model's)."""
    found: dict[str, tuple[Path, str | None]] = {}
    if not folder.is_dir():
        return found
    pngs = [Path(top, name) for top, _, names in walk_tree(os.fspath(folder), follow_links=False)
            for name in names if name.endswith(".png")]  # rglob recurses once a level
    for path in sorted(pngs):
        info = _png_text(path)
        if not _mark(info).drawn_for(scored_folder, model):
            continue
        if isinstance(source := info.get(SOURCE_KEY), str):
            quantity = next((q for q in UNITS if f"anomaly-flow:{q}" in info), None)
            found.setdefault(source, (path.relative_to(folder), quantity))
    return found


def resumed_names(every_name: Sequence[Path], held: dict[int, Path],
                  todo: Sequence[int]) -> list[Path]:
    """Heatmap names for the files a resumed run scores (``todo``, indices into
    ``every_name``, the :func:`heatmap_names` of every file found).

    ``held`` maps a file's index to the heatmap an earlier run drew of it. A file scored
    now that has one draws over it; any other takes its name from ``every_name``, as an
    uninterrupted run would, unless another file's heatmap holds that name: then ``~2``,
    ``~3``, ... as in :func:`heatmap_names`. No file's heatmap is ever replaced by another
    image's.
    """
    taken = set(held.values())
    return [held[i] if i in held else _take_free(every_name[i], taken) for i in todo]


def is_heatmap(path: Path) -> bool:
    """Whether ``path`` is a PNG this module wrote (it carries an ``anomaly-flow:*``
    text chunk): the only kind of existing file a heatmap may replace."""
    return heatmap_mark(path).is_heatmap


VIEW_KEY = "anomaly-flow:view"
"""The PNG text chunk that says a heatmap was put back in its source file's shape."""

FAILURES_LOGGED = 5
"""Heatmaps that cannot be written logged one by one; the rest are counted."""


class HeatmapWriter:
    """A :data:`anomaly_flow.scoring.HeatmapSink` writing one PNG per scored image.

    Rendering and PNG encoding run on ``threads`` background threads; at most a few
    batches wait in the queue, so memory stays bounded. Call :meth:`close` (or use it as
    a context manager) to wait for every file. A file that cannot be written is counted
    in :attr:`n_failed` (the first reason kept in :attr:`first_failure`) and logged, the
    first :data:`FAILURES_LOGGED` one by one; it does not stop scoring.

    Args:
        folder: Root of the heatmap tree (created if missing).
        names: For each dataset index, the heatmap's path relative to ``folder``.
        sources: For each dataset index, the scored file's path relative to the scored
            folder, recorded in the PNG (:data:`SOURCE_KEY`) so a resumed run knows which
            heatmap is whose; None records none.
        scored_folder: The scored folder's absolute path, recorded in each PNG
            (:data:`FOLDER_KEY`); None records none.
        model: The digest of the model that draws them, recorded in each PNG
            (:data:`MODEL_KEY`); None records none.
        vmin: Bits/dim at the bottom of the fixed colour scale.
        vmax: Bits/dim at the top of the fixed colour scale.
        colormap: A matplotlib colormap name.
        threads: Background encoder threads.
        quantity: What the maps are: ``bpd`` (per-pixel bits/dim) or ``typicality``
            (its per-pixel terms, :meth:`anomaly_flow.glow.Glow.typicality_map`; ``vmin``
            and ``vmax`` are then in normal standard deviations). Names the PNG's text
            chunk that records the map's mean.
        resize: How the model made its square view of each file (``model.resize``); each
            heatmap takes its file's shape (:func:`in_source_shape`), as the scoring
            loop passes it from decoding, except under ``crop`` and where the sink is
            given no shapes (the model's square view is kept).
    """

    def __init__(
        self,
        folder: Path,
        names: Sequence[Path],
        *,
        vmin: float,
        vmax: float,
        colormap: str = COLORMAP,
        threads: int = 2,
        quantity: str = "bpd",
        sources: Sequence[str] | None = None,
        scored_folder: str | None = None,
        model: str | None = None,
        resize: Resize = "stretch",
    ) -> None:
        if quantity not in UNITS:
            raise ValueError(f"unknown heatmap quantity {quantity!r}; use one of "
                             f"{', '.join(UNITS)}")
        self.folder = Path(folder)
        self.quantity = quantity
        self.names = list(names)
        self.sources = None if sources is None else list(sources)
        self.scored_folder = scored_folder
        self.model = model
        self.resize = resize
        self.vmin, self.vmax, self.colormap = float(vmin), float(vmax), colormap
        self.table = colormap_table(colormap)
        self.n_written = 0
        self.n_failed = 0
        self.first_failure: str | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="heatmap")
        self._futures: list[Future[None]] = []

    def __call__(self, indices: Sequence[int], images: torch.Tensor,
                 maps: torch.Tensor, shapes: np.ndarray | None = None) -> None:
        """Queue heatmaps for a batch: uint8 ``(B, C, H, W)`` images, ``(B, H, W)`` maps,
        the files' upright ``(width, height)`` as ``(B, 2)`` (None: keep the square)."""
        if not len(indices):
            return
        self._slots.acquire()  # back-pressure: wait while the threads are behind
        kept = [None] * len(indices) if shapes is None else [
            (int(w), int(h)) for w, h in np.asarray(shapes).reshape(-1, 2)]
        future = self._pool.submit(self._write_batch, list(indices), images.numpy(),
                                   maps.float().numpy(), kept)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _write_batch(self, indices: list[int], images: np.ndarray, maps: np.ndarray,
                     shapes: list[tuple[int, int] | None]) -> None:
        for index, image, pixel_map, shape in zip(indices, images, maps, shapes,
                                                  strict=True):
            path = self.folder / self.names[index]
            try:
                rgb = render_heatmap(image, pixel_map, vmin=self.vmin, vmax=self.vmax,
                                     table=self.table)
                info = PngImagePlugin.PngInfo()
                if shape is not None:
                    rgb = in_source_shape(rgb, image.shape[-1], shape, self.resize)
                    shown = (f"its centred {min(shape)}x{min(shape)} square"
                             if self.resize == "crop" else "in its shape")
                    info.add_text(VIEW_KEY, f"{image.shape[-1]}x{image.shape[-1]} model view "
                                  f"({self.resize}) of a {shape[0]}x{shape[1]} file, {shown}")
                info.add_text(f"anomaly-flow:{self.quantity}",
                              repr(float(pixel_map.astype(np.float64).mean())))
                info.add_text("anomaly-flow:scale", f"{self.colormap} {self.vmin:g}.."
                              f"{self.vmax:g} {UNITS[self.quantity]} (fixed)")
                if self.sources is not None:
                    info.add_text(SOURCE_KEY, self.sources[index])
                if self.scored_folder is not None:
                    info.add_text(FOLDER_KEY, self.scored_folder)
                if self.model is not None:
                    info.add_text(MODEL_KEY, self.model)
                make_folders(path.parent)
                if os.path.lexists(path):
                    self._check_replaceable(path)
                # whole or not at all: a run killed mid-write must not leave a cut PNG
                # whose header still passes for this heatmap on --resume
                # short: the heatmap's own name may be near the file system's limit
                tmp = path.with_name(f".hm.{os.getpid()}.{secrets.token_hex(4)}.tmp")
                try:
                    Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1,
                                              pnginfo=info)
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
            except (OSError, ValueError) as exc:
                reason = f"{display_path(path)}: {exc}"
                with self._lock:  # logged in the order counted: the first is first_failure
                    self.n_failed += 1
                    self.first_failure = self.first_failure or reason
                    if self.n_failed <= FAILURES_LOGGED:  # a full disk fails every one
                        logger.warning("cannot write heatmap %s%s", one_line(reason),
                                       "; further failures are counted, not listed"
                                       if self.n_failed == FAILURES_LOGGED else "")
            else:
                with self._lock:
                    self.n_written += 1

    def _check_replaceable(self, path: Path) -> None:
        """Refuse (as a failure of this heatmap) to replace a file that is not a heatmap,
        or another scored folder's heatmap: one drawn by a run over another folder since
        this run's check before scoring (two runs at once, one heatmap folder)."""
        mark = heatmap_mark(path)
        if not mark.is_heatmap:
            raise OSError("it exists and is not a heatmap; it is left as it is")
        if self.scored_folder is not None and mark.folder not in (None, self.scored_folder):
            raise OSError(f"it is the heatmap of a file in another scored folder "
                          f"({one_line(mark.folder)}); it is left as it is")

    def remove_leftovers(self) -> int:
        """Delete the unfinished heatmaps (temp files) that a run killed outright left in
        the folders this writer writes to; returns how many went."""
        folders = {(self.folder / name).parent for name in self.names}
        return sum(remove_leftovers(folder, _TEMPORARY) for folder in sorted(folders))

    def discard(self, indices: Sequence[int]) -> int:
        """Delete the heatmaps an earlier run wrote for these dataset indices (files that
        fail now); only files :func:`is_heatmap` recognises. Returns how many went."""
        removed = 0
        for index in indices:
            path = self.folder / self.names[index]
            if path.is_file() and not path.is_symlink() and is_heatmap(path):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed

    def close(self) -> None:
        """Wait for every queued heatmap, then stop the threads (also when a write failed
        in a way that is not a file's own problem, which is raised here)."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._futures.clear()
            self._pool.shutdown(wait=True)

    def __enter__(self) -> HeatmapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
