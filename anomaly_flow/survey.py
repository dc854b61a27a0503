"""A look at a sample of a folder's images before a run: what converting them drops.

Training and scoring convert every image to the model's mode and size
(:func:`anomaly_flow.data.load_image`). Where that loses something a user would want to
know of (colour seen in grey, detail shrunk away, transparency on black, 12-bit data
stored dark in 16 bits, shapes the model never trained on), :func:`conversion_look`
says so in notes, judged from the headers (and, where cheap, the pixels) of up to 64
files spread over the folder, and records the image sizes it saw.

Example:
    >>> look = conversion_look(find_images(Path("parts/")), "L", 64)  # doctest: +SKIP
    >>> look.notes, describe_shapes(look.shapes)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import ExifTags, Image

from anomaly_flow.config import Resize
from anomaly_flow.data import (
    ALPHA_MODES,
    GREY_MODES,
    MAX_IMAGE_PIXELS,
    NARROW_SIXTEEN_BIT,
    SIXTEEN_BIT_MODES,
    ImageMode,
    display_path,
    has_more_frames,
    is_regular_file,
    warnings_caught,
)
from anomaly_flow.errors import one_line

_T = TypeVar("_T")


def _spread(paths: Sequence[Path], sample: int) -> list[Path]:
    """Up to ``sample`` of ``paths``, evenly spaced over the whole list (a stride of
    ``len // sample`` would look only at the first ``sample`` files of a list up to twice
    as long, never at the last ones)."""
    looked = min(sample, len(paths))
    spread = sorted({round(i * (len(paths) - 1) / max(1, looked - 1)) for i in range(looked)})
    return [paths[i] for i in spread]


def _with_header(path: Path, look: Callable[[Image.Image], _T]) -> _T | None:
    """``look(img)`` for the image file at ``path`` opened (its header read; ``look``
    decodes what it needs), or None for a file that is not regular (a pipe named .png
    would block), cannot be opened, or is above the pixel limit, and where ``look`` fails
    to decode it: the callers note what they can, and training and scoring report the
    files themselves."""
    try:
        if not is_regular_file(path):
            return None
        with warnings_caught():
            # PIL's warnings (a bomb, corrupt EXIF data): the run reports the file itself
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                return look(img) if img.width * img.height <= MAX_IMAGE_PIXELS else None
    except Exception:  # PIL's plugins raise many types for damaged data (SyntaxError for
        return None    # a broken PNG chunk past the first IDAT)


def _look_at(paths: Sequence[Path], sample: int, look: Callable[[Image.Image], None]
             ) -> None:
    """Call ``look`` on up to ``sample`` of ``paths`` spread over the list, as
    :func:`_with_header` opens them."""
    for path in _spread(paths, sample):
        _with_header(path, look)


def _shape_table(shapes: collections.Counter[tuple[int, int]]
                 ) -> tuple[tuple[int, int, int], ...]:
    return tuple((w, h, n) for (w, h), n in shapes.most_common())


def conversion_notes(paths: Sequence[Path], mode: ImageMode, size: int,
                     sample: int = 64, *, resizing: bool = True,
                     training: bool = True, resize: Resize = "stretch",
                     trained_shapes: Sequence[tuple[int, int, int]] = ()) -> list[str]:
    """:func:`conversion_look`'s notes."""
    return conversion_look(paths, mode, size, sample, resizing=resizing, training=training,
                           resize=resize, trained_shapes=trained_shapes).notes


class ConversionLook(NamedTuple):
    """What :func:`conversion_look` found in one pass over a sample of a folder's headers."""

    notes: list[str]
    # (width, height, count) of the images looked at, each upright (EXIF orientation
    # applied, from the header), most common first: what a model records of its training
    # folder (Glow.training_shapes), so that scoring can say when images come in a size
    # it never saw
    shapes: tuple[tuple[int, int, int], ...]


_JUDGED_KINDS = {"judged": "coloured", "with_alpha": "transparent", "floats": "unit_floats",
                 "wide": "narrow"}
"""What :func:`conversion_look` finds by decoding an image, by the count of images it
was judged among."""


def conversion_look(paths: Sequence[Path], mode: ImageMode, size: int,
                    sample: int = 64, *, resizing: bool = True,
                    training: bool = True, resize: Resize = "stretch",
                    trained_shapes: Sequence[tuple[int, int, int]] = ()) -> ConversionLook:
    """What converting images to ``mode`` and ``size`` (by ``resize``) drops, judged from up to
    ``sample`` of them spread over ``paths``: colour seen in grey (a model of grey images
    cannot see a colour defect; judged on the first 16 colour-mode images, and where
    those are all grey, on the others until one is in colour: JPEGs and images of up to
    4 megapixels), grey-mode images
    given to a colour model (repeated into three equal channels, unlike colour images: said
    of a folder that mixes the two; of one all grey, for training that a grey model would
    learn them from a third of the values, and for scoring (not ``training``) that a model
    trained on colour images would flag them), detail lost when most of them are
    larger than ``size``, an interpolation learned when most are at most half of it (both
    left out without ``resizing``), floating-point images scaled to 0..1 (read as 0..255,
    they are near black), 16- or 32-bit integer grey images most of which use only values
    below 4096 (8- or 12-bit data stored in more bits: divided by 257, they are dark),
    aspect ratios that
    differ, where ``resize`` makes that visible to the model, images a ``crop`` keeps
    less than half of, for training, files with several frames (only the first is read;
    scoring counts every such file itself), and, for scoring, images most of which come in
    a size unlike any of ``trained_shapes`` (the ``shapes`` of the model's training
    folder; unknown when empty); and the shapes of the images looked at. Only regular
    files within the pixel limit are looked at; others are passed over (training and
    scoring report them)."""
    seen: collections.Counter[str] = collections.Counter()  # images looked at, by kind
    first: dict[str, str] = {}  # the first file of each kind a note is about, to name it
    larger: collections.Counter[tuple[int, int]] = collections.Counter()
    smaller: collections.Counter[tuple[int, int]] = collections.Counter()
    shapes: collections.Counter[tuple[int, int]] = collections.Counter()

    def count(kind: str, img: Image.Image, found: bool = True) -> None:
        seen[kind] += found
        if found and img.filename:
            first.setdefault(kind, one_line(display_path(img.filename)))

    def look(img: Image.Image) -> None:
        # what needs the pixels first: a file whose decoding fails here is not counted
        # at all (the run reports it), so no note speaks of it
        pixels = img.width * img.height
        small = pixels <= 2**24  # decoded to judge it in a few ms
        judged: dict[str, bool] = {}  # kind -> found, under the kind's count of images
        # colour: 16 images, then (all grey so far: grey stored as RGB, say) the rest of
        # the sample until one is in colour, where each is quicker still to decode
        if mode == "L" and img.mode not in GREY_MODES and (img.format == "JPEG" or (
                pixels <= (2**24 if seen["judged"] < 16 else 2**22))) and (
                seen["judged"] < 16 or not seen["coloured"]):
            judged["judged"] = _in_colour(img)
        if (img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)) \
                and seen["with_alpha"] < 16 and small:
            judged["with_alpha"] = _has_transparency(img)
        if img.mode == "F" and small:
            if np.isnan(np.asarray(img)).any():  # refused when decoded: not judged here
                return
            low, high = img.getextrema()
            judged["floats"] = low >= 0.0 and high <= 1.0
        if img.mode in SIXTEEN_BIT_MODES and small:
            judged["wide"] = img.getextrema()[1] < NARROW_SIXTEEN_BIT
        # scoring counts them all, as it decodes them; a damaged later frame is not asked
        # about again: decoding reads the first alone
        layered = training and has_more_frames(img)
        seen["checked"] += 1
        shape = _upright_size(img)
        shapes[shape] += 1
        scaled = min(shape) if resize == "crop" else max(shape)  # to size
        if scaled > size:
            larger[shape] += 1
        elif 2 * scaled <= size:
            smaller[shape] += 1
        count("grey", img, mode == "RGB" and img.mode in GREY_MODES)  # a colour model takes
        for among, found in judged.items():
            seen[among] += 1
            count(_JUDGED_KINDS[among], img, found)
        seen["layered"] += layered

    _look_at(paths, sample, look)
    checked, grey, judged, coloured = (seen[k] for k in ("checked", "grey", "judged",
                                                           "coloured"))
    floats, unit_floats, wide, narrow = (seen[k] for k in ("floats", "unit_floats", "wide",
                                                           "narrow"))
    def eg(kind: str) -> str:
        return f" (e.g. {first[kind]})" if kind in first else ""

    notes = []
    if seen["layered"]:
        notes.append(f"{seen['layered']} of {checked} images looked at hold several frames or "
                     "pages (an animated GIF, PNG or WebP, a multi-page TIFF), and only the "
                     "first of each is read; to train on the others, save each frame as an "
                     "image file of its own")
    if coloured:
        notes.append(f"{coloured} of {judged} colour-mode images looked at are in colour"
                     f"{eg('coloured')}, and the model is grey (model.in_channels = 1): it "
                     "sees them in grey and cannot tell colours apart; for colour, train "
                     "with in_channels = 3 in a --config")
    if grey and grey < checked:
        notes.append(f"{grey} of {checked} images looked at are grey{eg('grey')}, and the "
                     "model is colour (model.in_channels = 3): each grey image is repeated "
                     "into three equal channels, so its likelihood is not comparable with a "
                     "colour image's" + (
                         ", and a model trained on both learns two kinds of image; use "
                         if training else " and it is likely flagged for being grey; use ")
                     + "colour images throughout, or a grey model (in_channels = 1) for grey "
                     "ones")
    elif grey and training:  # not wrong (MVTec's grey categories in a colour pipeline)
        notes.append(f"all {grey} images looked at are grey{eg('grey')}, and the model is "
                     "colour (model.in_channels = 3): each is repeated into three equal "
                     "channels, so two of every three values it learns carry nothing new; a "
                     "grey model (in_channels = 1) learns the same images from a third of "
                     "the values")
    elif grey:
        notes.append(f"all {grey} images looked at are grey{eg('grey')}, and the model is "
                     "colour "
                     "(model.in_channels = 3): each is repeated into three equal channels; "
                     "unless the model was trained on grey images too, their likelihoods "
                     "are unlike a colour image's and they are likely flagged for being grey")
    if unit_floats:
        notes.append(f"{unit_floats} of {floats} floating-point images looked at hold values "
                     f"in 0..1 only{eg('unit_floats')}, and float grey is read as 0..255 "
                     "(clipped), so they are near black to the model: save them scaled to "
                     "0..255, or as 8- or 16-bit images")
    if transparent := seen["transparent"]:
        notes.append(
            f"{transparent} of {seen['with_alpha']} images with an alpha channel or a "
            f"transparent colour looked at are partly transparent{eg('transparent')}, and "
            "transparent pixels are composited onto black: the model "
            + ("learns them on black" if training else "sees them on black, and where its "
               "training images were opaque or on another background, they are likely "
               "flagged for that alone")
            + "; to see them on their own background, flatten them onto it before "
            + ("training" if training else "scoring"))
    if 2 * narrow > wide:  # most: a stray dark frame among full-range ones is no sign
        notes.append(f"{narrow} of {wide} 16- or 32-bit integer grey images looked at use "
                     f"only values below {NARROW_SIXTEEN_BIT}{eg('narrow')} (8- or 12-bit "
                     "data stored in more bits?), and integer grey is scaled to 8 bits as "
                     "16-bit grey is, by 1/257, so they are dark to the model: scale them to "
                     "the full 0..65535 range, or save them as 8-bit images")
    n_larger = sum(larger.values())
    if resizing and checked and 2 * n_larger > checked:
        (width, height), _ = larger.most_common(1)[0]
        share = "all" if n_larger == checked else f"{n_larger} of {checked}"
        notes.append(f"{share} images looked at are larger than {size}×{size} (e.g. "
                     f"{width}×{height}) and are resized to {size}×{size} (model.image_size) "
                     "for training and scoring: detail finer than that is lost; to keep "
                     f"it, train with a larger model.image_size ({_larger_presets(mode, size)})")
    n_smaller = sum(smaller.values())
    if resizing and checked and 2 * n_smaller > checked:
        (width, height), _ = smaller.most_common(1)[0]
        share = "all" if n_smaller == checked else f"{n_smaller} of {checked}"
        side = min(width, height) if resize == "crop" else max(width, height)
        shown = (f"{width}×{height}, whose centred square is {side}×{side}"
                 if resize == "crop" and width != height else f"{width}×{height}")
        notes.append(f"{share} images looked at are at most half of {size}×{size} (e.g. "
                     f"{shown}) and are enlarged to it (model.image_size): the model learns "
                     "the interpolation as much as the images, at several times the cost of "
                     f"their own size; train with a model.image_size near {side} (a multiple "
                     "of 2**levels; train --config FILE)")
    if note := _mixed_shapes_note(shapes, size, resize):
        notes.append(note)
    if not training and (note := _unseen_shapes_note(shapes, trained_shapes, size, resize)):
        notes.append(note)
    long = collections.Counter({shape: n for shape, n in shapes.items()
                                if resize == "crop" and max(shape) > 2 * min(shape)})
    if long:
        (width, height), _ = long.most_common(1)[0]
        n_long = sum(long.values())
        share = "all" if n_long == checked else f"{n_long} of {checked}"
        notes.append(f"{share} images looked at have one side more than twice the other "
                     f"(e.g. {width}×{height}), and the centred "
                     "square (model.resize = 'crop') keeps less than half of each: what lies "
                     "beyond it is neither learned nor scored; cut the files to the part that "
                     "matters, in one aspect ratio, or train with model.resize = 'pad', which "
                     "sees the whole image, on black bars as wide as its shape leaves")
    return ConversionLook(notes, _shape_table(shapes))


def _larger_presets(mode: ImageMode, size: int) -> str:
    """Where a larger ``model.image_size`` than ``size`` comes from: the shipped presets
    for ``mode`` that have one, smallest first, then a config file."""
    from anomaly_flow.config import PRESETS, load_preset  # config is above data

    sizes = {name: load_preset(name).model for name in PRESETS}
    larger = sorted((model.image_size, name) for name, model in sizes.items()
                    if model.mode == mode and model.image_size > size)
    named = ", ".join(f"preset {name} has {side}×{side}" for side, name in larger)
    return f"{named}; or train --config FILE" if named else "train --config FILE"


def _mixed_shapes_note(shapes: collections.Counter[tuple[int, int]], size: int,
                       resize: Resize) -> str | None:
    """A note when the images looked at (their ``(width, height)`` counts) differ in aspect
    ratio by more than a tenth and ``resize`` shows it: stretched to a square, their shapes
    are distorted unequally; padded, their black bars differ; either way an image whose
    shape the model did not learn looks unlikely for that alone. A centred crop keeps
    the content undistorted and shows no bars (what it cuts off is documented)."""
    if not shapes or resize == "crop":
        return None
    ratios = {shape: shape[0] / shape[1] for shape in shapes}
    widest, tallest = max(ratios, key=ratios.__getitem__), min(ratios, key=ratios.__getitem__)
    if ratios[widest] <= 1.1 * ratios[tallest]:
        return None
    shown = " and ".join(f"{w}×{h}" for w, h in (widest, tallest))
    crop = ("or train with model.resize = 'crop' (train --config FILE): the centred square, "
            "undistorted and without bars, though what lies outside it goes unseen")
    if resize == "pad":
        return (f"the images looked at differ in aspect ratio (e.g. {shown}), and each is "
                f"fitted inside {size}×{size} on black bars of its own width (model.resize "
                "= 'pad'): an image of a shape the model rarely trained on can be flagged "
                f"for its bars alone; crop or pad the files to one aspect ratio, {crop}")
    return (f"the images looked at differ in aspect ratio (e.g. {shown}), and each is "
            f"stretched to {size}×{size} (model.resize = 'stretch': the aspect ratio is not "
            "kept): unequally distorted, an image of a shape the model rarely trained on "
            "can be flagged for its shape alone; crop or pad the files to one aspect "
            f"ratio, {crop}")


def describe_shapes(shapes: Sequence[tuple[int, int, int]], most: int = 5) -> str:
    """:attr:`ConversionLook.shapes` in words: ``28×28 (all 64 looked at)``, or the
    ``most`` commonest with their counts, ``640×480 (60), 480×640 (4) of 64 looked at``;
    ``unknown`` for none."""
    if not shapes:
        return "unknown"
    total = sum(n for _, _, n in shapes)
    if len(shapes) == 1:
        return f"{shapes[0][0]}×{shapes[0][1]} (all {total} looked at)"
    listed = ", ".join(f"{w}×{h} ({n})" for w, h, n in shapes[:most])
    more = f" and {len(shapes) - most} other sizes" if len(shapes) > most else ""
    return f"{listed}{more} of {total} looked at"


SHAPE_TOLERANCE = 0.1
"""How far (a fraction of each side) an image's size may be from a training image's for
:func:`conversion_notes` to count it as a size the model trained on."""


def _unseen_shapes_note(shapes: collections.Counter[tuple[int, int]],
                        trained: Sequence[tuple[int, int, int]], size: int,
                        resize: Resize = "stretch") -> str | None:
    """A note when most of the images looked at (their ``(width, height)`` counts) have a
    size no training image looked at had (within :data:`SHAPE_TOLERANCE` of each side;
    under ``crop``, of the centred square's side, all the model sees): brought to the
    model's size from another one, their detail, and with another aspect ratio their
    proportions or bars, differ from every training image's, so they can score as
    anomalous for that alone. Images brought down to the model's size from twice it or
    more, as a training image of their aspect ratio (within the same tolerance; any,
    under ``crop``) was, count as seen: both lose their finest detail alike, whatever
    their size. None when the training shapes are unknown."""
    if not trained or not shapes:
        return None

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= SHAPE_TOLERANCE * b

    def reduced(width: int, height: int) -> bool:  # halved or more on the way to size
        # pad scales by the longer side; crop, and stretch (each side on its own), by
        # the shorter one, or what is enlarged there too
        return (max(width, height) if resize == "pad" else min(width, height)) >= 2 * size

    def alike(shape: tuple[int, int], w: int, h: int) -> bool:
        if reduced(*shape) and reduced(w, h) and (
                resize == "crop" or near(shape[0] / shape[1], w / h)):
            return True
        if resize == "crop":
            return near(min(shape), min(w, h))
        return near(shape[0], w) and near(shape[1], h)

    def seen(shape: tuple[int, int]) -> bool:
        return any(alike(shape, w, h) for w, h, _ in trained)

    unseen = collections.Counter({shape: n for shape, n in shapes.items() if not seen(shape)})
    n_unseen, checked = sum(unseen.values()), sum(shapes.values())
    if 2 * n_unseen <= checked:
        return None
    (width, height), _ = unseen.most_common(1)[0]
    share = "all" if n_unseen == checked else f"{n_unseen} of {checked}"
    listed = [f"{w}×{h}" for w, h, _ in trained[:3]]
    known = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
    came = (f"came in {len(trained)} sizes, among them {known}" if len(trained) > 3
            else f"were {known}")
    return (f"{share} images looked at are of a size none of the model's training images "
            f"looked at had (e.g. {width}×{height}; the training images {came}): "
            f"brought to {size}×{size} (model.image_size) from another size than they were, "
            "their detail (and proportions, where the aspect ratio differs) is unlike every "
            "training image's, which alone can make them score as anomalous; score images "
            "from the same source and size as the training images, or train a model on "
            "images like these")


_HEADER_EXIF = frozenset({"JPEG", "MPO", "TIFF", "WEBP"})
"""Formats whose EXIF block Pillow reads with the header, before any pixel is decoded."""


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as the model sees the image: after its EXIF orientation (a
    quarter turn, 5 to 8, swaps them), which decoding applies
    (:func:`anomaly_flow.data.image_to_array`)."""
    if img.format not in _HEADER_EXIF and "exif" not in img.info:
        return img.size  # a PNG's getexif() would decode the whole image to look for it
    try:
        turned = img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    except Exception:  # a damaged EXIF block: decoding ignores it too
        turned = False
    return (img.height, img.width) if turned else img.size


def _has_transparency(img: Image.Image) -> bool:
    """Whether any pixel of an image with alpha (or a palette's transparent colour) is
    less than opaque, as decoding composites it (:func:`anomaly_flow.data.image_to_array`)."""
    alpha = img.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255


def _in_colour(img: Image.Image) -> bool:
    """Whether an image's pixels differ between channels beyond a JPEG's rounding (grey
    stored as RGB is not colour)."""
    img.draft("RGB", (64, 64))  # JPEG: decode at a fraction of the size
    small = img.convert("RGB")
    small.thumbnail((64, 64))
    rgb = np.asarray(small, dtype=np.int16)
    return bool(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() > 2)
