"""The document a report is made of: a list of blocks (headings, text, tables, figures, ...).

One list is rendered twice, to Markdown that links the figures and to HTML that inlines them, so the
two files always say the same thing. Standard library only: the model card's HTML page uses it too.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CSS",
    "Block",
    "Details",
    "Figure",
    "Fold",
    "Heading",
    "Items",
    "Links",
    "Table",
    "Text",
    "Verdict",
    "anchor",
    "render_html",
    "render_markdown",
    "write_report",
]

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
.warning { border: 2px solid #b00; background: #fee; padding: .6rem 1rem; font-weight: bold; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #bbb; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #eee; }
figure { margin: 1rem 0; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9rem; color: #444; }
.verdict { border: 2px solid #1f5fbf; background: #eef4fd; padding: .2rem 1rem; margin: 1rem 0; }
.verdict h2 { margin: .5rem 0 .2rem; }
details { margin: .3rem 0 .8rem; font-size: .9rem; }
summary { cursor: pointer; color: #1f5fbf; }
details.fold { font-size: 1rem; border-top: 1px solid #ccc; padding-top: .3rem; }
details.fold > summary h2 { display: inline; }
"""


def anchor(text: str) -> str:
    """A heading's anchor as GitHub makes it (lower case, punctuation dropped, spaces to hyphens), so the
    HTML report and the Markdown on GitHub share their links."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@dataclass
class Heading:
    """A section title; ``level`` 2 for a section, 3 for a subsection (1 is the report's title)."""

    level: int
    text: str


@dataclass
class Text:
    """A paragraph; a ``warning`` is bold in Markdown and boxed in red in HTML (the disclaimer)."""

    text: str
    warning: bool = False


@dataclass
class Items:
    """A bulleted list of sentences."""

    items: list[str]


@dataclass
class Table:
    """A table of text cells; the numbers are formatted before they get here."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Links:
    """A list of relative links, (text, target): e.g. from a designs report to each run's own report."""

    links: list[tuple[str, str]]


@dataclass
class Figure:
    """A PNG: linked from the Markdown, inlined into the HTML so that the page loads nothing else."""

    anchor: str
    path: Path
    link: str  # relative to the report, for Markdown
    alt: str
    caption: str
    inline: bool = True  # False: a link to the PNG in the HTML too (a report that would otherwise repeat it)


@dataclass
class Verdict:
    """The bottom line a report opens with: a few sentences in a box, before any table (or after its own small
    ``table``, one row per model, where a report has several)."""

    items: list[str]
    table: Table | None = None


@dataclass
class Details:
    """Raw numbers behind a summary, folded away (``<details>`` in HTML) so the summary stays readable."""

    summary: str
    items: list[str]


@dataclass
class Fold:
    """A section folded away under its title (``<details>`` in HTML): one model's part of a longer report."""

    title: str
    blocks: list[Block] = field(default_factory=list)


Block = Heading | Text | Items | Links | Table | Figure | Verdict | Details | Fold


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]


def render_markdown(title: str, blocks: list[Block]) -> str:
    """Markdown that references the figures by relative path."""
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [f"**{block.text}**" if block.warning else block.text, ""]
        elif isinstance(block, Items):
            lines += [*(f"- {item}" for item in block.items), ""]
        elif isinstance(block, Links):
            lines += [*(f"- [{_md_cell(text)}]({target})" for text, target in block.links), ""]
        elif isinstance(block, Verdict):
            lines += ["> **Bottom line**", ">"]
            if block.table is not None:
                lines += [f"> {line}" for line in _md_table(block.table)] + [">"]
            lines += [*(f"> - {item}" for item in block.items), ""]
        elif isinstance(block, Fold):
            lines += [f"## {block.title}", "", "<details><summary>show</summary>", ""]
            lines += render_markdown("", block.blocks).split("\n")[2:]
            lines += ["</details>", ""]
        elif isinstance(block, Details):
            lines += [f"<details><summary>{block.summary}</summary>", "", *(f"- {i}" for i in block.items), ""]
            lines += ["</details>", ""]
        elif isinstance(block, Table):
            lines += [*_md_table(block), ""]
        else:
            lines += [f"![{_md_cell(block.alt)}]({block.link})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


def render_html(title: str, blocks: list[Block]) -> str:
    """One HTML file with inline CSS and every figure inlined as a data URI (or, where a figure is not inline, a
    relative link to its PNG); it loads nothing else."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += _html_blocks(blocks)
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_blocks(blocks: list[Block]) -> list[str]:
    esc = html.escape
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f'<h{block.level} id="{anchor(block.text)}">{esc(block.text)}</h{block.level}>')
        elif isinstance(block, Text):
            opening = '<p class="warning">' if block.warning else "<p>"
            parts.append(f"{opening}{esc(block.text)}</p>")
        elif isinstance(block, Items):
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Links):
            items = "".join(f'<li><a href="{esc(target)}">{esc(text)}</a></li>' for text, target in block.links)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Verdict):
            items = "".join(f"<li>{esc(item)}</li>" for item in block.items)
            table = "" if block.table is None else _html_table(block.table)
            parts.append(f'<section class="verdict" id="verdict"><h2>Bottom line</h2>{table}<ul>{items}</ul></section>')
        elif isinstance(block, Fold):
            inner = "\n".join(_html_blocks(block.blocks))
            parts.append(
                f'<details class="fold" id="{anchor(block.title)}"><summary><h2>{esc(block.title)}</h2></summary>'
                f"\n{inner}\n</details>"
            )
        elif isinstance(block, Details):
            items = "".join(f"<li>{esc(item)}</li>" for item in block.items)
            parts.append(f"<details><summary>{esc(block.summary)}</summary><ul>{items}</ul></details>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif not block.inline:
            parts.append(
                f'<figure id="{esc(block.anchor)}"><a href="{esc(block.link)}">{esc(block.alt)} (PNG)</a>'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img id="{esc(block.anchor)}" alt="{esc(block.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    return parts


def write_report(folder: Path, title: str, blocks: list[Block]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` in ``folder``, from the same blocks."""
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(render_markdown(title, blocks), encoding="utf-8")
    page.write_text(render_html(title, blocks), encoding="utf-8")
    return md, page
