"""The serving benchmark's PNG plots: latency vs request rate, throughput vs concurrency.

matplotlib draws them with axes and legends when it is installed (the `analysis` extra); without it a small
line-chart rasteriser over analysis/png.py's PNG writer draws the same lines, unlabelled (the figures are in
the printed table and the JSON beside the plot; the colours follow SERIES_COLOURS, in the order listed there).
"""

from __future__ import annotations

import math

from marserve.analysis.png import write_png_rgb

# (label, [(x, y), ...]) per line
Series = list[tuple[str, list[tuple[float, float]]]]
SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


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
    """Rows of RGB pixels: axes, then each series as a polyline with 5x5 dots at its points."""
    img = [[(255, 255, 255)] * width for _ in range(height)]
    margin = 24
    points = [p for _, pts in series for p in pts]
    to_x = _scale([x for x, _ in points], log_x, margin, width - margin)
    to_y = _scale([0.0] + [y for _, y in points], False, height - margin, margin)  # y from 0 up
    _line(img, margin, height - margin, width - margin, height - margin, (90, 90, 90))
    _line(img, margin, height - margin, margin, margin, (90, 90, 90))
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
