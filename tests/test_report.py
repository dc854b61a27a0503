"""The self-contained HTML report: what a reader (or a screen reader) gets of each card."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser

import numpy as np

from anomaly_flow import report


class _Page(HTMLParser):
    """The tags, the alt text of every image and the text between tags, as a browser
    decodes them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.alts: list[str | None] = []
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.alts.append(dict(attrs).get("alt"))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _read(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_each_card_names_its_image_and_heatmap_and_escapes_the_file_name() -> None:
    hostile = "a<b>&'\"c.png"  # a file name that would break an attribute or add a tag
    items = [report.GalleryItem(title=title, image=np.zeros((4, 4), np.uint8),
                                heatmap=np.zeros((8, 8, 3), np.uint8), score=1.5,
                                is_anomaly=True, note=note)
             for title, note in (("bag", hostile), ("normal", "sneaker_00001.png"))]
    page = _read(report.gallery_section(items))
    assert page.alts == [f"bag, {hostile}", f"heatmap of bag, {hostile}",
                         "normal, sneaker_00001.png", "heatmap of normal, sneaker_00001.png"]
    assert hostile in page.text and "b" not in page.tags  # no tag <b> made of the name


def test_a_card_without_a_heatmap_has_one_image() -> None:
    item = report.GalleryItem(title="coat", image=np.zeros((4, 4, 3), np.uint8), heatmap=None,
                              score=float("nan"), is_anomaly=None, note="coat_1.png")
    page = _read(report.gallery_section([item]))
    assert page.alts == ["coat, coat_1.png"]


def test_notes_are_text() -> None:
    """A note may name a file (``a<b>&c``): it is escaped, as every other text is."""
    for section in (report.table_section([{"a": 1}], note="see a<b>&c"),
                    report.gallery_section([], note="see a<b>&c")):
        page = _read(section)
        assert "see a<b>&c" in "".join(page.text) and "b" not in page.tags


def test_a_report_that_cannot_be_written_is_a_data_error_and_leaves_no_temporary_file(
        tmp_path) -> None:
    import pytest

    from anomaly_flow.data import DataError

    page = "<html><body>report</body></html>"
    path = report.write_report(tmp_path / "out" / "report.html", page)
    assert path.read_text(encoding="utf-8") == page
    taken = tmp_path / "taken"
    (taken / "report.html").mkdir(parents=True)  # a folder where the page would go
    with pytest.raises(DataError, match=re.escape(
            f"cannot write the report {taken / 'report.html'}: Is a directory")):
        report.write_report(taken / "report.html", page)
    assert os.listdir(taken) == ["report.html"]  # the page written beside it is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=re.escape(
            f"cannot write the report {tmp_path / 'file' / 'report.html'}: File exists")):
        report.write_report(tmp_path / "file" / "report.html", page)
