"""Heatmap PNG output: matplotlib when installed (the `analysis` extra), else a tiny pure-python/zlib writer."""

from __future__ import annotations

import struct
import zlib


def write_png_rgb(path: str, pixels: list[list[tuple[int, int, int]]]) -> None:
    """Writes an 8-bit RGB PNG from rows of (r, g, b) tuples."""
    h, w = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _colour(v: float) -> tuple[int, int, int]:
    # white (0) -> dark blue (1): readable without a legend library
    v = min(1.0, max(0.0, v))
    return int(255 * (1 - v)), int(255 * (1 - 0.8 * v)), int(255 - 100 * v)


def write_heatmaps(path: str, panels: list[tuple[str, list[str], list[list[float]]]], cell: int = 24) -> str:
    """panels: (title, row labels, matrix rows x experts) per layer; returns the backend used."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rows = []
        for _, _, mat in panels:
            vmax = max(max(r) for r in mat) or 1.0
            for r in mat:
                line = [c for v in r for c in [_colour(v / vmax)] * cell]
                rows += [line] * cell
            rows += [[(255, 255, 255)] * len(rows[-1])] * (cell // 2)
        write_png_rgb(path, rows)
        return "zlib"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, labels, mat) in zip(axes[0], panels):
        im = ax.imshow(mat, cmap="Blues", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(len(mat[0])), [str(i) for i in range(len(mat[0]))], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"
