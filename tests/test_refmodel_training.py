"""The reference model's training and sampling run end to end (tiny config, CPU, a few steps)."""

import json
import math
import os

import pytest
import torch

from sixbit_compiler.refmodel import random_spec
from sixbit_compiler.refmodel.model import REF_CONFIG, load, make_model, sample, save_gif
from sixbit_compiler.refmodel.train import main as train


def test_shipped_config_fits_the_size_budget():
    n = sum(p.numel() for p in make_model(REF_CONFIG).parameters())
    assert n * 2 <= 20e6  # bf16 safetensors <= 20 MB
    tokens = 9 * (64 // 4) * (64 // 4)
    assert tokens >= 2000 and REF_CONFIG["num_layers"] >= 8


def test_train_save_load_sample(tmp_path):
    losses = train(["--tiny", "--steps", "4", "--batch", "2", "--out", str(tmp_path)])
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    for name in ("ref_model.safetensors", "config.json", "loss.json", "loss.png"):
        assert (tmp_path / name).exists()
    model, encoder = load(str(tmp_path))
    spec = random_spec(0)
    frames = sample(model, encoder, spec, steps=2)
    assert frames.shape == (spec.frames, spec.height, spec.width, 3) and frames.isfinite().all()
    save_gif(frames, str(tmp_path / "video.gif"))
    assert os.path.getsize(tmp_path / "video.gif") > 0
    # the saved weights reproduce the trained model's outputs
    model2, _ = load(str(tmp_path))
    x = torch.randn(1, 3, 9, 64, 64)
    t = torch.tensor([500.0])
    text = encoder(spec)[None]
    with torch.no_grad():
        a = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        b = model2(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(a, b)


def test_score_rates_rendered_videos_perfect_and_reversed_ones_failing():
    from sixbit_compiler.refmodel import render
    from sixbit_compiler.refmodel.evaluate import eval_specs, score

    specs = eval_specs(6)
    videos = torch.stack([render(s) for s in specs])
    good = score(videos, specs)
    assert good["adherence"] == 1.0 and good["direction"] == 1.0 and good["prompts"] == 6
    bad = score(videos.flip(1), specs)  # played backwards: every object moves the wrong way
    assert bad["adherence"] == 0.0 and bad["direction"] == 0.0 and bad["present"] == 1.0


def test_batched_sampling_matches_one_by_one(tmp_path):
    from sixbit_compiler.refmodel.model import sample_batch

    train(["--tiny", "--steps", "2", "--batch", "2", "--out", str(tmp_path)])
    model, encoder = load(str(tmp_path))
    specs = [random_spec(1), random_spec(2)]
    batch = sample_batch(model, encoder, specs, steps=2, seeds=[5, 6])
    one = [sample(model, encoder, s, steps=2, seed=seed) for s, seed in zip(specs, [5, 6])]
    for b, o in zip(batch, one):
        torch.testing.assert_close(b, o, atol=1e-4, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, paused = tmp_path / "a", tmp_path / "b"
    common = ["--tiny", "--batch", "2", "--steps", "4", "--minutes", "0"]
    full = train(common + ["--out", str(straight)])
    # --stop-after 0 pauses after the first step; each resume runs one more step, then pauses again
    train(common + ["--out", str(paused), "--stop-after", "0"])
    assert (paused / "train_state.pt").exists() and not json.loads((paused / "config.json").read_text())["finished"]
    train(["--resume", "--out", str(paused), "--stop-after", "0"])
    resumed = train(["--resume", "--out", str(paused)])
    assert resumed == full  # same data, noise, learning rates and optimizer state, step for step
    a, _ = load(str(straight))
    b, _ = load(str(paused))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert json.loads((paused / "config.json").read_text())["finished"]


def test_the_shipped_model_loads_within_its_budget():
    from sixbit_compiler.refmodel import shipped_model_dir

    path = shipped_model_dir()
    assert os.path.getsize(os.path.join(path, "ref_model.safetensors")) <= 20e6
    meta = json.loads(open(os.path.join(path, "config.json")).read())
    assert meta["finished"] and meta["device"].startswith("NVIDIA H100") and meta["seconds"] <= 15 * 60
    model, encoder = load(path)
    assert model.config.num_layers == REF_CONFIG["num_layers"] and encoder.table.shape[1] == REF_CONFIG["text_dim"]
    assert os.path.exists(os.path.join(path, "loss.png"))


def test_the_shipped_model_draws_what_it_is_asked_for():
    """A short CPU sampling run of the shipped weights follows its prompt (an untrained or broken
    model fails: its objects do not move the prompted way or are the wrong shape)."""
    import dataclasses

    from sixbit_compiler.refmodel import adherence, shipped_model_dir
    from sixbit_compiler.refmodel.evaluate import eval_specs

    model, encoder = load(shipped_model_dir())
    spec = eval_specs(2)[1]  # a cyan triangle moving right, slow, on black
    frames = sample(model, encoder, spec, steps=12, seed=1)
    assert adherence(frames, spec)["ok"]
    moved_left = dataclasses.replace(spec, objects=(dataclasses.replace(spec.objects[0], direction="left"),))
    assert not adherence(frames, moved_left)["ok"]


def test_sampling_cli_writes_a_gif_of_the_prompt(tmp_path):
    from sixbit_compiler.refmodel.sample import main as sample_cli

    out = tmp_path / "v.gif"
    frames, result = sample_cli(["--prompt", "a green circle moving up slow on black", "--steps", "2", "--out", str(out)])
    assert out.stat().st_size > 0 and frames.shape == (9, 64, 64, 3) and "objects" in result
    with pytest.raises(ValueError, match="needs exactly one colour|needs exactly one color"):
        sample_cli(["--prompt", "a circle moving up slow", "--out", str(out)])
