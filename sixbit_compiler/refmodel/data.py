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


SHAPE_IDS = {name: i for i, name in enumerate(SHAPES)}
MAX_OBJECTS = 2


def spec_tensors(specs: list[VideoSpec]) -> dict[str, torch.Tensor]:
    """The drawing parameters of a batch of specs (all of one size), as CPU tensors that
    :func:`render_tensors` draws on any device: per object slot, its centre in every frame,
    half-size, shape id, colour and whether the slot is used; per video, the background."""
    first = specs[0]
    if any((s.frames, s.height, s.width) != (first.frames, first.height, first.width) for s in specs):
        raise ValueError("a batch of specs must share frames, height and width")
    b, t = len(specs), first.frames
    cx, cy = torch.zeros(b, MAX_OBJECTS, t), torch.zeros(b, MAX_OBJECTS, t)
    half, shape = torch.zeros(b, MAX_OBJECTS), torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    color, used = torch.zeros(b, MAX_OBJECTS, 3), torch.zeros(b, MAX_OBJECTS, dtype=torch.bool)
    background = torch.tensor([BACKGROUNDS[s.background] for s in specs])
    for i, spec in enumerate(specs):
        if len(spec.objects) > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects a video, got {len(spec.objects)}")
        for j, obj in enumerate(spec.objects):
            path = [centre(obj, k / max(t - 1, 1)) for k in range(t)]
            cx[i, j], cy[i, j] = torch.tensor([p[0] for p in path]), torch.tensor([p[1] for p in path])
            half[i, j], shape[i, j], used[i, j] = obj.size / 2, SHAPE_IDS[obj.shape], True
            color[i, j] = torch.tensor(COLORS[obj.color])
    return {"cx": cx, "cy": cy, "half": half, "shape": shape, "color": color, "used": used, "background": background}


def shape_mask(kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor, height: int,
               width: int) -> torch.Tensor:
    """[B, T, H, W] masks of shapes ``kind`` [B] (``SHAPE_IDS``) of half-size ``half`` [B] centred at
    ``cx``, ``cy`` [B, T] (fractions of the frame): the one definition of each shape, for rendering
    and for the metrics' shape templates."""
    dev = cx.device
    yy = ((torch.arange(height, device=dev, dtype=torch.float32) + 0.5) / height).view(1, 1, height, 1)
    xx = ((torch.arange(width, device=dev, dtype=torch.float32) + 0.5) / width).view(1, 1, 1, width)
    b = cx.shape[0]
    dx, dy = xx - cx[..., None, None], yy - cy[..., None, None]  # [B, T, 1, W], [B, T, H, 1]
    half = half.view(b, 1, 1, 1)
    square = (dx.abs() <= half) & (dy.abs() <= half)
    circle = dx**2 + dy**2 <= half**2
    # triangle: apex up, base at the bottom of the bounding box; its width grows linearly downwards
    frac = ((dy + half) / (2 * half)).clamp(0, 1)
    triangle = (dy.abs() <= half) & (dx.abs() <= frac * half)
    kind = kind.view(b, 1, 1, 1)
    return torch.where(kind == SHAPE_IDS["circle"], circle, torch.where(kind == SHAPE_IDS["square"], square, triangle))


def render_tensors(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Videos [B, T, H, W, 3] in [0, 1] from :func:`spec_tensors`, on the device the tensors are on
    (training renders its batches on the GPU). Later object slots are drawn on top."""
    cx, cy = params["cx"], params["cy"]
    b, _, t = cx.shape
    video = params["background"].view(b, 1, 1, 1, 3).expand(b, t, height, width, 3)
    for j in range(cx.shape[1]):
        mask = shape_mask(params["shape"][:, j], cx[:, j], cy[:, j], params["half"][:, j], height, width)
        mask = mask & params["used"][:, j].view(b, 1, 1, 1)
        video = torch.where(mask[..., None], params["color"][:, j].view(b, 1, 1, 1, 3), video)
    return video.contiguous()


def render(spec: VideoSpec) -> torch.Tensor:
    """The video of ``spec``: [T, H, W, 3] in [0, 1]. Later objects are drawn on top."""
    return render_tensors(spec_tensors([spec]), spec.height, spec.width)[0]


def describe(spec: VideoSpec) -> str:
    return " and ".join(f"a {o.color} {o.shape} moving {o.direction} {o.speed}" for o in spec.objects) + \
        f" on {spec.background}"


