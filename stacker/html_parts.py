"""What every page of the toolkit is made of: the style sheet, the one number formatter, escaping, tables."""
from __future__ import annotations

import html

import numpy as np

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f2f2f2}tr.chosen{background:#e6f4e6}
div.warning{background:#fff3cd;border:1px solid #e0c060;padding:0 1em}
img{max-width:100%;display:block;margin:.5em 0}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
.note{color:#555;font-size:13px}h2{border-bottom:1px solid #ddd;margin-top:2em}
div.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin:.5em 0 1em}figure.thumb{margin:0;width:112px;font-size:11px}
figure.thumb img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;margin:0;background:#eee}
figure.thumb figcaption{overflow-wrap:anywhere}div.cluster{border-left:3px solid #ccc;padding-left:6px}"""


def fmt(value, digits: int = 4) -> str:
    """How every number appears on the page: floats to `digits` decimals, ints as they are, missing as '-'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def table(header: list, rows: list, chosen: set = frozenset()) -> str:
    """An HTML table; numbers right-aligned and printed by `fmt`, rows whose first cell is in `chosen` marked."""
    def cell(value):
        if isinstance(value, (bool, np.bool_)):
            return f"<td>{fmt(value)}</td>"
        if isinstance(value, (int, float, np.integer, np.floating)):
            return f'<td class="n">{fmt(value)}</td>'
        return f"<td>{esc('-' if value is None else value)}</td>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(f'<tr{" class=chosen" if row[0] in chosen else ""}>{"".join(cell(v) for v in row)}</tr>'
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, body: str) -> str:
    """A whole self-contained page: the style sheet inline, `title` as its title and heading, then `body`."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>\n")
