"""The reference model: a diffusers WanTransformer3DModel on pixels, and its sampler.

Pixel space (no VAE): a video [T, H, W, 3] in [0, 1] maps to [-1, 1] and to the model's
[B, 3, T, H, W]. Flow matching as Wan: x_σ = (1 − σ)·x₀ + σ·ε, the model predicts ε − x₀,
timestep = 1000·σ. Sampling uses diffusers' UniPC flow-matching scheduler with CFG (two calls
per step, as Wan's pipeline).
"""

from __future__ import annotations

import contextlib

import torch

from .data import VideoSpec
from .text import TextEncoder

#: The shipped reference configuration (8 blocks, dim 256: ~8.5 M parameters, 17 MB in bf16;
#: 9 x 64 x 64 pixels in patches of 1 x 4 x 4 = 2,304 tokens).
REF_CONFIG = dict(
    patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=64, in_channels=3, out_channels=3,
    text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=8, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
TEXT_TOKENS = 4  # two objects and the background, plus one spare


def make_model(config: dict | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**(config or REF_CONFIG))


def to_model(video: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, 3] in [0, 1] -> [B, 3, T, H, W] in [-1, 1]."""
    return video.permute(0, 4, 1, 2, 3) * 2 - 1


def from_model(x: torch.Tensor) -> torch.Tensor:
    return ((x.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1)


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, generator=None, shift: float = 1.0) -> torch.Tensor:
    """Flow-matching loss at noise levels σ = shift·u / (1 + (shift − 1)·u), u uniform: ``shift`` > 1
    spends more training at high noise, where the sampler (same shift) decides the layout."""
    b = x0.shape[0]
    u = torch.rand(b, device=x0.device, generator=generator)
    sigma = shift * u / (1 + (shift - 1) * u)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    s = sigma.view(b, 1, 1, 1, 1).to(x0.dtype)
    xt = (1 - s) * x0 + s * noise
    pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


@torch.no_grad()
def sample(model, encoder: TextEncoder, spec: VideoSpec, steps: int = 20, guidance: float = 4.0, seed: int = 0,
           device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Frames [T, H, W, 3] in [0, 1] for ``spec``'s prompt (its objects' paths are not given)."""
    return sample_batch(model, encoder, [spec], steps, guidance, [seed], device, dtype)[0]


def initial_noise(spec: VideoSpec, seed: int) -> torch.Tensor:
    """The starting noise of a generation: [1, 3, T, H, W] float32, drawn on the CPU from ``seed``
    (so CPU and GPU runs of one seed start from the same tensor)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, 3, spec.frames, spec.height, spec.width, generator=g)


#: The sampler's flow shift (Wan uses 3.0 at 480p; see the model card for why the reference model uses its own).
FLOW_SHIFT = 3.0


def make_scheduler(steps: int, device="cpu", flow_shift: float | None = None):
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=FLOW_SHIFT if flow_shift is None else flow_shift,
                                    num_train_timesteps=1000)
    sched.set_timesteps(steps, device=device)
    return sched


@torch.no_grad()
def sample_batch(model, encoder: TextEncoder, specs: list[VideoSpec], steps: int = 20, guidance: float = 4.0,
                 seeds: list[int] | None = None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Frames [B, T, H, W, 3] for a batch of prompts, sampled together: per step, one conditional
    and one unconditional call (Wan's pipeline order), each of batch B. Sample i starts from
    ``initial_noise(specs[i], seeds[i])``, so a batch gives the same videos as one-by-one calls
    up to floating-point reordering."""
    seeds = list(range(len(specs))) if seeds is None else seeds
    sched = make_scheduler(steps, device)
    x = torch.cat([initial_noise(s, seed) for s, seed in zip(specs, seeds)]).to(device, dtype)
    cond = torch.stack([encoder(s) for s in specs]).to(device, dtype)
    uncond = torch.stack([encoder(None)] * len(specs)).to(device, dtype)
    # Named cache contexts per CFG branch, as diffusers' Wan pipeline sets them: diffusers' own
    # caches (FirstBlockCache, ...) keep one state per name and need them; other models ignore them.
    branch = getattr(model, "cache_context", None) or (lambda name: contextlib.nullcontext())
    for t in sched.timesteps:
        tt = t.expand(len(specs))
        with branch("cond"):
            c = model(hidden_states=x, timestep=tt, encoder_hidden_states=cond, return_dict=False)[0]
        with branch("uncond"):
            u = model(hidden_states=x, timestep=tt, encoder_hidden_states=uncond, return_dict=False)[0]
        x = sched.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return from_model(x.float()).cpu()


def save_gif(frames: torch.Tensor, path: str, fps: int = 6) -> None:
    from PIL import Image

    images = [Image.fromarray((f.clamp(0, 1) * 255).round().byte().numpy()) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def load(path: str, device="cpu", dtype=torch.float32):
    """(model, text encoder) from a directory written by ``refmodel.train``."""
    import json
    import os

    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    config = dict(meta["model"], patch_size=tuple(meta["model"]["patch_size"]))
    state = load_file(os.path.join(path, "ref_model.safetensors"))
    text = {k.split(".", 1)[1]: state.pop(k) for k in list(state) if k.startswith("text_encoder.")}
    model = make_model(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    encoder = TextEncoder(config["text_dim"], meta["text_tokens"])
    encoder.load_state_dict({k: v.float() for k, v in text.items()})
    return model.to(device, dtype).eval(), encoder
