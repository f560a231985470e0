"""Reference-model data, text encoder and task metrics: known answers, and wrong videos fail."""

import pytest
import torch

from sixbit_compiler.refmodel import ObjectSpec, TextEncoder, VideoSpec, adherence, prompt_words, random_spec, render


def red_square_right(**kw):
    return VideoSpec((ObjectSpec("red", "square", "right", "fast", (0.25, 0.5)),), **kw)


def test_render_shape_and_range_and_determinism():
    spec = random_spec(3)
    v = render(spec)
    assert v.shape == (spec.frames, spec.height, spec.width, 3) and 0 <= float(v.min()) and float(v.max()) <= 1
    assert torch.equal(v, render(random_spec(3)))
    assert random_spec(3) == spec and random_spec(4) != spec


def test_red_square_moving_right_scores_as_such():
    spec = red_square_right()
    r = adherence(render(spec), spec)
    (obj,) = r["objects"]
    assert r["ok"] and obj["shape"] == "square" and obj["direction_ok"]
    assert obj["area_cv"] < 0.05 and obj["color_spread"] < 1e-3  # temporally consistent


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_shapes_are_told_apart(shape):
    spec = VideoSpec((ObjectSpec("green", shape, "down", "slow", (0.5, 0.3)),))
    assert adherence(render(spec), spec)["objects"][0]["shape"] == shape


def test_wrong_videos_fail():
    spec = red_square_right()
    video = render(spec)
    assert not adherence(video.flip(0), spec)["ok"]  # played backwards: moves left
    assert not adherence(video, VideoSpec((ObjectSpec("blue", "square", "right", "fast", (0.25, 0.5)),)))["ok"]
    assert not adherence(video, VideoSpec((ObjectSpec("red", "circle", "right", "fast", (0.25, 0.5)),)))["ok"]
    assert not adherence(video, VideoSpec((ObjectSpec("red", "square", "up", "fast", (0.25, 0.5)),)))["ok"]
    static = video[:1].expand_as(video)
    assert not adherence(static, spec)["ok"]  # does not move
    noise = torch.rand(video.shape, generator=torch.Generator().manual_seed(0))
    assert not adherence(noise, spec)["ok"]


def test_flicker_shows_in_temporal_consistency():
    spec = red_square_right()
    video = render(spec).clone()
    video[1::2] = video[1::2] * 0.8  # every other frame darker: colour flickers
    obj = adherence(video, spec)["objects"][0]
    assert obj["color_spread"] > 0.05


def test_every_seeded_prompt_is_rendered_adherently():
    assert all(adherence(render(s), s)["ok"] for s in map(random_spec, range(64)))


def test_text_encoder_is_deterministic_and_the_empty_prompt_is_zero():
    enc = TextEncoder(dim=32, max_tokens=4)
    spec = random_spec(5)
    e = enc(spec)
    assert e.shape == (4, 32) and torch.equal(e, TextEncoder(dim=32, max_tokens=4)(spec))
    n = len(prompt_words(spec))
    assert n == len(spec.objects) + 1
    assert (e[n:] == 0).all() and (e[:n].abs().sum(-1) > 0).all()
    assert (enc(None) == 0).all()
    other = TextEncoder(dim=32, max_tokens=4)
    other.load_state_dict(enc.state_dict())
    assert torch.equal(other(spec), e)


def test_each_object_token_carries_its_own_motion():
    enc = TextEncoder(dim=32)
    a = VideoSpec((ObjectSpec("red", "square", "right", "fast", (0.3, 0.3)), ObjectSpec("blue", "circle", "up", "slow", (0.7, 0.7))))
    swapped = VideoSpec((ObjectSpec("red", "square", "up", "fast", (0.3, 0.3)), ObjectSpec("blue", "circle", "right", "slow", (0.7, 0.7))))
    ea, es = enc(a), enc(swapped)
    # the same words, bound differently: a bag of words could not tell these prompts apart
    assert not torch.allclose(ea[0], es[0]) and not torch.allclose(ea[1], es[1]) and torch.equal(ea[2], es[2])
    with pytest.raises(ValueError, match="max_tokens"):
        TextEncoder(dim=32, max_tokens=2)(a)


def test_batched_rendering_matches_one_by_one_and_rejects_mixed_sizes():
    from sixbit_compiler.refmodel.data import render_tensors, spec_tensors

    specs = [random_spec(i) for i in range(6)]
    batch = render_tensors(spec_tensors(specs), 64, 64)
    for v, s in zip(batch, specs):
        assert torch.equal(v, render(s))
    with pytest.raises(ValueError, match="share"):
        spec_tensors([random_spec(0), random_spec(1, frames=5)])


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_shape_survives_ragged_edges_and_a_stray_pixel(shape):
    """Sampled objects have ragged edges and the odd stray pixel; neither may flip the shape
    (a bounding-box fill ratio called such squares circles)."""
    from sixbit_compiler.refmodel.metrics import color_mask

    spec = VideoSpec((ObjectSpec("red", shape, "right", "slow", (0.35, 0.5)),))
    video = render(spec).clone()
    mask = color_mask(video, "red")
    inner = mask.clone()
    inner[:, 1:-1, 1:-1] = mask[:, 1:-1, 1:-1] & mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
    edge = mask & ~inner
    g = torch.Generator().manual_seed(0)
    drop = edge & (torch.rand(edge.shape, generator=g) < 0.3)  # a third of the outline missing
    video[drop] = torch.tensor([0.05, 0.05, 0.05])
    video[:, 60, 3] = torch.tensor([0.9, 0.1, 0.1])  # one stray red pixel in a corner
    assert adherence(video, spec)["objects"][0]["shape"] == shape


def test_prompts_parse_back_to_their_specs_and_bad_ones_are_named():
    from sixbit_compiler.refmodel.data import describe
    from sixbit_compiler.refmodel.text import parse_prompt

    for spec in map(random_spec, range(64)):
        parsed = parse_prompt(describe(spec))
        assert parsed.background == spec.background
        assert [(o.color, o.shape, o.direction, o.speed) for o in parsed.objects] == \
            [(o.color, o.shape, o.direction, o.speed) for o in spec.objects]
        assert torch.equal(TextEncoder(16)(parsed), TextEncoder(16)(spec))  # the model sees the same prompt
    with pytest.raises(ValueError, match="needs exactly one shape"):
        parse_prompt("a red blob moving left fast")
    with pytest.raises(ValueError, match="background"):
        parse_prompt("a red square moving left fast on purple")
    with pytest.raises(ValueError, match="distinct"):
        parse_prompt("a red square moving left fast and a red circle moving up slow")
