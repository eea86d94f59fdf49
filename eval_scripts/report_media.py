"""Pictures for a self-contained report: image thumbnails and matplotlib charts as ``data:`` URIs.

Thumbnails are WebP (JPEG where Pillow lacks WebP) of at most ``size`` pixels a side, encoded once
per (path, size). Charts are PNGs drawn with matplotlib's Agg backend.
"""
from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@lru_cache(maxsize=4096)
def thumbnail(path: str, size: int = 128, quality: int = 60) -> str | None:
    """A ``data:`` URI of the image at ``path`` scaled to fit ``size`` x ``size``, or None when it
    cannot be read (a cache moved or cleared since the run)."""
    from PIL import Image, UnidentifiedImageError, features

    try:
        with Image.open(Path(path)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            if features.check("webp"):
                im.save(buf, "WEBP", quality=quality, method=4)
                return _data_uri(buf.getvalue(), "image/webp")
            im.save(buf, "JPEG", quality=quality, optimize=True)
            return _data_uri(buf.getvalue(), "image/jpeg")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return _data_uri(buf.getvalue(), "image/png")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _top(values) -> float:
    """The top of a percentage axis: a little above the largest value (at least 10, at most 100)."""
    return min(100.0, max([10.0, *(1.15 * v for v in values)]))


def k_plot(series: dict[str, list[tuple[int, float]]], metric: str) -> str:
    """Metric against k, one line per task (k = 0 is text-only)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ks = sorted({k for points in series.values() for k, _ in points})
    for task, points in series.items():
        ax.plot([k for k, _ in points], [v for _, v in points], "o-", label=task)
    ax.set_xticks(ks, ["text\nonly" if k == 0 else str(k) for k in ks])
    ax.set_ylim(0, _top(v for points in series.values() for _, v in points))
    ax.set_xlabel("generated images per input (k)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs k")
    return _png(fig)


def subset_chart(task: str, values: dict[str, dict[str, float]], metric: str) -> str:
    """Grouped bars: ``values[series][subset]`` (a series per run)."""
    plt = _pyplot()
    subsets = list(dict.fromkeys(s for per in values.values() for s in per))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(subsets) + 2), 3.2))
    width = 0.8 / max(len(values), 1)
    for i, (name, per) in enumerate(values.items()):
        xs = [j + (i - (len(values) - 1) / 2) * width for j in range(len(subsets))]
        ax.bar(xs, [per.get(s, 0.0) for s in subsets], width, label=name)
    ax.set_xticks(range(len(subsets)), subsets, fontsize=8)
    ax.set_ylim(0, _top(v for per in values.values() for v in per.values()))
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} per subset")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _png(fig)
