"""HTML building: escaped text, the page layout, small form helpers. No template engine.

Every value that reaches a page goes through :func:`esc` (or an attribute helper that calls it);
markup is only ever assembled from literals here and in :mod:`vllm_audit.console.pages`.
The pages carry no inline script and no ``style`` attributes (the CSP forbids both).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlencode

from vllm_audit.console.i18n import t

#: Redaction markers as the privacy area writes them: ``<EMAIL>``, ``<EMAIL:ps_1a2b3c>``, ``[REDACTED:...]``.
MARKER = re.compile(r"<[A-Z_]{2,20}(?::ps_[0-9a-f]{6,64})?>|\[REDACTED(?::[^\]\n]{1,40})?\]")


def esc(v: object) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def marked(text: str) -> str:
    """``text`` escaped, with every redaction marker wrapped in ``<mark class="redacted">``."""
    out, pos = [], 0
    for m in MARKER.finditer(text):
        out.append(esc(text[pos : m.start()]))
        out.append(f'<mark class="redacted" title="redacted">{esc(m.group(0))}</mark>')
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def qs(params: dict[str, str]) -> str:
    return urlencode({k: v for k, v in params.items() if v})


class Page:
    """What a page handler returns: a title and the body's inner HTML."""

    def __init__(self, title: str, body: str, *, status: int = 200, active: str = "") -> None:
        self.title = title
        self.body = body
        self.status = status
        self.active = active


def layout(
    page: Page,
    *,
    lang: str,
    base: str,
    who: str | None,
    role: str | None,
    csrf: str | None,
    here: str,
    nav: Sequence[str] = ("search", "integrity", "alerts", "usage", "export"),
) -> str:
    """The whole document around ``page``."""
    other = "en" if lang == "zh" else "zh"
    links = []
    if who is not None:
        for name in nav:
            cur = ' aria-current="page"' if name == page.active else ""
            links.append(f'<li><a href="{esc(base)}/{name}"{cur}>{esc(t(lang, "nav." + name))}</a></li>')
    signout = ""
    if who is not None and csrf is not None:
        role_txt = t(lang, f"role.{role}") if role else ""
        signout = (
            f'<p class="who">{esc(t(lang, "signed_in_as"))} <strong>{esc(who)}</strong> '
            f'<span class="role">({esc(role_txt)})</span></p>'
            f'<form method="post" action="{esc(base)}/logout" class="inline">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            f'<button type="submit">{esc(t(lang, "nav.signout"))}</button></form>'
        )
    lang_link = f"{base}/lang?" + urlencode({"to": other, "next": here})
    return (
        f'<!DOCTYPE html>\n<html lang="{"zh-Hans" if lang == "zh" else "en"}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(page.title)} · {esc(t(lang, 'title'))}</title>"
        f'<link rel="icon" href="data:,"><link rel="stylesheet" href="{esc(base)}/static/console.css">'
        f'<script type="module" src="{esc(base)}/static/console.js"></script></head>'
        f'<body><a class="skip" href="#main">{esc(t(lang, "skip"))}</a>'
        f'<header><p class="brand">{esc(t(lang, "title"))}</p>'
        f'<nav aria-label="main"><ul>{"".join(links)}</ul></nav>'
        f'<div class="account">{signout}<a class="lang" href="{esc(lang_link)}" lang="{other}" '
        f'hreflang="{other}">{esc(t(lang, "lang.switch"))}</a></div></header>'
        f'<main id="main" tabindex="-1"><h1>{esc(page.title)}</h1>{page.body}</main></body></html>'
    )


def table(caption: str, head: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table in a keyboard-scrollable region; ``rows`` hold ready-made (escaped) cell HTML."""
    th = "".join(f'<th scope="col">{esc(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return (
        f'<div class="scroll" role="region" aria-label="{esc(caption)}" tabindex="0">'
        f'<table class="{esc(cls)}"><caption>{esc(caption)}</caption><thead><tr>{th}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def field(label: str, name: str, value: str, *, kind: str = "text", extra: str = "") -> str:
    fid = f"f-{name}"
    return (
        f'<div class="field"><label for="{fid}">{esc(label)}</label>'
        f'<input id="{fid}" name="{esc(name)}" type="{kind}" value="{esc(value)}"{extra}></div>'
    )


def select(label: str, name: str, value: str, options: Sequence[tuple[str, str]]) -> str:
    fid = f"f-{name}"
    opts = "".join(
        f'<option value="{esc(v)}"{" selected" if v == value else ""}>{esc(text)}</option>' for v, text in options
    )
    return (
        f'<div class="field"><label for="{fid}">{esc(label)}</label>'
        f'<select id="{fid}" name="{esc(name)}">{opts}</select></div>'
    )


def hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def data_block(element_id: str, json_text: str) -> str:
    """JSON for the page's script, as a non-executed data block (``<`` escaped so it cannot close the tag)."""
    safe = json_text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{esc(element_id)}">{safe}</script>'
