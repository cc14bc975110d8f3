"""The audit report as one document: sections, paragraphs, lists, tables and plots.

:mod:`medfed.audit.contents` builds it once from the statements; :mod:`medfed.audit.html`
draws it as HTML and :mod:`medfed.audit.pdf` as PDF. Both renderers walk the same blocks, so a
section, a number or a plot cannot be in one format and missing from the other. Text is kept
raw here; each renderer escapes it for its own format.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# "pass", "fail" and "skipped" are a check's status; "finding" a problem; "note" an aside.
Style = Literal["plain", "strong", "code", "note", "pass", "fail", "skipped", "finding"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """A piece of text with one style."""

    text: str
    style: Style = "plain"


@dataclass(frozen=True, slots=True, kw_only=True)
class Paragraph:
    """Running text: its spans in order, and a style for the whole paragraph."""

    spans: tuple[Span, ...]
    style: Style = "plain"

    @property
    def text(self) -> str:
        return "".join(span.text for span in self.spans)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bullets:
    """A bulleted list; every item has the list's style."""

    items: tuple[str, ...]
    style: Style = "plain"


Cell: TypeAlias = str | Span


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """A table with a header row; ``numeric`` columns align right, ``nowrap`` ones never wrap."""

    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: frozenset[int] = frozenset()
    nowrap: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"table row of {len(row)} cells under {len(self.header)} columns")
        outside = sorted(i for i in self.numeric | self.nowrap if not 0 <= i < len(self.header))
        if outside:
            raise ValueError(f"column(s) {outside} of a table of {len(self.header)} columns")


@dataclass(frozen=True, slots=True, kw_only=True)
class Plot:
    """A matplotlib figure with its caption (SVG in the HTML, PNG in the PDF)."""

    figure: Figure
    caption: str


Block: TypeAlias = "Paragraph | Bullets | Table | Plot | Section"


@dataclass(frozen=True, slots=True, kw_only=True)
class Section:
    """A heading (level 1 to 3) and what it holds.

    ``anchor`` is its id in the HTML; ``starts_page`` puts it at the top of a new PDF page.
    """

    heading: str
    level: int
    blocks: tuple[Block, ...]
    anchor: str | None = None
    starts_page: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 3:
            raise ValueError(f"heading level {self.level} is not 1, 2 or 3")
        for block in self.blocks:
            if isinstance(block, Section) and block.level != self.level + 1:
                raise ValueError(
                    f"section {block.heading!r} of level {block.level} under level {self.level}"
                )

    def headings(self) -> Iterator[tuple[int, str]]:
        """(level, heading) of this section and every section in it, in document order."""
        yield self.level, self.heading
        for block in self.blocks:
            if isinstance(block, Section):
                yield from block.headings()

    def walk(self) -> Iterator[Block]:
        """Every block in this section and in the sections it holds, in document order."""
        for block in self.blocks:
            yield block
            if isinstance(block, Section):
                yield from block.walk()


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    """The whole report: a title for the file's metadata and its top-level section."""

    title: str
    body: Section


def text(value: str, style: Style = "plain") -> Paragraph:
    """A paragraph of one span."""
    return Paragraph(spans=(Span(text=value, style=style),), style=style)


def cell_text(cell: Cell) -> str:
    return cell.text if isinstance(cell, Span) else cell


def cell_style(cell: Cell) -> Style:
    return cell.style if isinstance(cell, Span) else "plain"
