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


def parse_prompt(text: str) -> VideoSpec:
    """The spec of a prompt in :func:`describe`'s words, e.g. ``"a red square moving right fast and
    a blue circle moving up slow on gray"``: per object (split on "and") one colour, shape,
    direction and speed; the background after "on" (black when absent). The objects' start
    positions are placeholders: the prompt does not give them, the model chooses."""
    from .data import MAX_OBJECTS, ObjectSpec

    body, _, background = text.strip().lower().partition(" on ")
    background = background.strip() or "black"
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r} in prompt {text!r}; one of {sorted(BACKGROUNDS)}")
    objects = []
    for part in body.split(" and "):
        words = part.replace(",", " ").split()
        found = {}
        for kind, names in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS)):
            hits = [w for w in words if w in names]
            if len(hits) != 1:
                raise ValueError(f"object {part.strip()!r} of prompt {text!r} needs exactly one {kind} "
                                 f"(one of {sorted(names)}), found {hits or 'none'}")
            found[kind] = hits[0]
        objects.append(ObjectSpec(found["color"], found["shape"], found["direction"], found["speed"], (0.5, 0.5)))
    if len(objects) > MAX_OBJECTS or len({o.color for o in objects}) != len(objects):
        raise ValueError(f"prompt {text!r}: at most {MAX_OBJECTS} objects, of distinct colours")
    return VideoSpec(tuple(objects), background)
