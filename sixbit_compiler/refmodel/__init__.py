"""The project's own reference video DiT (issue 7): data, prompts, text encoder, task metrics.

No model hub is reachable here, so quality is judged on a small Wan-architecture model the
project trains on procedural videos of moving coloured shapes, whose success can be measured
without learned metrics. This package holds what does not need a GPU: the video generator
(:mod:`.data`), the prompt vocabulary and deterministic text encoder (:mod:`.text`) and the
task metrics (:mod:`.metrics`); training (:mod:`.train`), sampling (:mod:`.model`) and the
evaluation (:mod:`.evaluate`) need diffusers. The trained weights ship with the package
(:func:`shipped_model_dir`; model card: ``docs/reference_model.md``).
"""

import os

from .data import COLORS, DIRECTIONS, SHAPES, SPEEDS, ObjectSpec, VideoSpec, random_spec, render
from .metrics import adherence, track_color
from .text import VOCAB, TextEncoder, prompt_words



def shipped_model_dir() -> str:
    """The directory of the trained reference model that ships with sixbit (load it with
    :func:`sixbit_compiler.refmodel.model.load`)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "refmodel")


__all__ = [
    "COLORS", "DIRECTIONS", "SHAPES", "SPEEDS", "ObjectSpec", "VideoSpec", "random_spec", "render",
    "adherence", "track_color", "VOCAB", "TextEncoder", "prompt_words", "shipped_model_dir",
]
