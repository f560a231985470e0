"""Prompts as attribute words, and a deterministic text encoder.

A prompt is the attribute words of its objects (colour, shape, direction, speed, then the
background). The encoder maps each word to a fixed embedding (a seeded table over the
vocabulary, shipped with the model), adds a position embedding, and pads to ``max_tokens``.
The empty prompt (the unconditional branch of CFG) is all padding (zeros).
"""

from __future__ import annotations

import torch

from .data import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, VideoSpec

VOCAB = ("<and>",) + tuple(sorted(COLORS)) + SHAPES + tuple(sorted(DIRECTIONS)) + tuple(sorted(SPEEDS)) + \
    tuple(f"bg-{b}" for b in sorted(BACKGROUNDS))


def prompt_tokens(spec: VideoSpec | None) -> list[str]:
    if spec is None:
        return []
    words: list[str] = []
    for i, o in enumerate(spec.objects):
        if i:
            words.append("<and>")
        words += [o.color, o.shape, o.direction, o.speed]
    return words + [f"bg-{spec.background}"]


class TextEncoder:
    def __init__(self, dim: int, max_tokens: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.max_tokens = dim, max_tokens
        self.table = torch.randn(len(VOCAB), dim, generator=g)
        self.positions = 0.1 * torch.randn(max_tokens, dim, generator=g)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"table": self.table, "positions": self.positions}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.table, self.positions = state["table"].clone(), state["positions"].clone()

    def __call__(self, spec: VideoSpec | None) -> torch.Tensor:
        """[max_tokens, dim]: word embeddings + positions; padding (and the empty prompt) is zero."""
        words = prompt_tokens(spec)
        if len(words) > self.max_tokens:
            raise ValueError(f"prompt of {len(words)} words exceeds max_tokens={self.max_tokens}")
        out = torch.zeros(self.max_tokens, self.dim)
        for i, word in enumerate(words):
            out[i] = self.table[VOCAB.index(word)] + self.positions[i]
        return out
