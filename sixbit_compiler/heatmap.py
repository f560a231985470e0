"""A blocks x calls picture of one generation: what each block ran at each model call.

Rows are blocks (top: the first), columns are model calls in order (steps, and CFG branches
within a step). A skipped block is black; a computed one is coloured by the mean activation
bits of its quantized layers: blue for NVFP4 (4.5), green for INT8 / FP8 (8), red for bf16 (16),
mixes in between. Written to the dump dir at the end of each generation.
"""

from __future__ import annotations

from .formats import Precision

_COLORS = {4.5: (40, 90, 230), 8.0: (40, 190, 80), 16.0: (220, 50, 40)}


def _color(bits: float) -> tuple[int, int, int]:
    stops = sorted(_COLORS)
    if bits <= stops[0]:
        return _COLORS[stops[0]]
    for lo, hi in zip(stops, stops[1:]):
        if bits <= hi:
            f = (bits - lo) / (hi - lo)
            return tuple(round(a + f * (b - a)) for a, b in zip(_COLORS[lo], _COLORS[hi]))  # type: ignore[return-value]
    return _COLORS[stops[-1]]


def block_grid(records, block_names, slot_blocks) -> list[list[float | None]]:
    """Per block, per call: mean activation bits of its layers, or None where it was skipped."""
    grid = []
    for index, block in enumerate(block_names):
        slots = [i for i, b in enumerate(slot_blocks) if b == block]
        row = []
        for r in records:
            if index in r.skipped:
                row.append(None)
            elif slots:
                row.append(sum(Precision(r.precisions[i]).bits for i in slots) / len(slots))
            else:
                row.append(16.0)
        grid.append(row)
    return grid


def write_heatmap(path: str, records, block_names, slot_blocks, cell: int = 8) -> None:
    from PIL import Image, ImageDraw

    grid = block_grid(records, block_names, slot_blocks)
    rows, cols = len(grid), len(records)
    legend = 16
    img = Image.new("RGB", (max(cols * cell, 160), rows * cell + legend), "white")
    draw = ImageDraw.Draw(img)
    for y, row in enumerate(grid):
        for x, bits in enumerate(row):
            fill = (0, 0, 0) if bits is None else _color(bits)
            draw.rectangle([x * cell, legend + y * cell, (x + 1) * cell - 1, legend + (y + 1) * cell - 1], fill=fill)
    draw.text((2, 2), "skip=black nvfp4=blue int8=green bf16=red", fill=(0, 0, 0))
    img.save(path)
