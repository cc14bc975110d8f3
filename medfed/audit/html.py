"""The report's :class:`~medfed.audit.document.Document` as one self-contained HTML page.

Inline CSS and inline SVG plots, no external resource; every text is escaped here.
"""

from __future__ import annotations

import html
from typing import Final

from medfed.audit.document import (
    Block,
    Bullets,
    Cell,
    Document,
    Paragraph,
    Plot,
    Section,
    Style,
    Table,
    cell_style,
    cell_text,
)
from medfed.audit.figures import svg_of

_STYLE: Final = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.nowrap { white-space: nowrap; }
.pass { color: #176317; font-weight: 600; } .fail { color: #a31515; font-weight: 600; }
.skipped { color: #777; } .finding { color: #a31515; } .note { color: #555; }
section#summary { background: #f7f9fc; border: 1px solid #d8e0ec; padding: 0 1.2em .4em; }
section#summary h2 { border-bottom: none; } section#summary p { line-height: 1.5; }
figure { display: inline-block; margin: 0 1em 1em 0; } code { font-size: .95em; }
"""


def render_html(document: Document) -> str:
    """The page: ``<!DOCTYPE html>`` to ``</html>``, ending in a newline."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(document.title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        *_section(document.body),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _section(section: Section) -> list[str]:
    level = section.level
    parts = [f"<h{level}>{html.escape(section.heading)}</h{level}>"]
    for block in section.blocks:
        parts += _block(block)
    if section.anchor is None:
        return parts
    return [f'<section id="{html.escape(section.anchor)}">', *parts, "</section>"]


def _block(block: Block) -> list[str]:
    if isinstance(block, Section):
        return _section(block)
    if isinstance(block, Paragraph):
        inner = "".join(_span(span.text, span.style) for span in block.spans)
        return [f"<p{_class(block.style)}>{inner}</p>"]
    if isinstance(block, Bullets):
        items = [f"<li{_class(block.style)}>{html.escape(item)}</li>" for item in block.items]
        return ["<ul>", *items, "</ul>"]
    if isinstance(block, Table):
        return [_table(block)]
    if isinstance(block, Plot):
        caption = html.escape(block.caption)
        return [f"<figure>{svg_of(block.figure)}<figcaption>{caption}</figcaption></figure>"]
    raise TypeError(f"not a block of the report: {type(block).__name__}")


def _span(value: str, style: Style) -> str:
    escaped = html.escape(value)
    if style == "plain":
        return escaped
    if style == "code":
        return f"<code>{escaped}</code>"
    if style == "strong":
        return f"<strong>{escaped}</strong>"
    return f'<span class="{style}">{escaped}</span>'


def _class(style: Style) -> str:
    # A paragraph's spans carry their own styles; only the paragraph-wide ones go on the tag.
    return "" if style in ("plain", "strong", "code") else f' class="{style}"'


def _table(table: Table) -> str:
    def classes(index: int) -> list[str]:
        return (["num"] if index in table.numeric else []) + (
            ["nowrap"] if index in table.nowrap else []
        )

    def attribute(index: int, *, header: bool) -> str:
        names = [name for name in classes(index) if not (header and name == "num")]
        return f' class="{" ".join(names)}"' if names else ""

    def cell(index: int, value: Cell) -> str:
        inner = _span(cell_text(value), cell_style(value))
        return f"<td{attribute(index, header=False)}>{inner}</td>"

    head = "".join(
        f"<th{attribute(i, header=True)}>{html.escape(h)}</th>" for i, h in enumerate(table.header)
    )
    body = "".join(
        "<tr>" + "".join(cell(i, value) for i, value in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
