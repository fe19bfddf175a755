"""The serving benchmark's built-in PNG charts (no matplotlib): lines at the right places, ticks, odd inputs."""

import math

from marserve.bench.serve_plots import SERIES_COLOURS, draw_chart, write_chart


def test_each_series_is_drawn_in_its_colour_at_its_points():
    img = draw_chart([("a", [(1, 100.0), (4, 300.0), (16, 400.0)]), ("b", [(1, 50.0), (16, 60.0)])])
    h, w = len(img), len(img[0])
    # x on a log2 axis from 1 to 16 across [64, 456], y from 0 (at h - 28) to 400 (at 12).
    x_of = lambda x: round(64 + math.log2(x) / 4 * (w - 16 - 8 - 64))  # noqa: E731
    y_of = lambda y: round(h - 28 + y / 400 * (12 - (h - 28)))  # noqa: E731
    assert img[y_of(300)][x_of(4)] == SERIES_COLOURS[0]
    assert img[y_of(400)][x_of(16)] == SERIES_COLOURS[0]
    assert img[y_of(60)][x_of(16)] == SERIES_COLOURS[1]
    assert img[y_of(200)][x_of(2)] != SERIES_COLOURS[1]  # b passes far below there
    ink = {px for row in img[h - 20:] for px in row}
    assert (60, 60, 60) in ink  # the x tick labels are drawn under the axis


def test_odd_inputs_still_make_a_png(tmp_path):
    for i, series in enumerate([[("nan only", [(1, math.nan)])], [("zeros", [(1, 0.0), (2, 0.0)])],
                                [("one point", [(8, 1e6)])], [("tiny", [(0.5, 0.001), (1024, 0.002)])]]):
        path = tmp_path / f"{i}.png"
        assert write_chart(str(path), "t", "x", "y", series) in ("zlib", "matplotlib")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
