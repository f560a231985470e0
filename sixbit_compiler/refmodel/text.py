"""Prompts as attribute words, and a deterministic text encoder.

A prompt is the attribute words of its objects (colour, shape, direction, speed) and of the
background. The encoder gives one token per object, the normalised sum of its words'
embeddings (a seeded table over the vocabulary, shipped with the model), then one token for the
background, and pads to ``max_tokens`` with zeros. One token per object binds each motion to
its object in the embedding itself, as a real text encoder's contextual embeddings do, so the
small model spends its training on the video rather than on parsing word order. The empty
prompt (the unconditional branch of CFG) is all padding (zeros).
"""

from __future__ import annotations

import torch

from .data import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, SPEEDS, VideoSpec

VOCAB = tuple(sorted(COLORS)) + SHAPES + tuple(sorted(DIRECTIONS)) + tuple(sorted(SPEEDS)) + \
    tuple(f"bg-{b}" for b in sorted(BACKGROUNDS))


def prompt_words(spec: VideoSpec | None) -> list[list[str]]:
    """The words of each token: one group per object, then the background."""
    if spec is None:
        return []
    return [[o.color, o.shape, o.direction, o.speed] for o in spec.objects] + [[f"bg-{spec.background}"]]


class TextEncoder:
    def __init__(self, dim: int, max_tokens: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.max_tokens = dim, max_tokens
        self.table = torch.randn(len(VOCAB), dim, generator=g)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.table = state["table"].clone()

    def __call__(self, spec: VideoSpec | None) -> torch.Tensor:
        """[max_tokens, dim]: one token per object and one for the background; padding (and the
        empty prompt) is zero."""
        groups = prompt_words(spec)
        if len(groups) > self.max_tokens:
            raise ValueError(f"prompt of {len(groups)} tokens exceeds max_tokens={self.max_tokens}")
        out = torch.zeros(self.max_tokens, self.dim)
        for i, words in enumerate(groups):
            out[i] = self.table[[VOCAB.index(w) for w in words]].sum(0) / len(words) ** 0.5
        return out
