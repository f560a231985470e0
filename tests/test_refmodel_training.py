"""The reference model's training and sampling run end to end (tiny config, CPU, a few steps)."""

import math
import os

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
