"""Task metrics computed from frames alone: prompt adherence and temporal consistency.

Objects are found by colour segmentation (pixels within ``tol`` of the prompted RGB), then
tracked by their per-frame centroid and area. For each prompted object:

* present: its colour covers at least ``min_area`` of the frame in 80 % of the frames;
* shape: per frame, the candidate shape whose ideal mask (same area, same centroid) overlaps
  the segmented mask best (intersection over union), majority vote over frames. Unlike the
  bounding-box fill ratio used first, a few ragged edge pixels or one stray pixel do not flip
  a square into a circle;
* direction: the centroid moves along the prompted axis, the prompted way, by at least
  ``min_travel`` of the frame, and by less than that across it;
* temporal consistency: the coefficient of variation of its area over frames and the
  spread of its mean colour (small is stable).

A video adheres to its prompt when every object is present, has the right shape and moves
the right way. Frames are ``[T, H, W, 3]`` in [0, 1].
"""

from __future__ import annotations

import math

import torch

from .data import COLORS, DIRECTIONS, SHAPE_IDS, SHAPES, VideoSpec, shape_mask


def color_mask(video: torch.Tensor, color: str, tol: float = 0.3) -> torch.Tensor:
    target = torch.tensor(COLORS[color], dtype=video.dtype)
    return (video - target).norm(dim=-1) < tol


def track_color(video: torch.Tensor, color: str, tol: float = 0.3) -> dict:
    """Per frame: area (fraction of the frame), centroid (x, y in [0, 1]), the best-matching shape
    and its IoU with the mask (:func:`classify_shape`), and the mean colour of the mask."""
    mask = color_mask(video.float(), color, tol)
    t, h, w = mask.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    areas, centroids, shapes, colors = [], [], [], []
    for f in range(t):
        m = mask[f]
        n = int(m.sum())
        areas.append(n / (h * w))
        if n == 0:
            centroids.append(None)
            shapes.append(None)
            colors.append(None)
            continue
        yy, xx = torch.nonzero(m, as_tuple=True)
        centroids.append((float(xs[xx].mean()), float(ys[yy].mean())))
        shapes.append(classify_shape(m, *centroids[-1]))
        colors.append(video[f][m].float().mean(0))
    return {"area": areas, "centroid": centroids, "shape": shapes, "color": colors}


def classify_shape(mask: torch.Tensor, cx: float, cy: float) -> tuple[str, float]:
    """(shape, IoU): the shape whose ideal mask, of the mask's area and centroid, overlaps ``mask``
    [H, W] (a square frame) best. Sizes from the area A (fraction of the frame): a square's side
    is sqrt(A), a circle's diameter 2 sqrt(A / pi), a triangle's side sqrt(2 A); a triangle's
    centroid lies a sixth of its side below its box centre."""
    h, w = mask.shape
    if h != w:
        raise ValueError(f"shape templates need square frames, got {h}x{w}")
    area = float(mask.sum()) / (h * w)
    side = {"square": math.sqrt(area), "circle": 2 * math.sqrt(area / math.pi), "triangle": math.sqrt(2 * area)}
    kinds = torch.tensor([SHAPE_IDS[s] for s in SHAPES])
    half = torch.tensor([side[s] / 2 for s in SHAPES])
    ys = torch.tensor([[cy - (side[s] / 6 if s == "triangle" else 0.0)] for s in SHAPES])
    xs = torch.full((len(SHAPES), 1), cx)
    templates = shape_mask(kinds, xs, ys, half, h, w)[:, 0]  # [shapes, H, W]
    inter = (templates & mask).flatten(1).sum(1).float()
    union = (templates | mask).flatten(1).sum(1).float()
    iou = inter / union.clamp(min=1)
    best = int(iou.argmax())
    return SHAPES[best], float(iou[best])


def adherence(video: torch.Tensor, spec: VideoSpec, min_area: float = 0.01, min_travel: float = 0.1) -> dict:
    """Per-object checks and the overall verdict (see the module docstring)."""
    objects = []
    for obj in spec.objects:
        tr = track_color(video, obj.color)
        frames = len(tr["area"])
        present_frames = [i for i, a in enumerate(tr["area"]) if a >= min_area]
        present = len(present_frames) >= 0.8 * frames
        shape = direction_ok = None
        area_cv = color_spread = float("inf")
        if present:
            votes = [tr["shape"][i][0] for i in present_frames]
            shape = max(set(votes), key=votes.count)
            (x0, y0), (x1, y1) = tr["centroid"][present_frames[0]], tr["centroid"][present_frames[-1]]
            dx, dy = DIRECTIONS[obj.direction]
            along = (x1 - x0) * dx + (y1 - y0) * dy
            across = abs((x1 - x0) * dy) + abs((y1 - y0) * dx)
            direction_ok = along >= min_travel and across < min_travel
            areas = torch.tensor([tr["area"][i] for i in present_frames])
            area_cv = float(areas.std(unbiased=False) / areas.mean())
            cols = torch.stack([tr["color"][i] for i in present_frames])
            color_spread = float(cols.std(0, unbiased=False).max())
        ok = bool(present and shape == obj.shape and direction_ok)
        objects.append({"color": obj.color, "present": present, "shape": shape, "shape_ok": shape == obj.shape,
                        "direction_ok": bool(direction_ok), "area_cv": area_cv, "color_spread": color_spread, "ok": ok})
    return {"ok": all(o["ok"] for o in objects), "objects": objects}
