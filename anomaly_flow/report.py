"""A self-contained HTML report: tables, figures and images inlined as base64.

The page needs no server and no other file: it can be mailed, archived as an MLflow
artifact, or opened from disk.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from anomaly_flow.data import DataError, display_path
from anomaly_flow.folders import replace_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.figs img { max-width: 520px; margin: 0 1em 1em 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; padding: 6px; font-size: 12px; width: 150px; }
.card img { width: 68px; image-rendering: pixelated; }
.anom { color: #b00; font-weight: bold; } .norm { color: #070; }
code { background: #f3f3f3; padding: 1px 4px; }
"""


@dataclass(frozen=True)
class GalleryItem:
    """One scored image shown in the report, with its likelihood heatmap."""

    title: str
    image: np.ndarray  # uint8 (H, W) or (H, W, 3)
    heatmap: np.ndarray | None  # uint8 (H, W, 3) overlay, or None
    score: float
    is_anomaly: bool | None
    note: str = ""


def png_data_uri(image: np.ndarray | Image.Image, scale: int = 1) -> str:
    """A uint8 image as a ``data:image/png;base64,...`` URI, optionally upscaled."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_data_uri(fig: Figure) -> str:
    """A matplotlib figure as a PNG data URI (the figures of :mod:`anomaly_flow.plots`
    are not held by pyplot: nothing to close)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th class='l'>{html.escape(str(c))}</th>" if i == 0 else
                   f"<th>{html.escape(str(c))}</th>" for i, c in enumerate(cols))
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(cols):
            value = row[c]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            cells.append(f"<td class='l'>{html.escape(text)}</td>" if i == 0 else
                         f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _card(item: GalleryItem) -> str:
    verdict = ("" if item.is_anomaly is None else
               "<span class='anom'>anomalous</span>" if item.is_anomaly else
               "<span class='norm'>normal</span>")
    # alt names the image: a screen reader (or a page whose images do not load) otherwise
    # reads "image, heatmap" for every card alike
    name = html.escape(", ".join(part for part in (item.title, item.note) if part))
    heat = (f"<img src='{png_data_uri(item.heatmap)}' alt='heatmap of {name}'>"
            if item.heatmap is not None else "")
    return (f"<div class='card'><img src='{png_data_uri(item.image, 2)}' alt='{name}'>{heat}"
            f"<br>{html.escape(item.title)}<br>score {item.score:.3f} {verdict}"
            f"<br>{html.escape(item.note)}</div>")


def render_report(
    title: str,
    subtitle: str,
    sections: Sequence[tuple[str, str]],
) -> str:
    """Assemble the page from ``(heading, html_body)`` sections."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"
        + "\n".join(parts) + "</body></html>"
    )


def table_section(rows: Sequence[Mapping[str, object]], note: str = "") -> str:
    """A table of ``rows`` (one column per key of the first), then ``note`` (text)."""
    return _table(rows) + (f"<p>{html.escape(note)}</p>" if note else "")


def figures_section(figures: Mapping[str, object]) -> str:
    """Figures (matplotlib) side by side, each with its caption as alt text."""
    imgs = "".join(f"<img src='{figure_data_uri(fig)}' alt='{html.escape(name)}'>"
                   for name, fig in figures.items())
    return f"<div class='figs'>{imgs}</div>"


def gallery_section(items: Sequence[GalleryItem], note: str = "") -> str:
    """``note`` (text) above a card per item."""
    cards = "".join(_card(item) for item in items)
    return (f"<p>{html.escape(note)}</p>" if note else "") + f"<div class='gallery'>{cards}</div>"


def write_report(path: Path, page: str) -> Path:
    """Write the page atomically (temp file, then rename).

    Raises:
        DataError: The file system refused (disk full, no permission); no temporary
            file is left behind.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, page)
    except OSError as error:
        raise DataError(f"cannot write the report {display_path(path)}: "
                        f"{error.strerror or error}; free some space or give a writable "
                        "folder") from error
    return path
