"""HTML pages to records: the visible text of the elements a CSS selector picks, one record each."""
from __future__ import annotations

import re
import uuid
from pathlib import Path

from jaxtune.data.records import BadRow
from jaxtune.errors import JaxtuneError

DEFAULT_SELECTOR = "main, article, [role=main]"
HIDDEN_TAGS = ["head", "script", "style", "template", "noscript", "nav", "header", "footer", "aside"]
BLOCK_TAGS = ["p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
              "dl", "dt", "dd", "blockquote", "pre", "table", "tr", "figcaption", "br", "hr"]
PARAGRAPH = "\u2029"  # marks block boundaries while the text's own whitespace is collapsed


CELL = " | "  # between the cells of a table row, so that they stay apart


def _preformatted(pre) -> str:
    """A <pre> block's text as displayed: every line and indent, a <br> a line break (HTML drops a newline
    right after <pre>)."""
    for br in pre.find_all("br"):
        br.replace_with("\n")
    return pre.get_text().removeprefix("\n").rstrip()


def _visible_text(element) -> str:
    """Text as a reader sees it: runs of whitespace collapsed, one line per paragraph and per table row
    (cells apart); a <pre> block (code, with its <code> and highlighting <span>s) verbatim."""
    if element.name == "pre":
        return _preformatted(element)
    marker = f"\ue000{uuid.uuid4().hex}:"  # + i + U+E000 stands for the i-th <pre> while the prose is collapsed
    blocks = []
    while (pre := element.find("pre")) is not None:  # the outermost first
        blocks.append(_preformatted(pre))
        pre.replace_with(f"{PARAGRAPH}{marker}{len(blocks) - 1}\ue000{PARAGRAPH}")
    for row in element.find_all("tr"):
        cells = row.find_all(["td", "th"], recursive=False)
        for cell in cells:  # a cell is one line, even when it wraps its text in <p> or <div>
            for block in cell.find_all(BLOCK_TAGS):
                block.insert_before(" ")
                block.insert_after(" ")
            cell.string = " ".join(cell.get_text().split())
        for cell in cells[1:]:
            cell.insert_before(CELL)
    for tag in element.find_all(BLOCK_TAGS):
        tag.insert_before(PARAGRAPH)
        tag.insert_after(PARAGRAPH)
    paragraphs = (" ".join(p.split()) for p in element.get_text().split(PARAGRAPH))
    text = "\n".join(p for p in paragraphs if p)
    return re.sub(re.escape(marker) + "(\\d+)\ue000", lambda m: blocks[int(m[1])], text)


def html_rows(path: Path, text: str, selector: str | None):
    from bs4 import BeautifulSoup  # imported here: registering `jaxtune prepare` needs only DEFAULT_SELECTOR
    from soupsieve import SelectorSyntaxError

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup.find_all(HIDDEN_TAGS):
        tag.decompose()
    try:
        elements = soup.select(selector or DEFAULT_SELECTOR)
    except SelectorSyntaxError as e:
        raise JaxtuneError(f"--selector {selector!r} is not valid CSS: {e.args[0]}") from None
    if not elements:
        if selector:
            yield str(path), BadRow("selector matched nothing", f"{path}: --selector {selector!r} matched nothing; "
                                                                "check it against the page")
            return
        elements = [soup.body or soup]
    chosen = {id(e) for e in elements}
    outermost = [e for e in elements if not any(id(p) in chosen for p in e.parents)]  # <main><article> once
    for i, element in enumerate(outermost, 1):
        yield f"{path} element {i} (<{element.name}>)", {"text": _visible_text(element)}
