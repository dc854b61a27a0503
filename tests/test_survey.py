"""Tests for anomaly_flow.survey: the notes on what converting real image files drops."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anomaly_flow.data import load_image, try_load_image
from anomaly_flow.survey import conversion_look, conversion_notes, describe_shapes
from tests.conftest import FILE_EDITS, damaged
from tests.test_data import ENCODED, save


def test_conversion_notes_say_what_a_grey_or_smaller_model_drops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
            tmp_path / f"colour-{i}.png")
        grey = np.repeat(rng.integers(0, 256, (40, 30, 1), dtype=np.uint8), 3, axis=2)
        Image.fromarray(grey).save(tmp_path / f"grey-as-rgb-{i}.jpg", quality=90)
    os.mkfifo(tmp_path / "pipe.png")  # listed by find_images; opening it would block
    paths = sorted(tmp_path.iterdir())
    colour, size = conversion_notes(paths, "L", 16)
    assert colour.startswith(f"4 of 8 colour-mode images looked at are in colour (e.g. "
                             f"{tmp_path / 'colour-0.png'}), and the model is grey")
    assert size.startswith("all images looked at are larger than 16×16 (e.g. 30×40) and are "
                           "resized to 16×16 (model.image_size)")
    assert size.endswith("to keep it, train with a larger model.image_size (preset small has "
                         "28×28, preset fashion-mnist has 32×32; or train --config FILE)")
    assert conversion_notes(paths, "RGB", 40) == []  # colour kept, nothing shrunk
    greys = [p for p in paths if p.suffix == ".jpg"]  # grey stored as RGB JPEG: no colour
    assert conversion_notes(greys, "L", 64) == []
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):  # the most common size is small, but most images are large
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(small / f"a-{i}.png")
    for i, side in enumerate((40, 48, 56, 64)):
        Image.fromarray(np.zeros((side, side), np.uint8)).save(small / f"b-{i}.png")
    (note,) = conversion_notes(sorted(small.iterdir()), "L", 32)
    assert note.startswith("4 of 7 images looked at are larger than 32×32")
    assert note.endswith("(train --config FILE)")  # no shipped preset is larger than 32
    assert conversion_notes(sorted(small.iterdir()), "L", 32, resizing=False) == []


def test_colour_after_sixteen_grey_rgb_images_is_still_seen(tmp_path: Path) -> None:
    """The first 16 colour-mode images of the sample hold grey pixels (grey stored as RGB,
    RGBA): the look goes on through the sample until it meets one in colour, and stops
    judging there."""
    rng = np.random.default_rng(1)
    for i in range(20):
        grey = np.repeat(rng.integers(0, 256, (12, 12, 1), dtype=np.uint8), 4, axis=2)
        grey[..., 3] = 255
        Image.fromarray(grey, "RGBA").save(tmp_path / f"a-grey-{i:02d}.png")
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"b-colour-{i:02d}.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 12)
    assert note.startswith(f"1 of 21 colour-mode images looked at are in colour (e.g. "
                           f"{tmp_path / 'b-colour-00.png'}), and the model is grey"), note
    # grey alone: all forty judged, none in colour, no note
    assert conversion_notes(sorted(tmp_path.glob("a-*")), "L", 12) == []


def test_conversion_notes_say_when_images_differ_in_aspect_ratio(tmp_path: Path) -> None:
    """Each image is stretched to a square: a folder of one shape is distorted alike, one
    that mixes shapes is not, which was said nowhere."""
    for i in range(3):
        Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / f"wide-{i}.png")
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "wide-large.png")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(tmp_path / "near.png")  # within 10%
    alike = sorted(tmp_path.iterdir())
    assert conversion_notes(alike, "L", 64, resizing=False) == []
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "tall.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 64, training=False)
    crop = ("or train with model.resize = 'crop' (train --config FILE): the centred square, "
            "undistorted and without bars, though what lies outside it goes unseen")
    assert note == ("the images looked at differ in aspect ratio (e.g. 40×30 and 30×40), and "
                    "each is stretched to 64×64 (model.resize = 'stretch': the aspect ratio is "
                    "not kept): unequally distorted, an image of a shape the model rarely "
                    "trained on can be flagged for its shape alone; crop or pad the files to "
                    f"one aspect ratio, {crop}")
    mixed = sorted(tmp_path.iterdir())
    (padded,) = conversion_notes(mixed, "L", 64, training=False, resize="pad")
    assert padded == ("the images looked at differ in aspect ratio (e.g. 40×30 and 30×40), "
                      "and each is fitted inside 64×64 on black bars of its own width "
                      "(model.resize = 'pad'): an image of a shape the model rarely trained "
                      "on can be flagged for its bars alone; crop or pad the files to one "
                      f"aspect ratio, {crop}")
    assert conversion_notes(mixed, "L", 64, resizing=False, resize="crop") == []
    # a crop shrinks only images whose shorter side is larger (here the 400×300 alone)
    assert conversion_notes(mixed, "L", 32, resize="crop") == []
    assert "6 of 6 images looked at are larger than 32×32" not in " ".join(
        conversion_notes(mixed, "L", 32))
    assert conversion_notes(mixed, "L", 32)[0].startswith("all images looked at are larger")
    assert conversion_notes([], "L", 64) == []


def test_conversion_notes_say_when_images_are_enlarged_or_mostly_cropped_away(
        tmp_path: Path) -> None:
    """Images at most half the model's side are enlarged (the model learns the
    interpolation); a crop of an image with one side more than twice the other keeps less
    than half of it. Which side counts follows ``resize``: a crop scales the shorter one."""
    for i in range(3):
        Image.fromarray(np.zeros((12, 40), np.uint8)).save(tmp_path / f"strip-{i}.png")
    strips = sorted(tmp_path.iterdir())
    (enlarged,) = conversion_notes(strips, "L", 80)  # 40 of 80: enlarged twice
    assert enlarged == ("all images looked at are at most half of 80×80 (e.g. 40×12) and are "
                        "enlarged to it (model.image_size): the model learns the interpolation "
                        "as much as the images, at several times the cost of their own size; "
                        "train with a model.image_size near 40 (a multiple of 2**levels; train "
                        "--config FILE)")
    assert conversion_notes(strips, "L", 80, resizing=False) == []  # scoring: training's say
    assert conversion_notes(strips, "L", 64) == []  # 40 of 64: more than half
    cropped = conversion_notes(strips, "L", 16, resize="crop")  # 12 of 16: more than half
    assert cropped == ["all images looked at have one side more than twice the other "
                       "(e.g. 40×12), and the centred square (model.resize = 'crop') keeps "
                       "less than half of each: what lies beyond it is neither learned nor "
                       "scored; cut the files to the part that matters, in one aspect "
                       "ratio, or train with model.resize = 'pad', which sees the whole "
                       "image, on black bars as wide as its shape leaves"]
    assert conversion_notes(strips, "L", 24, resize="crop")[0].startswith(
        "all images looked at are at most half of 24×24 (e.g. 40×12, whose centred square is "
        "12×12) and are enlarged")


def test_conversion_notes_look_at_files_spread_over_the_whole_list(tmp_path: Path) -> None:
    """120 files, the last 20 tall: the 64 looked at reach the end of the list (a stride
    of 120 // 64 = 1 looked only at the first 64, all wide, and said nothing)."""
    for i in range(100):
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / f"a-{i:03d}.png")
    for i in range(20):
        Image.fromarray(np.zeros((4, 3), np.uint8)).save(tmp_path / f"p-{i:02d}.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 4)
    assert note.startswith("the images looked at differ in aspect ratio (e.g. 4×3 and 3×4)")


def test_conversion_notes_judge_shapes_as_the_exif_orientation_turns_them(
        tmp_path: Path) -> None:
    """Two 40×30 JPEGs, one marked as turned a quarter (orientation 6): the model sees one
    wide and one tall image, so their aspect ratios differ."""
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = np.full((30, 40), 200, np.uint8)
    save(Image.fromarray(wide), tmp_path / "a.jpg")
    assert conversion_notes([tmp_path / "a.jpg"], "L", 64, resizing=False) == []
    save(Image.fromarray(wide), tmp_path / "b.jpg", exif=exif)
    # fitted as 48×64 (turned: tall) and 64×48: bars at the sides, then above and below
    tall, wide_too = (load_image(tmp_path / name, "L", 64, "pad")[0] for name in ("b.jpg",
                                                                               "a.jpg"))
    assert tall[:, :8].max() == 0 and tall[:8, 16:48].min() > 150
    assert wide_too[:8, :].max() == 0 and wide_too[16:48, :8].min() > 150
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 64, resize="pad")
    assert note.startswith("the images looked at differ in aspect ratio (e.g. 40×30 and 30×40)")


def test_image_shapes_record_the_upright_sizes_of_a_sample(tmp_path: Path) -> None:
    """What a model keeps of its training folder's sizes: counted upright (an EXIF
    quarter turn swaps the sides), most common first; files that are not images or not
    regular files are passed over, and a sample spreads over the whole list."""
    for i in range(3):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / f"a-{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(np.zeros((30, 40), np.uint8)), tmp_path / "b.jpg", exif=exif)
    (tmp_path / "c.png").write_text("not an image")
    os.mkfifo(tmp_path / "d.png")  # opening it would block
    paths = sorted(tmp_path.iterdir())

    def shapes(paths: list[Path], sample: int = 64) -> tuple[tuple[int, int, int], ...]:
        return conversion_look(paths, "L", 28, sample).shapes

    assert shapes(paths) == ((28, 28, 3), (30, 40, 1))
    assert describe_shapes(shapes(paths)) == "28×28 (3), 30×40 (1) of 4 looked at"
    assert describe_shapes(((28, 28, 64),)) == "28×28 (all 64 looked at)"
    assert describe_shapes(tuple((i, i, 1) for i in range(1, 8))) == (
        "1×1 (1), 2×2 (1), 3×3 (1), 4×4 (1), 5×5 (1) and 2 other sizes of 7 looked at")
    assert describe_shapes(()) == "unknown"
    assert shapes([]) == ()
    # two of a list of four: the first and the last
    assert shapes([*paths[:3], tmp_path / "b.jpg"], sample=2) == ((28, 28, 1), (30, 40, 1))


def test_scoring_notes_say_when_images_come_in_a_size_the_model_never_trained_on(
        tmp_path: Path) -> None:
    """A model trained on 28×28 images scores a folder of 64×48 ones: each is resized
    from another size, which alone can make it look anomalous. Said for scoring only,
    when most images are of such a size, a side more than 10 % from every training
    size's (under crop, the centred square's: all the model sees); not when the training
    sizes are unknown."""
    for i in range(3):
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / f"photo-{i}.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "known.png")
    paths = sorted(tmp_path.iterdir())
    trained = ((28, 28, 60), (30, 30, 4))
    score = {"resizing": False, "training": False, "resize": "crop"}  # crop: no aspect note
    (note,) = conversion_notes(paths, "L", 16, **score, trained_shapes=trained)
    assert note == ("3 of 4 images looked at are of a size none of the model's training "
                    "images looked at had (e.g. 64×48; the training images were 28×28 and "
                    "30×30): brought to 16×16 (model.image_size) from another size than "
                    "they were, their detail (and proportions, where the aspect ratio "
                    "differs) is unlike every training image's, which alone can make them "
                    "score as anomalous; score images from the same source and size as the "
                    "training images, or train a model on images like these")
    assert conversion_notes(paths, "L", 16, **score) == []  # sizes unknown
    assert conversion_notes(paths, "L", 16, resizing=False, resize="crop",
                            trained_shapes=trained) == []  # training judges its own folder
    assert conversion_notes(paths[1:], "L", 16, **score, trained_shapes=trained) != []
    half = paths[:2]  # known.png and one photo: not most
    assert conversion_notes(half, "L", 16, **score, trained_shapes=trained) == []
    # within 10 % of a training size on each side counts as that size
    stretch = {**score, "resize": "stretch"}

    def unseen(way: dict[str, object], trained: tuple[tuple[int, int, int], ...],
               size: int = 16) -> bool:
        notes = conversion_notes(paths, "L", size, **way, trained_shapes=trained)
        return any("of a size none of" in note for note in notes)  # (stretch: aspect too)

    for way in (score, stretch):
        assert not unseen(way, ((60, 52, 1), (28, 28, 5))), way
        assert unseen(way, ((25, 19, 1),)), way  # smaller than the model: enlarged
        # at 32×32 the photo is not halved on its way: the 10 % tolerance alone decides
        assert not unseen(way, ((60, 52, 1),), size=32), way  # 64/60, 48/52: within
        assert unseen(way, ((57, 43, 1),), size=32), way  # 48 is 12 % above 43
    # brought down from twice the model's size or more, a 64×48 photo loses its finest
    # detail as a 57×43 one does (48 is 12 % above 43, but the aspect ratio is the same)
    assert not unseen(stretch, ((57, 43, 1),)) and not unseen(score, ((57, 43, 1),))
    assert not unseen(stretch, ((200, 150, 1),))
    assert unseen(stretch, ((150, 150, 1),))  # square: not the photo's proportions
    assert not unseen(score, ((150, 150, 1),))  # under crop, only the square counts
    # a crop sees 48×48 of a 64×48 photo and of an 80×48 one alike; a stretch does not
    wider = ((80, 48, 1), (28, 28, 5))
    assert not unseen(score, wider) and unseen(stretch, wider)
    many = tuple((20 + i, 20, 1) for i in range(5))
    (listed,) = conversion_notes(paths, "L", 16, **score, trained_shapes=many)
    assert "the training images came in 5 sizes, among them 20×20, 21×20 and 22×20)" in listed


def test_conversion_notes_say_when_a_colour_model_takes_grey_images(tmp_path: Path) -> None:
    """The reverse of a grey model seeing colour: grey images (8- and 16-bit) repeated
    into three channels are nothing like the colour images a colour model knows."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"colour-{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(
        tmp_path / "g16.png")
    paths = sorted(tmp_path.iterdir())
    (note,) = conversion_notes(paths, "RGB", 16)
    assert note == (f"2 of 5 images looked at are grey (e.g. {tmp_path / 'g.png'}), and the "
                    "model is colour (model.in_channels = 3): each grey image is repeated into "
                    "three equal channels, so its likelihood is not comparable with a colour "
                    "image's, and a model trained on both learns two kinds of image; use "
                    "colour images throughout, or a grey model (in_channels = 1) for grey ones")
    (scored,) = conversion_notes(paths, "RGB", 16, training=False)
    assert scored.startswith(f"2 of 5 images looked at are grey (e.g. {tmp_path / 'g.png'})")
    assert "colour image's and it is likely flagged for being grey; use colour" in scored
    assert int(load_image(tmp_path / "g.png", "RGB", 16).std(axis=0).max()) == 0  # as said
    assert conversion_notes([p for p in paths if "colour" in p.name], "RGB", 16) == []
    # all grey: a colour model may be trained on them (MVTec's grey categories), and
    # knows them, though a grey one would do with a third of the values; scored, they are
    # what a model trained on colour would flag
    greys = [p for p in paths if p.name.startswith("g")]
    assert conversion_notes(greys, "RGB", 16) == [
        f"all 2 images looked at are grey (e.g. {tmp_path / 'g.png'}), and the model is "
        "colour (model.in_channels = 3): each is repeated into three equal channels, so two "
        "of every three values it learns carry nothing new; a grey model (in_channels = 1) "
        "learns the same images from a third of the values"]
    assert conversion_notes(greys, "RGB", 16, resizing=False, training=False) == [
        f"all 2 images looked at are grey (e.g. {tmp_path / 'g.png'}), and the model is "
        "colour (model.in_channels = 3): "
        "each is repeated into three equal channels; unless the model was trained on grey "
        "images too, their likelihoods are unlike a colour image's and they are likely "
        "flagged for being grey"]


def test_conversion_notes_say_when_transparent_pixels_are_seen_on_black(
        tmp_path: Path) -> None:
    """A cut-out product shot on a transparent background is seen on black: scored by a
    model of opaque images, every one was flagged, and nothing said why."""
    rng = np.random.default_rng(3)
    disc = np.zeros((16, 16, 4), dtype=np.uint8)
    disc[..., :3] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    disc[4:12, 4:12, 3] = 255  # opaque in the middle, transparent around it
    Image.fromarray(disc, "RGBA").save(tmp_path / "a-cutout.png")
    half = disc.copy()
    half[..., 3] = 128  # half transparent throughout
    Image.fromarray(half, "RGBA").save(tmp_path / "b-faded.webp", lossless=True)
    palette = Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(tmp_path / "c-palette.png", transparency=0)
    opaque = disc.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "d-opaque.png")
    Image.fromarray(opaque[..., :3]).save(tmp_path / "e-plain.png")
    paths = sorted(tmp_path.iterdir())
    (trained,) = conversion_notes(paths, "RGB", 16)
    assert trained == (f"3 of 4 images with an alpha channel or a transparent colour looked at "
                       f"are partly transparent (e.g. {tmp_path / 'a-cutout.png'}), and "
                       "transparent pixels are composited onto black: the model learns them "
                       "on black; to see them on their own background, flatten them onto it "
                       "before training")
    assert load_image(tmp_path / "a-cutout.png", "RGB", 16)[:, 0, 0].tolist() == [0, 0, 0]
    notes = conversion_notes(paths, "RGB", 16, training=False)
    assert any(note.endswith("they are likely flagged for that alone; to see them on their "
                             "own background, flatten them onto it before scoring")
               for note in notes), notes
    assert conversion_notes(paths[3:], "RGB", 16, training=False) == []  # opaque: no word


def test_conversion_notes_say_when_float_images_are_scaled_to_one(tmp_path: Path) -> None:
    """Float grey is read as 0..255: a float TIFF in 0..1 is near black to the model."""
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.random((16, 16), dtype=np.float32), mode="F").save(
            tmp_path / f"unit-{i}.tiff")
    Image.fromarray(rng.random((16, 16), dtype=np.float32) * 255, mode="F").save(
        tmp_path / "full.tiff")
    paths = sorted(tmp_path.iterdir())
    (note,) = conversion_notes(paths, "L", 16)
    assert note.startswith("3 of 4 floating-point images looked at hold values in 0..1 only")
    assert load_image(tmp_path / "unit-0.tiff", "L", 16).max() <= 1  # as the note says
    assert conversion_notes([tmp_path / "full.tiff"], "L", 16) == []
    # images holding NaN are refused when decoded, so no note speaks of them
    for i in range(3):
        unit = rng.random((16, 16), dtype=np.float32)
        unit[0, 0] = np.nan
        Image.fromarray(unit, mode="F").save(tmp_path / f"unit-{i}.tiff")
    assert conversion_notes(paths, "L", 16) == []


def test_conversion_notes_say_when_16_bit_images_hold_fewer_bits(tmp_path: Path) -> None:
    """16-bit grey is scaled by 1/257: 12-bit camera data, or 8-bit values in a 32-bit
    TIFF, come out in the darkest sixteenth."""
    rng = np.random.default_rng(2)
    for i in range(2):  # 12-bit data in a 16-bit PNG
        Image.fromarray(rng.integers(0, 4096, (16, 16), dtype=np.uint16)).save(
            tmp_path / f"twelve-{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.int32), mode="I").save(
        tmp_path / "eight-in-32.tiff")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(
        tmp_path / "full.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 16)
    assert note.startswith("3 of 4 16- or 32-bit integer grey images looked at use only "
                           "values below 4096")
    assert load_image(tmp_path / "twelve-0.png", "L", 16).max() <= 16  # as the note says
    assert conversion_notes([tmp_path / "full.png"], "L", 16) == []
    # one dark frame among full-range images is no sign of 12-bit data: scaling it to the
    # full range, as the note would say, is wrong for it
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(
            mixed / f"full-{i}.png")
    Image.fromarray(rng.integers(0, 100, (16, 16), dtype=np.uint16)).save(mixed / "dark.png")
    assert conversion_notes(sorted(mixed.iterdir()), "L", 16) == []


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(sorted(ENCODED)), edits=FILE_EDITS,
       mode=st.sampled_from(["L", "RGB"]), training=st.booleans())
def test_damaged_image_files_are_passed_over_by_the_conversion_look(
        kind: str, edits: list[tuple[str, float, bytes]], mode: str, training: bool) -> None:
    """The look before training and scoring decodes a sample of the files (colour,
    transparency, value range): a damaged one is left to the run to report, never raised."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        path = Path(folder) / f"damaged.{kind}"
        path.write_bytes(damaged(ENCODED[kind], edits))
        looked = conversion_look([path], mode, 16, training=training)
    assert all(isinstance(note, str) and note for note in looked.notes)
    assert not said, [str(w.message) for w in said]  # PIL's, raw on the user's terminal


def broken_past_first_idat(path: Path, img: Image.Image) -> None:
    """Save ``img`` as a PNG of several IDAT chunks whose second chunk's type is zeroed:
    the header and the first rows read, then PIL raises SyntaxError ("broken PNG file")."""
    img.save(path)
    encoded = bytearray(path.read_bytes())
    second = encoded.find(b"IDAT", encoded.find(b"IDAT") + 4)
    assert second > 0, "the image is too small to be written in several IDAT chunks"
    encoded[second:second + 4] = bytes(4)
    path.write_bytes(bytes(encoded))


def test_a_png_broken_past_its_first_chunk_is_reported_by_the_run_not_raised_by_the_look(
        tmp_path: Path) -> None:
    """The colour and transparency checks decode the whole image; PIL's SyntaxError for a
    chunk broken after the first IDAT once stopped training and scoring with a traceback."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
            tmp_path / f"grey-{i}.png")
    pixels = rng.integers(0, 256, (300, 300, 4), dtype=np.uint8)
    broken_past_first_idat(tmp_path / "colour.png", Image.fromarray(pixels[..., :3]))
    broken_past_first_idat(tmp_path / "alpha.png", Image.fromarray(pixels, "RGBA"))
    paths = sorted(tmp_path.iterdir())
    for mode in ("L", "RGB"):
        for training in (True, False):
            looked = conversion_look(paths, mode, 16, training=training)
            if mode == "L":  # both decoded to judge their colour, and found damaged:
                # neither counted, so no note speaks of their 300×300
                assert looked.shapes == ((28, 28, 3),)
                assert not any("300" in note for note in looked.notes), looked.notes
    for name in ("colour.png", "alpha.png"):
        image, reason = try_load_image(tmp_path / name, "RGB", 16)
        assert image is None and "broken PNG file" in reason, reason
