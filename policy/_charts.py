"""Hand-written inline SVG charts for the decision-log report (:mod:`._report`).

Pure string building: a :class:`Timeline` of UTC buckets (per hour under two days, else per
day), stacked bars over it, labelled horizontal bars, and the step line of ε spent against a
budget. Every text is escaped with :func:`esc`, which also replaces the characters XML
forbids, so each SVG stays well formed whatever a log entry says. No scripts, fonts or links.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = [
    "ALLOW",
    "DENY",
    "PURGE",
    "SPENT",
    "Timeline",
    "budget_chart",
    "esc",
    "horizontal_bars",
    "num",
    "stacked_bars",
]

ALLOW, DENY, SPENT, PURGE = "#2e7d32", "#c62828", "#1565c0", "#6d4c41"
_W, _H = 760, 250  # chart size in SVG user units
_L, _R, _T, _B = 56, 16, 30, 40  # chart margins: left, right, top, bottom
_PLOT_W = _W - _L - _R
_HOUR, _DAY = timedelta(hours=1), timedelta(days=1)
_SVG_NS = "http://www.w3.org/2000/svg"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(value: object) -> str:
    """Escaped, and with characters XML forbids replaced, so every SVG stays well formed."""
    return _NOT_XML.sub("\ufffd", html.escape(str(value)))


def num(value: float) -> str:
    """Counts as integers, everything else with four significant digits."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


@dataclass(frozen=True)
class Timeline:
    """Per-day buckets, or per-hour when the span is under two days (else too few bars), UTC."""

    start: datetime
    unit: timedelta
    count: int

    @classmethod
    def of(cls, times: Sequence[datetime]) -> Timeline | None:
        if not times:
            return None
        first, last = min(times), max(times)
        unit = _HOUR if last - first < 2 * _DAY else _DAY
        start = _floor(first, unit)
        return cls(start, unit, (_floor(last, unit) - start) // unit + 1)

    def slot(self, at: datetime) -> int:
        return (at - self.start) // self.unit

    def x(self, at: datetime) -> float:
        return _L + _PLOT_W * ((at - self.start) / (self.unit * self.count))

    def placed(self, points: Sequence[tuple[datetime, float]]) -> list[tuple[float, float]]:
        return [(self.x(at), value) for at, value in points]

    def slot_x(self, index: int) -> float:
        return _L + _PLOT_W * index / self.count

    def ticks(self) -> list[tuple[float, str]]:
        """At most about eight labels, at the middle of their bucket."""
        every = math.ceil(self.count / 8)
        fmt = "%Y-%m-%d" if self.unit == _DAY else "%m-%d %H:00"
        return [
            (self.slot_x(i) + _PLOT_W / self.count / 2, (self.start + i * self.unit).strftime(fmt))
            for i in range(0, self.count, every)
        ]


def _floor(at: datetime, unit: timedelta) -> datetime:
    at = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if unit == _DAY else at


def _svg(title: str, height: float, parts: Sequence[str]) -> str:
    size, label = f'viewBox="0 0 {_W} {height:.0f}" width="{_W}" height="{height:.0f}"', esc(title)
    return (f'<svg xmlns="{_SVG_NS}" {size} role="img" aria-label="{label}">'
            f"<title>{label}</title>{''.join(parts)}</svg>")  # fmt: skip


def _ticks(high: float, *, whole: bool) -> list[float]:
    """0 and about five round steps (1, 2 or 5 times a power of ten) reaching ``high``."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / 5
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(step, 1.0) if whole else step
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _y(value: float, top: float) -> float:
    return _T + (_H - _T - _B) * (1 - value / top)


def _axes(ticks: Sequence[float], xticks: Sequence[tuple[float, str]], unit: str) -> str:
    """Grid lines with value labels, time ticks below, the two axis lines and the unit."""
    base, top, right = _H - _B, ticks[-1], _W - _R
    parts = [f'<line class="grid" x1="{_L}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
             f'<text x="{_L - 6}" y="{y + 4:.1f}" text-anchor="end">{num(t)}</text>'
             for t, y in ((t, _y(t, top)) for t in ticks)]  # fmt: skip
    parts += [f'<line class="axis" x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}"/>'
              f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{esc(label)}</text>'
              for x, label in xticks]  # fmt: skip
    parts.append(f'<path class="axis" d="M{_L},{_T}V{base}H{right}" fill="none"/>'
                 f'<text x="{right}" y="{_H - 6}" text-anchor="end">'
                 f"{esc(unit)}</text>")  # fmt: skip
    return "".join(parts)


def _legend(items: Sequence[tuple[str, str]]) -> str:
    parts, x = [], float(_L)
    for name, colour in items:
        parts.append(f'<rect x="{x:.0f}" y="8" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{x + 16:.0f}" y="18">{esc(name)}</text>')  # fmt: skip
        x += 40 + 7 * len(name)
    return "".join(parts)


def stacked_bars(
    timeline: Timeline, series: Sequence[tuple[str, str, Sequence[float]]], title: str
) -> str:
    """Bars per time bucket, stacked in the order of ``series`` (name, colour, values)."""
    ticks = _ticks(max(sum(s[2][i] for s in series) for i in range(timeline.count)), whole=True)
    width = max(_PLOT_W / timeline.count * 0.8, 0.5)
    unit = "UTC, per day" if timeline.unit == _DAY else "UTC, per hour"
    parts = [_axes(ticks, timeline.ticks(), unit)]
    for i in range(timeline.count):
        base, x = 0.0, timeline.slot_x(i) + _PLOT_W / timeline.count * 0.1
        for name, colour, values in series:
            if values[i]:
                y0, y1 = _y(base, ticks[-1]), _y(base + values[i], ticks[-1])
                parts.append(f'<rect x="{x:.2f}" y="{y1:.1f}" width="{width:.2f}" '
                             f'height="{y0 - y1:.1f}" fill="{colour}"><title>{esc(name)}: '
                             f"{num(values[i])}</title></rect>")  # fmt: skip
            base += values[i]
    parts.append(_legend([(name, colour) for name, colour, _ in series]))
    return _svg(title, _H, parts)


def horizontal_bars(items: Sequence[tuple[str, int]], title: str, colour: str) -> str:
    """One labelled bar per item, the count written at its end."""
    label_w, row, high = 200, 22, max(v for _, v in items)
    span = _W - label_w - _R - 40
    parts = [f'<line class="axis" x1="{label_w}" y1="{_T - 4}" x2="{label_w}" '
             f'y2="{_T + row * len(items)}"/>']  # fmt: skip
    for i, (label, value) in enumerate(items):
        y, w = _T + i * row, span * value / high
        parts.append(f"<g><title>{esc(label)}: {value}</title>"
                     f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{esc(label)}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" '
                     f'fill="{colour}"/><text x="{label_w + w + 6:.1f}" y="{y + 15}">{value}</text>'
                     "</g>")  # fmt: skip
    return _svg(title, _T + row * len(items) + 10, parts)


def _steps(points: Sequence[tuple[float, float]], top: float, end: float) -> str:
    """Path of a step line: each value holds until the next one, the last until ``end``."""
    path = f"M{points[0][0]:.1f},{_y(points[0][1], top):.1f}"
    for x, value in points[1:]:
        path += f"H{x:.1f}V{_y(value, top):.1f}"
    return path + f"H{end:.1f}"


def budget_chart(
    region: str,
    spent: Sequence[tuple[datetime, float]],
    refused: Sequence[tuple[datetime, float]],
    budget: Sequence[tuple[datetime, float]],
    line: Timeline,
) -> str:
    """ε spent in ``region`` as a step line, its budget dashed, refused rounds as dots (each
    at the ε it would have reached)."""
    ticks = _ticks(max(v for _, v in [*spent, *refused, *budget]) * 1.05, whole=False)
    parts = [_axes(ticks, line.ticks(), "UTC")]
    if budget:
        parts.append(f'<path d="{_steps(line.placed(budget), ticks[-1], _W - _R)}" fill="none" '
                     f'stroke="{DENY}" stroke-width="1.5" stroke-dasharray="6 4"/>'
                     f'<text x="{_W - _R}" y="{_y(budget[-1][1], ticks[-1]) - 5:.1f}" '
                     f'text-anchor="end">budget ε {num(budget[-1][1])}</text>')  # fmt: skip
    if spent:
        parts.append(f'<path d="{_steps(line.placed(spent), ticks[-1], _W - _R)}" fill="none" '
                     f'stroke="{SPENT}" stroke-width="2"/>')  # fmt: skip
    for x, value in line.placed(refused):
        y = _y(value, ticks[-1])
        tip = f"refused round: would reach ε {num(value)}"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{DENY}">'
                     f"<title>{tip}</title></circle>")  # fmt: skip
    legend = [(f"{region}: ε spent", SPENT), ("budget (dashed)", DENY), ("refused round", DENY)]
    parts.append(_legend(legend))
    return _svg(f"Privacy budget spent in region {region}", _H, parts)
