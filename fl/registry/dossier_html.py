"""The dossier as HTML: a fragment the console puts in its page, or a self-contained document
(``dossier.html``: its stylesheet inline, printable from any browser)."""

from __future__ import annotations

import re
from html import escape
from importlib import resources
from typing import Any

CSS_NAME = "dossier.css"


def css() -> str:
    return resources.files("fl.registry").joinpath("static", CSS_NAME).read_text(encoding="utf-8")


def render_body(d: dict[str, Any]) -> str:
    """The dossier's HTML, every value escaped."""
    m, v = d["model"], d["verify"]
    parts = ['<article class="dossier" id="dossier">', f"<h1>AI Act dossier: {escape(m['ref'])}</h1>",
             f'<p class="draft"><strong>Draft.</strong> {escape(d["draft"])}</p>',
             f"<p>Version hash <code>{escape(m['hash'])}</code>; weights SHA-256 <code>{escape(str(m['weights_sha256']))}"
             f"</code>; created {escape(str(m['created_at']))}. Chain check: <span class=\""
             f"{'verify-ok' if v['ok'] else 'verify-bad'}\">{escape(v['result'])}</span></p>"]
    for section in d["sections"]:
        parts += [f"<h2>{escape(section['title'])}</h2>", f'<p class="serves">Serves: {escape(section["serves"])}</p>',
                  "<ul>"]
        for st in section["statements"]:
            source = st.get("source")
            tail = ""
            if source:
                tail = f' <span class="source">(source: {escape(source["record"])}' + (
                    f', hash <code>{escape(source["hash"][:16])}</code>' if source.get("hash") else "") + ")</span>"
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(st["text"]))  # Markdown's code spans
            parts.append(f"<li>{text}{tail}</li>")
        parts.append("</ul>")
    parts.append("</article>")
    return "\n".join(parts)


def render_html(d: dict[str, Any]) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>AI Act dossier: {escape(d['model']['ref'])}</title><style>\n{css()}</style></head>"
            f"<body>\n{render_body(d)}\n</body></html>\n")
