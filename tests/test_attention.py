"""Quantized attention: the spec against exact SDPA, the kernels against the spec, the op,
and the ``quantize_attention`` pass (what it adds and removes, what it keeps and why)."""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import apply_pass, capture, context_for, rel_err
from models import hunyuan_inputs, scratch_dit, tiny_cogvideox, tiny_hunyuan, tiny_wan, wan_inputs, cogvideox_inputs
from sixbit_compiler.formats import attention as spec
from sixbit_compiler.passes import find_blocks, quantize_attention

SDPA = "F.scaled_dot_product_attention"
QATTN = "sixbit.quantized_attention.default"


def qkv(b=1, h=2, sq=50, skv=70, d=32, offset=3.0, seed=0, dtype=torch.float32):
    """Random q, k, v; k carries a per-channel offset shared by all tokens, as DiT keys do."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g)
    k = torch.randn(b, h, skv, d, generator=g) + offset * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, skv, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ---- the spec ----------------------------------------------------------------------------

def test_spec_is_close_to_exact_attention():
    q, k, v = qkv(sq=256, skv=300, d=64)
    exact = F.scaled_dot_product_attention(q, k, v)
    out = spec.quantized_attention_reference(q, k, v)
    # FP8 P and V cost ~2.5 % each on random data (outputs average random values);
    # INT8 Q·Kᵀ ~1 %
    assert rel_err(out, exact) < 0.05
    assert F.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.998


def test_spec_smoothing_of_keys_matters():
    q, k, v = qkv(sq=128, skv=128, d=64, offset=20.0)
    exact = F.scaled_dot_product_attention(q, k, v)
    smoothed = spec.quantized_attention_reference(q, k, v)
    orig = spec.key_mean
    try:
        spec.key_mean = lambda t: torch.zeros_like(t[..., :1, :], dtype=torch.float32)
        unsmoothed = spec.quantized_attention_reference(q, k, v)
    finally:
        spec.key_mean = orig
    assert rel_err(smoothed, exact) < 0.5 * rel_err(unsmoothed, exact)


def test_spec_softmax_scale_and_block_size():
    q, k, v = qkv(sq=40, skv=90, d=32)
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.05)
    for block_n in (16, 128):
        assert rel_err(spec.quantized_attention_reference(q, k, v, scale=0.05, block_n=block_n), exact) < 0.05
    # a wrong scale is visible: the check above can fail
    assert rel_err(spec.quantized_attention_reference(q, k, v), exact) > 0.1


def test_spec_nan_follows_sdpa():
    q, k, v = qkv(sq=20, skv=30, d=16)
    q2 = q.clone()
    q2[0, 1, 3, 5] = float("nan")
    out = spec.quantized_attention_reference(q2, k, v)
    assert torch.isnan(out[0, 1, 3]).all() and not torch.isnan(out[0, 1, :3]).any() and not torch.isnan(out[0, 0]).any()
    k2 = k.clone()
    k2[0, 0, 7, 2] = float("nan")
    out = spec.quantized_attention_reference(q, k2, v)
    assert torch.isnan(out[0, 0]).all() and not torch.isnan(out[0, 1]).any()
    v2 = v.clone()
    v2[0, 0, 4, 9] = float("nan")
    out = spec.quantized_attention_reference(q, k, v2)
    assert torch.isnan(out[0, 0, :, 9]).all() and not torch.isnan(out[0, 0, :, :9]).any()


def test_spec_uniform_attention_cases_are_exact_enough():
    q, k, v = qkv(sq=8, skv=64, d=16)
    q[0, 0, 2] = 0.0  # an all-zero query attends uniformly
    k[0, 1] = k[0, 1, :1]  # all keys of head 1 equal: uniform for every query
    out = spec.quantized_attention_reference(q, k, v)
    for h, row in ((0, 2), (1, 5)):
        mean_v = v[0, h].mean(0)
        torch.testing.assert_close(out[0, h, row], mean_v, atol=0.03, rtol=0)


def test_spec_single_key_and_low_precision_inputs():
    q, k, v = qkv(sq=5, skv=1, d=16)
    torch.testing.assert_close(spec.quantized_attention_reference(q, k, v), v.expand(1, 2, 5, 16), atol=0.07, rtol=0.07)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = qkv(sq=64, skv=64, d=32, dtype=dtype)
        out = spec.quantized_attention_reference(q, k, v)
        assert out.dtype == dtype
        assert rel_err(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 0.05


def _key_mask(b, skv, seed=0):
    """Random key-padding masks, batch 0 hiding its first 40 keys (a fully hidden first block)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, skv, generator=g) > 0.3
    mask[0, :40] = False
    return mask


def test_spec_key_padding_mask_is_close_to_sdpa():
    q, k, v = qkv(b=2, sq=50, skv=150, d=32)
    mask = _key_mask(2, 150)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    out = spec.quantized_attention_reference(q, k, v, key_mask=mask, block_n=32)
    assert rel_err(out, exact) < 0.05
    # the mask is applied: without it the result is far off
    assert rel_err(spec.quantized_attention_reference(q, k, v, block_n=32), exact) > 0.1
    # keys hidden from everyone: a row with no key left is 0, as SDPA returns
    mask[1] = False
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    out = spec.quantized_attention_reference(q, k, v, key_mask=mask, block_n=32)
    assert torch.equal(out[1], exact[1]) and not out[1].any() and rel_err(out, exact) < 0.05


# ---- the kernels (interpreter on CPU) ----------------------------------------------------

kernels = pytest.importorskip("sixbit_compiler.kernels.attention")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _nasty(x):
    """NaN, ±Inf, an all-zero row and an outlier in x [B, H, S, D] (in place)."""
    x[0, 0, 1, 3] = float("nan")
    x[0, 0, 2, 0] = float("inf")
    x[0, -1, 4, 1] = float("-inf")
    x[0, -1, 5] = 0.0
    x[0, 0, 6, 7] = 1e4
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [False, True])
def test_qk_quantization_kernel_equals_spec(dtype, smooth):
    q, _, _ = qkv(sq=70, d=32, dtype=dtype)
    x = _nasty(q.clone()).transpose(1, 2).contiguous().transpose(1, 2).to(_device())  # SDPA's strided view
    mean = spec.key_mean(x) if smooth else None
    codes, scale = kernels.quantize_qk(x, mean)
    want_codes, want_scale = spec.quantize_keys(x, mean) if smooth else spec.quantize_queries(x)
    s = x.shape[2]
    assert codes.shape[2] % kernels.TOKEN_PAD == 0
    assert torch.equal(codes[:, :, :s].cpu(), want_codes.cpu())
    torch.testing.assert_close(scale[:, :, :s].cpu(), want_scale[..., 0].cpu(), equal_nan=True, rtol=0, atol=0)
    assert not codes[:, :, s:].any() and not scale[:, :, s:].any()  # padding: zero codes and scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_quantization_kernel_equals_spec(dtype):
    _, _, v = qkv(skv=90, d=32, dtype=dtype)
    v = _nasty(v.clone()).transpose(1, 2).contiguous().transpose(1, 2).to(_device())
    codes, scale = kernels.quantize_v(v)
    want_codes, want_scale = spec.quantize_values(v)
    s = v.shape[2]
    torch.testing.assert_close(scale.cpu(), want_scale[..., 0].cpu(), equal_nan=True, rtol=0, atol=0)
    finite = ~torch.isnan(want_scale[..., 0].cpu())  # a NaN channel's codes are unspecified (module doc)
    got = codes[:, :, :, :s].cpu().view(torch.float8_e4m3fn).float()
    assert torch.equal(got[finite], want_codes.cpu().float()[finite])
    assert not codes[:, :, :, s:].any()


@pytest.mark.parametrize("b, h, sq, skv, d", [(1, 2, 50, 70, 32), (2, 1, 64, 64, 16), (1, 1, 33, 100, 64), (1, 2, 7, 1, 16)])
def test_attention_kernel_matches_spec(b, h, sq, skv, d):
    if torch.cuda.is_available() and d < 32:
        pytest.skip("the GPU's INT8 MMA takes K >= 32: head dim 16 falls back (test_unsupported_inputs_named)")
    q, k, v = (t.to(_device()) for t in qkv(b, h, sq, skv, d, seed=sq))
    out = kernels.quantized_attention(q, k, v)
    want = spec.quantized_attention_reference(q.cpu(), k.cpu(), v.cpu(), block_n=32 if not q.is_cuda else 128)
    # the GPU's approximate exp2 can move a P code across a rounding boundary
    tol = 1e-5 if not q.is_cuda else 5e-3
    assert rel_err(out.cpu(), want) < tol
    assert rel_err(out.cpu(), F.scaled_dot_product_attention(q, k, v).cpu()) < 0.06
    assert out.stride(1) == d and out.stride(2) == h * d  # laid out [B, Sq, H, D]


def test_every_kernel_config_matches_spec():
    """Each autotuning config (TMA-fed and pointer-fed tiles) on the same inputs."""
    q, k, v = (t.to(_device()) for t in qkv(1, 2, 70, 150, 32, seed=3))
    want = spec.quantized_attention_reference(q.cpu(), k.cpu(), v.cpu(), block_n=32)
    configs = kernels._attention_kernel.configs
    assert {c.kwargs["TMA"] for c in configs} == {True, False}
    for cfg in configs:
        out = kernels.quantized_attention(q, k, v, config=cfg)
        block_want = spec.quantized_attention_reference(q.cpu(), k.cpu(), v.cpu(), block_n=cfg.kwargs["BLOCK_N"])
        assert rel_err(out.cpu(), block_want) < (1e-5 if not q.is_cuda else 5e-3), cfg
        if cfg.kwargs["BLOCK_N"] == 32:  # another block size rounds P against other running maxima
            assert rel_err(out.cpu(), want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_kernel_low_precision_and_scale(dtype):
    q, k, v = (t.to(_device()) for t in qkv(1, 2, 40, 80, 32, dtype=dtype))
    out = kernels.quantized_attention(q, k, v, scale=0.1)
    assert out.dtype == dtype
    assert rel_err(out.float().cpu(), F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.1).cpu()) < 0.06


def test_attention_kernel_nan_rows_match_spec():
    q, k, v = qkv(1, 2, 40, 50, 32)
    q[0, 1, 3, 2] = float("nan")
    v[0, 0, 9, 4] = float("nan")
    out = kernels.quantized_attention(*(t.to(_device()) for t in (q, k, v))).cpu()
    want = spec.quantized_attention_reference(q, k, v, block_n=32)
    assert torch.isnan(want).any()
    differ = (torch.isnan(out) != torch.isnan(want)).nonzero().tolist()
    assert not differ, f"NaN differs at {differ[:8]} (kernel NaN: {torch.isnan(out).sum()}, spec NaN: {torch.isnan(want).sum()})"
    k[0, 0, 5, 5] = float("nan")
    out = kernels.quantized_attention(*(t.to(_device()) for t in (q, k, v))).cpu()
    assert torch.isnan(out[0, 0]).all()


def test_attention_kernel_key_mask_matches_spec():
    q, k, v = qkv(2, 2, 50, 150, 32, seed=4)
    mask = _key_mask(2, 150)
    mask[1, 100:] = False
    out = kernels.quantized_attention(*(t.to(_device()) for t in (q, k, v)), key_mask=mask.to(_device())).cpu()
    block_n = 32 if not torch.cuda.is_available() else kernels._attention_kernel.configs[0].kwargs["BLOCK_N"]
    want = spec.quantized_attention_reference(q, k, v, key_mask=mask, block_n=block_n)
    assert rel_err(out, want) < (1e-5 if not torch.cuda.is_available() else 5e-3)
    # one mask row for the whole batch broadcasts
    out1 = kernels.quantized_attention(*(t.to(_device()) for t in (q, k, v)), key_mask=mask[:1].to(_device())).cpu()
    want1 = spec.quantized_attention_reference(q, k, v, key_mask=mask[:1].expand(2, -1), block_n=block_n)
    assert rel_err(out1, want1) < (1e-5 if not torch.cuda.is_available() else 5e-3)
    mask[1] = False  # nothing left to attend to: zero rows, in the kernel as in the spec and SDPA
    out = kernels.quantized_attention(*(t.to(_device()) for t in (q, k, v)), key_mask=mask.to(_device())).cpu()
    assert not out[1].any() and not torch.isnan(out).any()


def test_unsupported_inputs_named():
    q, k, v = qkv(d=16)
    if torch.cuda.is_available():
        assert "K >= 32" in kernels.unsupported_reason(q.cuda(), k.cuda(), v.cuda())
    q, k, v = qkv(d=24)
    assert "head dim 24" in kernels.unsupported_reason(q, k, v)
    q, k, v = qkv(d=32)
    assert "shapes" in kernels.unsupported_reason(q, k[:, :1], v[:, :1])
    assert "dtypes" in kernels.unsupported_reason(q, k.half(), v)
    assert kernels.unsupported_reason(q, k, v) is None


# ---- the op ------------------------------------------------------------------------------

def test_op_runs_spec_on_cpu_and_kernels_agree(monkeypatch):
    from sixbit_compiler import ops

    q, k, v = qkv(sq=30, skv=40, d=16)
    out = ops.quantized_attention(q, k, v, None)
    assert out.shape == (1, 2, 30, 16) and out.stride(1) == 16
    # CPU tensors run the kernels only under the interpreter (32-key blocks), else the spec
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    want = spec.quantized_attention_reference(q, k, v, block_n=32 if interpreted else spec.BLOCK_N)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("SIXBIT_KERNELS", "0")  # the reference path on CPU: the spec, 128-key blocks
    torch.testing.assert_close(ops.quantized_attention(q, k, v, None), spec.quantized_attention_reference(q, k, v))


def test_op_takes_key_padding_masks_only():
    from sixbit_compiler import ops

    q, k, v = qkv(b=2, sq=20, skv=40, d=16)
    mask = _key_mask(2, 40)
    out = ops.quantized_attention(q, k, v, None, mask[:, None, None, :])
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert rel_err(out, exact) < 0.06
    with pytest.raises(ValueError, match="key-padding"):
        ops.quantized_attention(q, k, v, None, torch.ones(2, 2, 20, 40, dtype=torch.bool))


def test_op_passes_opcheck():
    from sixbit_compiler import ops

    q, k, v = qkv(sq=16, skv=16, d=16)
    torch.library.opcheck(ops.quantized_attention, (q, k, v, 0.3), test_utils=("test_schema", "test_faketensor"))


# ---- the pass ----------------------------------------------------------------------------

def run_pass(model, inputs, **options):
    gm, ex = capture(model, **inputs) if isinstance(inputs, dict) else capture(model, *inputs)
    gm, ctx = context_for(gm, ex, **options)
    find_blocks(gm, ctx)
    return (gm, ctx, *apply_pass(quantize_attention, gm, ctx))


@pytest.mark.parametrize("make, inputs, statuses", [
    # per block: self-attention quantized, cross-attention to 7 text tokens kept
    (lambda: tiny_wan(num_layers=2), wan_inputs, ["quantized", "kept"] * 2),
    (lambda: tiny_cogvideox(num_layers=2), cogvideox_inputs, ["quantized"] * 2),  # joint text + video attention
])
def test_pass_replaces_block_attention(make, inputs, statuses):
    gm, ctx, before, after = run_pass(make(), inputs(), attention="int8")
    quantized = statuses.count("quantized")
    assert before[SDPA] == len(statuses) and after.get(SDPA, 0) == len(statuses) - quantized
    assert after[QATTN] == quantized
    assert {k: v for k, v in after.items() if k not in (SDPA, QATTN)} == {
        k: v for k, v in before.items() if k not in (SDPA, QATTN)}
    assert [a.status for a in ctx.attentions] == statuses
    assert all(a.block is not None for a in ctx.attentions)
    kept = [a.reason for a in ctx.attentions if a.status == "kept"]
    assert all(r.startswith("cross-attention over 7 keys") for r in kept)


def test_pass_is_off_by_default():
    gm, ctx, before, after = run_pass(tiny_wan(num_layers=1), wan_inputs())
    # run directly, the pass does its work; the pass manager skips it unless attention="int8"
    from sixbit_compiler.options import SixbitOptions

    assert not SixbitOptions.from_dict({}).quantizes_attention
    assert quantize_attention.enabled_by == "quantizes_attention"


def test_pass_takes_key_padding_masks_and_keeps_other_masks():
    """HunyuanVideo: its blocks' joint attention has a boolean [B, 1, 1, Skv] text-padding mask
    (taken); its token refiner's [B, H, S, S] mask is not (kept, with the reason)."""
    gm, ctx, before, after = run_pass(tiny_hunyuan(num_layers=1, num_single_layers=1, num_refiner_layers=1),
                                      hunyuan_inputs(), attention="int8")
    got = {a.path: (a.status, a.reason) for a in ctx.attentions}
    assert got["transformer_blocks.0.attn"] == ("quantized", "INT8 Q·Kᵀ (K smoothed), FP8 P·V, key-padding mask")
    assert got["single_transformer_blocks.0.attn"][0] == "quantized"
    assert got["context_embedder.token_refiner.refiner_blocks.0.attn"] == (
        "kept", "attention mask (only a boolean key-padding mask [B, 1, 1, Skv] is taken)")
    assert after[QATTN] == 2 and after[SDPA] == before[SDPA] - 2
    masks = [n.args[4] for n in gm.graph.nodes if n.op == "call_function" and "quantized_attention" in str(n.target)]
    assert all(m is not None for m in masks)  # the mask travels to the op


def test_pass_leaves_unrecognised_sdpa_arguments_alone():
    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    gm, ctx = context_for(gm, ex, attention="int8")
    find_blocks(gm, ctx)
    sdpa = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention)
    sdpa.kwargs = {**sdpa.kwargs, "future_option": True}  # an argument this torch does not have
    quantize_attention(gm, ctx)
    assert ctx.attentions[0].reason == "unrecognised SDPA arguments" and ctx.attentions[0].status == "kept"
    assert ctx.attentions[2].status == "quantized"  # the next block's self-attention still is


def test_pass_keeps_unsupported_head_dim():
    gm, ctx, before, after = run_pass(scratch_dit(depth=2), (torch.randn(1, 10, 8), torch.tensor([500.0])),
                                      attention="int8")
    assert after == before
    assert [a.reason for a in ctx.attentions] == ["head dim 24", "head dim 24"]


def test_backend_attention_option_end_to_end(tmp_path, caplog):
    """The compiled tiny Wan with quantized attention: close to the exact-attention compile,
    and not equal to it (the pass did something); the log line and the dump say what ran."""
    inputs = wan_inputs(frames=5, height=16, width=16)
    outs = {}
    for attention in ("exact", "int8"):
        model = tiny_wan(num_layers=2)
        compiled = torch.compile(model, backend="sixbit", options={
            "activation": "bf16", "attention": attention, "lowering": "eager", "dump_dir": str(tmp_path / attention)})
        with torch.no_grad(), caplog.at_level("INFO", logger="sixbit"):
            outs[attention] = compiled(**inputs)[0]
    err = rel_err(outs["int8"], outs["exact"])
    assert 0 < err < 0.05
    assert "2/4 attention calls INT8/FP8" in caplog.text
    (index,) = (tmp_path / "int8").glob("*/index.md")
    text = index.read_text()
    assert "**attention calls quantized**: 2 of 4" in text and "## Attention calls (4)" in text
    assert "`blocks.0.attn1` | blocks.0 | q [1, 2, 320, 16], kv [1, 2, 320, 16] | sixbit.quantized_attention" in text
    (exact_index,) = (tmp_path / "exact").glob("*/index.md")
    assert "none (attention='exact')" in exact_index.read_text()


def test_dynamic_shapes_do_not_specialize(caplog):
    """With dynamic=True one graph serves two resolutions: the pass reads sizes as hints, never
    int() on a symbolic size (which would guard on it and recompile per resolution), and still
    keeps the short cross-attention exact."""
    model = tiny_wan(num_layers=2)
    compiled = torch.compile(model, backend="sixbit", dynamic=True,
                             options={"activation": "bf16", "attention": "int8", "lowering": "eager"})
    with torch.no_grad(), caplog.at_level("INFO", logger="sixbit"):
        for frames in (3, 5):
            inputs = wan_inputs(frames=frames)
            out = compiled(**inputs)[0]
            assert out.shape == inputs["hidden_states"].shape
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert "2/4 attention calls INT8/FP8" in caplog.text


def test_backend_hunyuan_with_key_padding_mask():
    """HunyuanVideo end to end: its masked joint attention runs quantized, close to exact
    attention. (The tiny model's output barely depends on attention, 0.4 % with the mask dropped
    in eager, so the mask's semantics are checked at the op and kernel level above.)"""
    inputs = hunyuan_inputs()
    inputs["encoder_attention_mask"][:, 4:] = False  # the last 3 text tokens are padding
    outs = {}
    for attention in ("exact", "int8"):
        model = tiny_hunyuan(num_layers=1, num_single_layers=1, num_refiner_layers=1)
        compiled = torch.compile(model, backend="sixbit", options={
            "activation": "bf16", "attention": attention, "lowering": "eager"})
        with torch.no_grad():
            outs[attention] = compiled(**inputs)[0]
    assert 0 < rel_err(outs["int8"], outs["exact"]) < 0.05
