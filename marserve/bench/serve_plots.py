"""The serving benchmark's PNG plots: latency vs request rate, throughput vs concurrency.

matplotlib draws them with titles, axis names and legends when it is installed (the `analysis` extra);
without it a small line-chart rasteriser over analysis/png.py's PNG writer draws the same lines with numbered
ticks but no words (the figures are in the printed table and the JSON beside the plot; the lines' colours
follow SERIES_COLOURS in the order of the series, as listed in the JSON and the docs).
"""

from __future__ import annotations

import math

from marserve.analysis.png import write_png_rgb

# (label, [(x, y), ...]) per line
Series = list[tuple[str, list[tuple[float, float]]]]
SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


# 3x5 pixel digits for the tick labels of the built-in writer (drawn 2x): each row is 3 bits, left to right.
_GLYPHS = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
           "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
           "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000"}
_INK, _AXIS, _GRID = (60, 60, 60), (90, 90, 90), (225, 225, 225)


def _text(img, x: int, y: int, text: str, scale: int = 2) -> None:
    """Digits with their top-left corner at (x, y); characters without a glyph are left blank."""
    for k, ch in enumerate(text):
        for bit, on in enumerate(_GLYPHS.get(ch, "0" * 15)):
            if on == "1":
                for dy in range(scale):
                    for dx in range(scale):
                        img[y + bit // 3 * scale + dy][x + (k * 4 + bit % 3) * scale + dx] = _INK


def _nice_step(top: float, ticks: int = 5) -> float:
    """A round step (1, 2 or 5 x 10^k) giving about `ticks` steps from 0 to top."""
    raw = top / ticks if top > 0 else 1.0
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def _scale(values: list[float], log: bool, lo_px: int, hi_px: int):
    """A function value -> pixel over the values' range (log2 for x axes of rates and concurrencies)."""
    f = (lambda v: math.log2(v)) if log else (lambda v: v)
    vs = [f(v) for v in values]
    lo, hi = min(vs), max(vs)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    return lambda v: round(lo_px + (f(v) - lo) / (hi - lo) * (hi_px - lo_px))


def _line(img, x0: int, y0: int, x1: int, y1: int, colour) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        img[round(y0 + (y1 - y0) * i / steps)][round(x0 + (x1 - x0) * i / steps)] = colour


def draw_chart(series: Series, width: int = 480, height: int = 320, log_x: bool = True):
    """Rows of RGB pixels: y gridlines labelled from 0, x ticks labelled at the data's x values, then each series
    as a polyline with 5x5 dots at its points."""
    img = [[(255, 255, 255)] * width for _ in range(height)]
    left, right, top, bottom = 56, 16, 12, 28
    points = [p for _, pts in series for p in pts]
    if not points:  # nothing finite to draw (every request of every point failed): an empty frame
        _line(img, left, height - bottom, width - right, height - bottom, _AXIS)
        return img
    step = _nice_step(max(y for _, y in points))
    y_top = step * math.ceil(max(y for _, y in points) / step) or step
    to_x = _scale([x for x, _ in points], log_x, left + 8, width - right - 8)
    to_y = _scale([0.0, y_top], False, height - bottom, top)
    for k in range(round(y_top / step) + 1):
        y = to_y(k * step)
        _line(img, left, y, width - right, y, _GRID)
        label = f"{k * step:.0f}" if step >= 1 else f"{k * step:.4g}"
        _text(img, max(0, left - 6 - 8 * len(label)), y - 5, label)
    for x in sorted({x for x, _ in points}):
        px, label = to_x(x), f"{x:.4g}"
        _line(img, px, height - bottom, px, height - bottom + 4, _AXIS)
        _text(img, min(max(0, px - 4 * len(label)), width - 8 * len(label)), height - bottom + 8, label)
    _line(img, left, height - bottom, width - right, height - bottom, _AXIS)
    _line(img, left, height - bottom, left, top, _AXIS)
    for k, (_, pts) in enumerate(series):
        colour = SERIES_COLOURS[k % len(SERIES_COLOURS)]
        px = [(to_x(x), to_y(y)) for x, y in sorted(pts)]
        for (a, b), (c, d) in zip(px, px[1:]):
            _line(img, a, b, c, d, colour)
        for x, y in px:
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    img[y + dy][x + dx] = colour
    return img


def write_chart(path: str, title: str, xlabel: str, ylabel: str, series: Series, log_x: bool = True) -> str:
    """Writes the chart to `path`; returns the backend used ('matplotlib' or 'zlib')."""
    series = [(label, [(x, y) for x, y in pts if math.isfinite(y)]) for label, pts in series]
    series = [(label, pts) for label, pts in series if pts]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png_rgb(path, draw_chart(series, log_x=log_x))
        return "zlib"
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series:
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"
