"""The project's own reference video DiT (issue 7): data, prompts, text encoder, task metrics.

No model hub is reachable here, so quality is judged on a small Wan-architecture model the
project trains on procedural videos of moving coloured shapes, whose success can be measured
without learned metrics. This package holds what does not need a GPU: the video generator
(:mod:`.data`), the prompt vocabulary and deterministic text encoder (:mod:`.text`) and the
task metrics (:mod:`.metrics`). Training, the shipped weights and sampling come next.
"""

from .data import COLORS, DIRECTIONS, SHAPES, SPEEDS, ObjectSpec, VideoSpec, random_spec, render
from .metrics import adherence, track_color
from .text import VOCAB, TextEncoder, prompt_tokens

__all__ = [
    "COLORS", "DIRECTIONS", "SHAPES", "SPEEDS", "ObjectSpec", "VideoSpec", "random_spec", "render",
    "adherence", "track_color", "VOCAB", "TextEncoder", "prompt_tokens",
]
