"""Tiny models for CPU tests: diffusers Wan and CogVideoX configs, and a DiT from scratch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def tiny_wan(num_layers: int = 2, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    ).eval()


def wan_inputs(frames=3, height=8, width=8, text_len=7, seed=1, timestep=500):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, frames, height, width, generator=g),
        timestep=torch.tensor([timestep]),
        encoder_hidden_states=torch.randn(1, text_len, 32, generator=g),
        return_dict=False,
    )


def tiny_cogvideox(num_layers: int = 2, seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=num_layers, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=7,
    ).eval()


def cogvideox_inputs(seed=1, timestep=500):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 2, 4, 8, 8, generator=g),  # CFG batched: B = 2
        timestep=torch.tensor([timestep, timestep]),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
        return_dict=False,
    )


def tiny_hunyuan(num_layers=4, num_single_layers=8, num_refiner_layers=2, seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=num_refiner_layers, mlp_ratio=2.0, patch_size=1,
        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16,
        rope_theta=256.0, rope_axes_dim=(4, 6, 6),
    ).eval()


def hunyuan_inputs(seed=1, timestep=500):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
        timestep=torch.tensor([timestep]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool),
        pooled_projections=torch.randn(1, 16, generator=g),
        guidance=torch.tensor([6000.0]),
        return_dict=False,
    )


class ScratchBlock(nn.Module):
    """A DiT block written from scratch: AdaLN modulation, attention, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)  # per-sample input: stays high precision
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x, temb):
        shift, scale = self.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class ScratchDiT(nn.Module):
    def __init__(self, in_dim=8, dim=48, heads=2, depth=3):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.t_embed = nn.Linear(1, dim)
        self.layers = nn.ModuleList([ScratchBlock(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim, in_dim)

    def forward(self, x, timestep):
        temb = F.silu(self.t_embed(timestep.float().view(-1, 1) / 1000))
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, temb)
        return self.head(h)


def scratch_dit(seed=0, **kw):
    torch.manual_seed(seed)
    return ScratchDiT(**kw).eval()
