"""The report's :class:`~medfed.audit.document.Document` as a PDF, laid out with fpdf2.

A4 pages with running text, real tables (column widths fitted to their contents, headings
repeated on a new page), plots as PNG side by side where they fit and several to a page, a
bookmark per section and page numbers. Text is set in DejaVu Sans, which comes with matplotlib
and covers every character; without matplotlib (and so without plots) in the PDF core fonts,
which hold Latin-1 only: any other character is printed as ``?``.
"""

from __future__ import annotations

import importlib.util
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from medfed.audit.document import (
    Block,
    Bullets,
    Document,
    Paragraph,
    Plot,
    Section,
    Style,
    Table,
    cell_style,
    cell_text,
)
from medfed.audit.figures import png_of
from medfed.errors import ConfigError

if TYPE_CHECKING:
    from fpdf import FPDF, FontFace

FOOTER: Final = "medfed privacy audit, page {page} of {{nb}}"
_BODY_SIZE: Final = 9.0
_TABLE_SIZE: Final = 7.5
_HEADING_SIZES: Final = {1: 16.0, 2: 12.5, 3: 10.0}
_LINE: Final = 1.4  # line height as a multiple of the font size
_PT: Final = 25.4 / 72  # millimetres per point
_CELL_PAD: Final = (0.8, 1.2)  # millimetres above/below and left/right of a cell's text
_GAP: Final = 4.0  # millimetres between plots side by side
_PLOT_HEIGHT: Final = 72.0  # millimetres; the report's plots stay legible down to about this
_COLORS: Final[dict[Style, tuple[int, int, int]]] = {
    "plain": (34, 34, 34),
    "strong": (34, 34, 34),
    "code": (34, 34, 34),
    "note": (85, 85, 85),
    "pass": (23, 99, 23),
    "fail": (163, 21, 21),
    "skipped": (119, 119, 119),
    "finding": (163, 21, 21),
}
_BOLD: Final[frozenset[Style]] = frozenset({"strong", "pass", "fail"})


def pdf_available() -> bool:
    return importlib.util.find_spec("fpdf") is not None


def write_pdf(document: Document, *, path: Path) -> None:
    """Lay ``document`` out and write it to ``path`` (its folder is created)."""
    data = pdf_bytes(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def pdf_bytes(document: Document) -> bytes:
    if not pdf_available():
        raise ConfigError(
            "a PDF report needs fpdf2, which is not installed",
            hint="pip install 'fpdf2>=2.8,<3' (or reinstall medfed), or use --format html",
        )
    writer = _Writer(document)
    writer.section(document.body)
    return writer.output()


@dataclass(frozen=True, slots=True)
class _Fonts:
    sans: str
    mono: str
    unicode: bool

    def clean(self, value: str) -> str:
        """``value`` as the fonts can print it."""
        if self.unicode:
            return value
        return value.encode("latin-1", "replace").decode("latin-1")

    @property
    def bullet(self) -> str:
        return "\u2022" if self.unicode else "-"


def _new_pdf(*, footer_family: str) -> FPDF:
    from fpdf import FPDF

    class _Pages(FPDF):
        def footer(self) -> None:
            self.set_y(-11)
            self.set_font(footer_family, size=7)
            self.set_text_color(*_COLORS["note"])
            self.cell(0, 4, FOOTER.format(page=self.page_no()), align="C")

    return _Pages(orientation="portrait", unit="mm", format="A4")


_DEJAVU: Final = {
    ("dejavu", ""): "DejaVuSans.ttf",
    ("dejavu", "B"): "DejaVuSans-Bold.ttf",
    ("dejavu", "I"): "DejaVuSans-Oblique.ttf",
    ("dejavu-mono", ""): "DejaVuSansMono.ttf",
}


def unicode_fonts() -> dict[tuple[str, str], Path] | None:
    """matplotlib's DejaVu fonts (found without importing matplotlib), or None."""
    spec = importlib.util.find_spec("matplotlib")
    for location in [] if spec is None else list(spec.submodule_search_locations or []):
        folder = Path(location) / "mpl-data" / "fonts" / "ttf"
        files = {key: folder / name for key, name in _DEJAVU.items()}
        if all(path.is_file() for path in files.values()):
            return files
    return None


class _Writer:
    """Walks the document's blocks onto the pages, top to bottom."""

    def __init__(self, document: Document) -> None:
        files = unicode_fonts()
        if files is None:
            self.fonts = _Fonts(sans="helvetica", mono="courier", unicode=False)
        else:
            self.fonts = _Fonts(sans="dejavu", mono="dejavu-mono", unicode=True)
        self.pdf = pdf = _new_pdf(footer_family=self.fonts.sans)
        for (family, style), path in (files or {}).items():
            pdf.add_font(family, style, str(path))
        pdf.set_margins(left=15, top=15, right=15)
        pdf.set_auto_page_break(auto=True, margin=16)
        pdf.set_title(self.fonts.clean(document.title))
        pdf.set_creator("medfed")
        pdf.set_lang("en")
        pdf.add_page()

    def output(self) -> bytes:
        # fontTools reports every table it drops while subsetting the fonts; nothing to act on.
        tools = logging.getLogger("fontTools")
        level = tools.level
        tools.setLevel(logging.ERROR)
        try:
            return bytes(self.pdf.output())
        finally:
            tools.setLevel(level)

    # text ------------------------------------------------------------------------------

    def font(self, style: Style, size: float, *, italic: bool = False) -> None:
        family = self.fonts.mono if style == "code" else self.fonts.sans
        emphasis = "B" if style in _BOLD else "I" if italic else ""
        self.pdf.set_font(family, emphasis, size)
        self.pdf.set_text_color(*_COLORS[style])

    def line_height(self, size: float) -> float:
        return size * _PT * _LINE

    def section(self, section: Section) -> None:
        pdf = self.pdf
        size = _HEADING_SIZES[section.level]
        if section.starts_page and pdf.get_y() > pdf.t_margin + 1:
            pdf.add_page()
        # A heading never ends a page: keep room for it and a few lines of what follows.
        if pdf.will_page_break(self.line_height(size) + 25):
            pdf.add_page()
        pdf.start_section(self.fonts.clean(section.heading), level=section.level - 1)
        pdf.ln(1.5 if section.level > 1 else 0)
        self.font("strong", size)
        pdf.multi_cell(0, self.line_height(size), self.fonts.clean(section.heading))
        if section.level == 2:
            pdf.set_draw_color(204, 204, 204)
            pdf.line(pdf.l_margin, pdf.get_y() + 0.5, pdf.w - pdf.r_margin, pdf.get_y() + 0.5)
        pdf.ln(2)
        for group in _grouped(section.blocks):
            if isinstance(group, list):
                self.plots(group)
            else:
                self.block(group)

    def block(self, block: Block) -> None:
        if isinstance(block, Section):
            self.section(block)
        elif isinstance(block, Paragraph):
            self.paragraph(block)
        elif isinstance(block, Bullets):
            self.bullets(block)
        elif isinstance(block, Table):
            self.table(block)
        elif isinstance(block, Plot):
            self.plots([block])
        else:
            raise TypeError(f"not a block of the report: {type(block).__name__}")

    def paragraph(self, paragraph: Paragraph) -> None:
        pdf = self.pdf
        height = self.line_height(_BODY_SIZE)
        pdf.set_x(pdf.l_margin)
        for span in paragraph.spans:
            style = paragraph.style if span.style == "plain" else span.style
            self.font(style, _BODY_SIZE)
            pdf.write(height, self.fonts.clean(span.text))
        pdf.ln(height)
        pdf.ln(2)

    def bullets(self, bullets: Bullets) -> None:
        pdf = self.pdf
        height = self.line_height(_BODY_SIZE)
        for item in bullets.items:
            self.font(bullets.style, _BODY_SIZE)
            pdf.set_x(pdf.l_margin + 1)
            pdf.cell(4, height, self.fonts.bullet)
            pdf.multi_cell(0, height, self.fonts.clean(item))
        pdf.ln(2)

    # tables ----------------------------------------------------------------------------

    def table(self, table: Table) -> None:
        from fpdf import FontFace

        pdf = self.pdf
        widths = self.column_widths(table)
        self.font("plain", _TABLE_SIZE)
        pdf.set_draw_color(204, 204, 204)
        pdf.set_x(pdf.l_margin)
        heading = FontFace(emphasis="BOLD", fill_color=(244, 244, 244), color=_COLORS["plain"])
        with pdf.table(
            width=min(sum(widths), pdf.epw),  # a sum of fractions of the page can exceed it
            col_widths=widths,
            align="LEFT",
            v_align="TOP",
            text_align=tuple("RIGHT" if i in table.numeric else "LEFT" for i in range(len(widths))),
            line_height=self.line_height(_TABLE_SIZE),
            padding=_CELL_PAD,
            headings_style=heading,
            repeat_headings=1,
        ) as drawn:
            header = drawn.row()
            for name in table.header:
                header.cell(self.fonts.clean(name))
            for row in table.rows:
                cells = drawn.row()
                for value in row:
                    cells.cell(
                        self.fonts.clean(cell_text(value)), style=self.face(cell_style(value))
                    )
        pdf.set_xy(pdf.l_margin, pdf.get_y())
        pdf.ln(3)

    def face(self, style: Style) -> FontFace | None:
        from fpdf import FontFace

        if style == "plain":
            return None
        return FontFace(
            family=self.fonts.mono if style == "code" else None,
            emphasis="BOLD" if style in _BOLD else None,
            color=_COLORS[style],
        )

    def column_widths(self, table: Table) -> list[float]:
        """Widths in mm, as a browser lays a table out: as wide as its text, at most the page.

        ``nowrap`` columns keep their widest cell on one line (up to 45% of the page); the
        others get at least their longest word and share what is left in proportion to how
        much wider their text would like to be. Where even that is too wide, only the columns
        of the longest words (a hash, a URI) are narrowed and break inside them.
        """
        pdf = self.pdf
        page = pdf.epw
        pad = 2 * _CELL_PAD[1] + 0.6
        natural: list[float] = []
        minimum: list[float] = []
        for index, name in enumerate(table.header):
            self.font("strong", _TABLE_SIZE)
            texts = [self.fonts.clean(cell_text(row[index])) for row in table.rows]
            widest = pdf.get_string_width(self.fonts.clean(name))
            longest_word = max((pdf.get_string_width(w) for w in name.split()), default=0.0)
            self.font("plain", _TABLE_SIZE)
            for value in texts:
                widest = max(widest, pdf.get_string_width(value) * 1.04)
                longest_word = max(
                    [longest_word, *(pdf.get_string_width(w) * 1.04 for w in value.split())]
                )
            natural.append(widest + pad)
            if index in table.nowrap:
                minimum.append(min(widest + pad, 0.45 * page))
            else:
                minimum.append(min(longest_word + pad, natural[-1]))
        if sum(natural) <= page:
            return natural
        if sum(minimum) >= page:
            return _capped(minimum, page)
        slack = [n - m for n, m in zip(natural, minimum, strict=True)]
        spare = page - sum(minimum)
        return [m + spare * s / sum(slack) for m, s in zip(minimum, slack, strict=True)]

    # plots -----------------------------------------------------------------------------

    def plots(self, plots: Sequence[Plot]) -> None:
        """Rows of plots side by side as far as the page is wide, each row kept on one page."""
        pdf = self.pdf
        caption_size = _BODY_SIZE - 1
        for row in _rows([(plot, *self.size_of(plot)) for plot in plots], width=pdf.epw):
            tallest = max(height for _, _, height in row)
            if pdf.will_page_break(tallest + self.line_height(caption_size) + 2):
                pdf.add_page()
            top, x, bottom = pdf.get_y(), pdf.l_margin, pdf.get_y()
            for plot, width, height in row:
                pdf.image(io.BytesIO(png_of(plot.figure)), x=x, y=top, w=width, h=height)
                pdf.set_xy(x, top + height + 1)
                self.font("note", caption_size, italic=True)
                pdf.multi_cell(
                    width, self.line_height(caption_size), self.fonts.clean(plot.caption)
                )
                bottom = max(bottom, pdf.get_y())
                x += width + _GAP
            pdf.set_xy(pdf.l_margin, bottom + 3)

    def size_of(self, plot: Plot) -> tuple[float, float]:
        """The plot's width and height in mm: its own size, made smaller where it would be
        wider than the page or taller than :data:`_PLOT_HEIGHT` (three plots to a page)."""
        inches_wide, inches_high = plot.figure.get_size_inches()
        width, height = float(inches_wide) * 25.4, float(inches_high) * 25.4
        scale = min(1.0, self.pdf.epw / width, _PLOT_HEIGHT / height)
        return width * scale, height * scale


def _capped(widths: Sequence[float], page: float) -> list[float]:
    """``widths`` with the widest ones cut to one common cap, so that they fill ``page``."""
    rest = page
    ordered = sorted(widths)
    for index, width in enumerate(ordered):
        left = len(ordered) - index
        if width * left > rest:
            return [min(value, rest / left) for value in widths]
        rest -= width
    return list(widths)


def _grouped(blocks: Sequence[Block]) -> Iterator[Block | list[Plot]]:
    """The blocks, with each run of consecutive plots as one list (laid out together)."""
    run: list[Plot] = []
    for block in blocks:
        if isinstance(block, Plot):
            run.append(block)
            continue
        if run:
            yield run
            run = []
        yield block
    if run:
        yield run


def _rows(
    sized: Sequence[tuple[Plot, float, float]], *, width: float
) -> Iterator[list[tuple[Plot, float, float]]]:
    row: list[tuple[Plot, float, float]] = []
    used = 0.0
    for item in sized:
        if row and used + _GAP + item[1] > width:
            yield row
            row, used = [], 0.0
        used += (_GAP if row else 0.0) + item[1]
        row.append(item)
    if row:
        yield row
