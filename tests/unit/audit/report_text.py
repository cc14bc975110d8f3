"""What a reader sees of a report: the visible text of its HTML page and of its PDF's pages.

The PDF's text is extracted with pypdf from the written file, so the tests read what fpdf2 laid
out, not what it was asked to lay out. Plots are left out of both (SVG text in the HTML, images
in the PDF), and so are the PDF's page footers.
"""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Final

from medfed.audit.pdf import FOOTER

NUMBER: Final = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_FOOTER: Final = re.compile(
    re.escape(FOOTER.format(page="PAGE")).replace("PAGE", r"\d+").replace(r"\{nb\}", r"\d+")
)


class _Visible(HTMLParser):
    """Text outside ``<head>`` and ``<svg>``, with the headings (level, text) in order."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.headings: list[tuple[int, str]] = []
        self._hidden = 0
        self._heading: tuple[int, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("head", "svg"):
            self._hidden += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = (int(tag[1]), [])
        if tag in ("p", "li", "td", "th", "tr", "h1", "h2", "h3", "figcaption"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "svg"):
            self._hidden -= 1
        elif self._heading is not None and re.fullmatch(r"h[1-6]", tag):
            level, words = self._heading
            self.headings.append((level, "".join(words)))
            self._heading = None
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        self.parts.append(data)
        if self._heading is not None:
            self._heading[1].append(data)


def html_text(page: str) -> tuple[str, list[tuple[int, str]]]:
    """The page's visible text (whitespace collapsed) and its headings."""
    parser = _Visible()
    parser.feed(page)
    parser.close()
    return squeeze("".join(parser.parts)), parser.headings


def pdf_text(path: Path) -> str:
    """The text of every page, footers left out, whitespace collapsed."""
    from pypdf import PdfReader

    reader = PdfReader(path)
    lines = [
        line
        for page in reader.pages
        for line in page.extract_text().splitlines()
        if not _FOOTER.fullmatch(line.strip())
    ]
    return squeeze(" ".join(lines))


def pdf_outline(path: Path) -> list[tuple[int, str]]:
    """The PDF's bookmarks as (level, title), levels from 1."""
    from pypdf import PdfReader

    found: list[tuple[int, str]] = []

    def walk(items: list[object], level: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
            else:
                found.append((level, str(getattr(item, "title", ""))))

    walk(PdfReader(path).outline, 1)
    return found


def pdf_images(path: Path) -> int:
    from pypdf import PdfReader

    return sum(len(page.images) for page in PdfReader(path).pages)


def squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def without(text: str, value: str) -> str:
    """``text`` without ``value``, also where a line break split it (a long path)."""
    pattern = r"\s*".join(re.escape(char) for char in value)
    return re.sub(pattern, " ", text)


def numbers(text: str) -> Counter[str]:
    return Counter(NUMBER.findall(text))


def in_order(text: str, pieces: list[str]) -> bool:
    """Whether every piece is in ``text``, each after the one before."""
    at = 0
    for piece in pieces:
        found = text.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def rows_in_order(text: str, rows: list[list[str]]) -> bool:
    """Whether a table's rows are in ``text`` in order, each cell's words in order.

    A PDF's table cell that wraps puts its next line after the other cells of the row, so
    within a row only each cell's own words are in order.
    """
    at = 0
    for row in rows:
        cells = [cell.split() for cell in row if cell.split()]
        if not cells:
            continue
        start = text.find(cells[0][0], at)
        if start < 0 or not all(in_order(text[start:], words) for words in cells):
            return False
        at = start + 1
    return True
