"""Procedural videos: one or two coloured shapes moving in a prompted direction and speed.

A video is ``[T, H, W, 3]`` float in [0, 1]. Everything is deterministic given a
:class:`VideoSpec` (which :func:`random_spec` draws from a seed), so a dataset is a seed
range and needs no files.
"""

from __future__ import annotations

import dataclasses
import random

import torch

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.15, 0.85), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slow": 0.25, "fast": 0.5}  # fraction of the frame crossed over the clip
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.45, 0.45, 0.45), "white": (0.95, 0.95, 0.95)}


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    direction: str
    speed: str
    start: tuple[float, float]  # centre at frame 0, as fractions of width and height
    size: float = 0.22  # side / diameter as a fraction of the frame


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    objects: tuple[ObjectSpec, ...]
    background: str = "black"
    frames: int = 9
    height: int = 64
    width: int = 64


def centre(obj: ObjectSpec, progress: float) -> tuple[float, float]:
    dx, dy = DIRECTIONS[obj.direction]
    travel = SPEEDS[obj.speed]
    return obj.start[0] + dx * travel * progress, obj.start[1] + dy * travel * progress


def _apart(a: ObjectSpec, b: ObjectSpec, frames: int, margin: float = 0.04) -> bool:
    """True when the two objects never overlap (nor touch) in any frame."""
    for t in range(frames):
        p = t / max(frames - 1, 1)
        (ax, ay), (bx, by) = centre(a, p), centre(b, p)
        if max(abs(ax - bx), abs(ay - by)) < (a.size + b.size) / 2 + margin:
            return False
    return True


def random_spec(seed: int, frames: int = 9, height: int = 64, width: int = 64, max_objects: int = 2) -> VideoSpec:
    """A random, valid spec: objects of distinct colours that stay inside the frame and never
    overlap (so every object stays visible and measurable)."""
    rng = random.Random(seed)
    while True:
        spec = _draw(rng, frames, height, width, max_objects)
        objs = spec.objects
        if all(_apart(a, b, frames) for i, a in enumerate(objs) for b in objs[i + 1:]):
            return spec


def _draw(rng: random.Random, frames: int, height: int, width: int, max_objects: int) -> VideoSpec:
    n = rng.randint(1, max_objects)
    colors = rng.sample(sorted(COLORS), n)
    objects = []
    for color in colors:
        direction, speed = rng.choice(sorted(DIRECTIONS)), rng.choice(sorted(SPEEDS))
        dx, dy = DIRECTIONS[direction]
        travel = SPEEDS[speed]
        lo, hi = 0.2, 0.8
        # start so that the whole path stays within [lo, hi]
        sx = rng.uniform(lo, hi - travel) if dx > 0 else rng.uniform(lo + travel, hi) if dx < 0 else rng.uniform(lo, hi)
        sy = rng.uniform(lo, hi - travel) if dy > 0 else rng.uniform(lo + travel, hi) if dy < 0 else rng.uniform(lo, hi)
        objects.append(ObjectSpec(color, rng.choice(SHAPES), direction, speed, (sx, sy)))
    background = rng.choice(["black", "gray"])
    return VideoSpec(tuple(objects), background, frames, height, width)


def _mask(shape: str, cx: float, cy: float, size: float, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    half = size / 2
    if shape == "square":
        return ((xx - cx).abs() <= half) & ((yy - cy).abs() <= half)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        top, bottom = cy - half, cy + half
        frac = ((yy - top) / (bottom - top)).clamp(0, 1)
        inside_y = (yy >= top) & (yy <= bottom)
        return inside_y & ((xx - cx).abs() <= frac * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: VideoSpec) -> torch.Tensor:
    """The video of ``spec``: [T, H, W, 3] in [0, 1]. Later objects are drawn on top."""
    h, w = spec.height, spec.width
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    yy, xx = yy / h, xx / w
    video = torch.empty(spec.frames, h, w, 3)
    video[:] = torch.tensor(BACKGROUNDS[spec.background])
    for t in range(spec.frames):
        progress = t / max(spec.frames - 1, 1)
        for obj in spec.objects:
            cx, cy = centre(obj, progress)
            video[t][_mask(obj.shape, cx, cy, obj.size, yy, xx)] = torch.tensor(COLORS[obj.color])
    return video


def describe(spec: VideoSpec) -> str:
    return " and ".join(f"a {o.color} {o.shape} moving {o.direction} {o.speed}" for o in spec.objects) + \
        f" on {spec.background}"


