"""Small HTML for notebooks' ``_repr_html_`` (no dependency): escaped tables and clipped text."""

from __future__ import annotations

import html


def clip(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters (with an ellipsis when cut)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def html_table(header, rows, footer: str | None = None) -> str:
    """A small HTML table (cells escaped); ``footer``: a last row spanning the table."""

    def cell(tag: str, value) -> str:
        return f"<{tag}>{html.escape(str(value))}</{tag}>"

    body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
    tail = f'<tr><td colspan="{len(header)}">{html.escape(footer)}</td></tr>' if footer else ""
    return f"<table><tr>{''.join(cell('th', h) for h in header)}</tr>{body}{tail}</table>"
