"""Server-rendered SVG charts: one line (with points) per series over days. No script needed.

Colours come from CSS classes (``s0``..``s5``) in console.css; each chart has a ``<title>`` and a
``<desc>`` and is followed by the same numbers as a table, so it reads without sight too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from vllm_audit.console.html import esc

W, H = 640, 240
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 16, 40
MAX_SERIES = 6


def _nice(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** (len(str(int(v))) - 1)
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def _fmt(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"


def line_chart(title: str, days: Sequence[str], series: Mapping[str, Sequence[float]], *, chart_id: str) -> str:
    """An SVG line chart of ``series`` (name -> one value per day)."""
    top = _nice(max((v for vals in series.values() for v in vals), default=0.0))
    n = len(days)
    iw, ih = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(i: int) -> float:
        return PAD_L + (iw * (i + 0.5) / n if n else 0)

    def y(v: float) -> float:
        return PAD_T + ih - ih * (v / top)

    parts = [
        f'<svg class="chart" id="{esc(chart_id)}" viewBox="0 0 {W} {H}" role="img" '
        f'aria-labelledby="{esc(chart_id)}-t {esc(chart_id)}-d" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{esc(chart_id)}-t">{esc(title)}</title>',
        f'<desc id="{esc(chart_id)}-d">{esc(", ".join(series))}; {esc(days[0] if days else "")}'
        f" – {esc(days[-1] if days else '')}</desc>",
    ]
    mantissa = top / 10 ** math.floor(math.log10(top))
    steps = 4 if round(mantissa, 6) == 2 else 5  # ticks on round numbers (top is 1, 2, 2.5 or 5 x 10^k)
    for k in range(steps + 1):
        v = top * k / steps
        parts.append(f'<line class="grid" x1="{PAD_L}" x2="{W - PAD_R}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text class="tick" x="{PAD_L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    step = max(1, n // 8)
    for i, d in enumerate(days):
        if i % step == 0 or i == n - 1:
            parts.append(
                f'<text class="tick" x="{x(i):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{esc(d[5:])}</text>'
            )
    for si, (name, vals) in enumerate(list(series.items())[:MAX_SERIES]):
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals))
        parts.append(f'<g class="series s{si}" data-series="{esc(name)}">')
        if n > 1:
            parts.append(f'<polyline points="{pts}"/>')
        for i, v in enumerate(vals):
            parts.append(
                f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3">'
                f"<title>{esc(name)} {esc(days[i])}: {_fmt(v)}</title></circle>"
            )
        parts.append("</g>")
    legend_y = H - 8
    lx = PAD_L
    for si, name in enumerate(list(series)[:MAX_SERIES]):
        parts.append(f'<rect class="key s{si}" x="{lx}" y="{legend_y - 9}" width="10" height="10"/>')
        label = name if len(name) <= 18 else name[:17] + "…"
        parts.append(f'<text class="legend" x="{lx + 14}" y="{legend_y}">{esc(label)}</text>')
        lx += 24 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)
