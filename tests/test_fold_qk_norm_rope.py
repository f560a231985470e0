"""Wan's q/k RMS norm and RoPE folded into the quantized attention: the prologue kernel against
its spec (``formats.attention.rms_norm_rope`` then the Q/K quantization), the op, and the
``fold_qk_norm_rope`` pass (what it adds and removes, what it leaves alone and why)."""

import operator
import os

import pytest
import torch

from conftest import apply_pass, capture, context_for, rel_err
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.formats import attention as spec
from sixbit_compiler.passes import find_blocks, fold_qk_norm_rope, quantize_attention

FOLDED = "sixbit.quantized_attention_qk_norm_rope.default"
QATTN = "sixbit.quantized_attention.default"


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def prologue_inputs(b=2, s=37, h=3, d=32, dtype=torch.bfloat16, seed=0, full_freqs=False):
    """x [B, S, H·D] with a per-channel offset, a norm weight, and Wan's frequency halves
    ([1, S, 1, D/2], or [B, S, H, D/2] with ``full_freqs``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h * d, generator=g) * 2 + torch.randn(h * d, generator=g)
    weight = (torch.randn(h * d, generator=g) * 0.3 + 1).to(dtype)
    shape = (b, s, h, d) if full_freqs else (1, s, 1, d)
    angles = torch.rand(shape, generator=g) * 6.3
    return x.to(dtype), weight, angles.cos()[..., 0::2], angles.sin()[..., 1::2]


def _nasty(x):
    """NaN, ±Inf, an all-zero token and an outlier in x [B, S, C] (in place)."""
    x[0, 1, 3] = float("nan")
    x[0, 2, 0] = float("inf")
    x[-1, 4, 1] = float("-inf")
    x[-1, 5] = 0.0
    x[0, 6, 7] = 1e4
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_prologue_kernel_equals_spec(dtype, smooth):
    from sixbit_compiler.kernels import attention_prologue as kernels

    x, w, cos, sin = prologue_inputs(dtype=dtype)
    x = _nasty(x)
    rotated = spec.rms_norm_rope(x, w, 1e-6, cos, sin, 3)
    dev = [t.to(_device()) for t in (x, w, cos, sin)]
    mean = None
    if smooth:
        mean = kernels.rope_key_mean(dev[0], dev[1], 1e-6, dev[2], dev[3], 3)
        want_mean = spec.key_mean(rotated)
        torch.testing.assert_close(mean.cpu(), want_mean, rtol=1e-5, atol=1e-6, equal_nan=True)
        mean = want_mean.to(_device())  # the codes against the spec's own mean: bit for bit
    codes, scale = kernels.quantize_qk_norm_rope(dev[0], dev[1], 1e-6, dev[2], dev[3], 3, mean)
    want_codes, want_scale = spec.quantize_keys(rotated, mean.cpu()) if smooth else spec.quantize_queries(rotated)
    s = x.shape[1]
    assert codes.shape[2] % 128 == 0
    assert torch.isnan(want_scale).any()  # the NaN token and the Inf ones reach the codes
    # bf16 / fp16 round the norm's output, which absorbs the kernel's rstd (its own sum order
    # and division): bit for bit; in fp32 that rstd moves values by an ulp
    exact = dtype != torch.float32
    diff = (codes[:, :, :s].cpu().int() - want_codes.int()).abs()
    assert diff.max() <= (0 if exact else 1) and (diff > 0).float().mean() < 0.01
    torch.testing.assert_close(scale[:, :, :s].cpu(), want_scale[..., 0], equal_nan=True, rtol=0 if exact else 1e-6, atol=0)
    assert not codes[:, :, s:].any() and not scale[:, :, s:].any()  # padding: zero codes and scales


def test_prologue_kernel_strided_input_full_frequencies_no_weight_default_eps():
    """x a column slice of a wider tensor, per-head frequencies, no norm weight, eps None
    (torch.rms_norm's default: fp32's epsilon)."""
    from sixbit_compiler.kernels import attention_prologue as kernels

    x, _, cos, sin = prologue_inputs(b=1, s=130, h=2, d=16, full_freqs=True, seed=3)
    wide = torch.cat([x, torch.randn_like(x)], dim=-1)[..., : x.shape[-1]]
    assert not wide.is_contiguous()
    rotated = spec.rms_norm_rope(wide, None, None, cos, sin, 2)
    codes, scale = kernels.quantize_qk_norm_rope(*(t.to(_device()) for t in (wide,)), None, None,
                                                 cos.to(_device()), sin.to(_device()), 2)
    want_codes, want_scale = spec.quantize_queries(rotated)
    assert torch.equal(codes[:, :, :130].cpu(), want_codes)
    torch.testing.assert_close(scale[:, :, :130].cpu(), want_scale[..., 0], rtol=0, atol=0)
    # the check can fail: a rotation with sin and cos swapped gives other codes
    swapped = spec.quantize_queries(spec.rms_norm_rope(wide, None, None, sin, cos, 2))[0]
    assert not torch.equal(codes[:, :, :130].cpu(), swapped)


def test_every_tile_equals_spec(monkeypatch):
    """Each autotuning tile, with a token count that is not a multiple of it."""
    from sixbit_compiler.kernels import attention_prologue as kernels

    x, w, cos, sin = prologue_inputs(b=2, s=45, h=5, d=16, seed=7)
    rotated = spec.rms_norm_rope(x, w, 1e-6, cos, sin, 5)
    want_mean = spec.key_mean(rotated)
    want_codes, want_scale = spec.quantize_keys(rotated, want_mean)
    monkeypatch.setenv("SIXBIT_GEMM_AUTOTUNE", "0")
    dev = [t.to(_device()) for t in (x, w, cos, sin)]
    tiles = kernels.TILES
    for tile in tiles:
        monkeypatch.setattr(kernels, "TILES", (tile,) + tuple(t for t in tiles if t != tile))  # the first is used
        mean = kernels.rope_key_mean(dev[0], dev[1], 1e-6, dev[2], dev[3], 5)
        torch.testing.assert_close(mean.cpu(), want_mean, rtol=1e-5, atol=1e-6)
        codes, scale = kernels.quantize_qk_norm_rope(dev[0], dev[1], 1e-6, dev[2], dev[3], 5, want_mean.to(_device()))
        assert torch.equal(codes[:, :, :45].cpu(), want_codes), tile
        torch.testing.assert_close(scale[:, :, :45].cpu(), want_scale[..., 0], rtol=0, atol=0)
        assert not codes[:, :, 45:].any() and not scale[:, :, 45:].any()


def test_unsupported_prologues_named():
    from sixbit_compiler.kernels import attention_prologue as kernels

    x, w, cos, sin = prologue_inputs()
    assert kernels.unsupported_reason(x, w, cos, sin, 3) is None
    assert "fp32 frequencies" in kernels.unsupported_reason(x, w, cos.bfloat16(), sin, 3)
    assert "broadcastable" in kernels.unsupported_reason(x, w, cos[:, :5], sin, 3)
    assert "norm weight" in kernels.unsupported_reason(x, w.float(), cos, sin, 3)
    assert "for 5 heads" in kernels.unsupported_reason(x, w, cos, sin, 5)


# ---- the op ------------------------------------------------------------------------------

def _op_args(b=1, s=40, h=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    xq, wq, cos, sin = prologue_inputs(b, s, h, d, dtype, seed)
    xk, wk, _, _ = prologue_inputs(b, s, h, d, dtype, seed + 1)
    v = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)  # Wan's permuted view
    return xq, xk, v, wq, wk, 1e-6, 1e-5, cos, sin, cos, sin, None


def _reference(xq, xk, v, wq, wk, eq, ek, qc, qs, kc, ks, scale, block_n=spec.BLOCK_N):
    h = v.shape[1]
    return spec.quantized_attention_reference(spec.rms_norm_rope(xq, wq, eq, qc, qs, h),
                                              spec.rms_norm_rope(xk, wk, ek, kc, ks, h), v, scale, block_n=block_n)


def test_op_runs_spec_on_cpu_and_kernels_agree(monkeypatch):
    from sixbit_compiler import ops

    args = _op_args()
    out = ops.quantized_attention_qk_norm_rope(*args)
    assert out.shape == (1, 2, 40, 16) and out.stride(1) == 16  # laid out [B, S, H, D]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels, with 32-key blocks
    torch.testing.assert_close(out, _reference(*args, block_n=32 if interpreted else spec.BLOCK_N), rtol=1e-5, atol=1e-6)
    # and it is the attention of the normed, rotated q and k, not of the raw projections
    assert rel_err(out, spec.quantized_attention_reference(args[0].unflatten(2, (2, -1)).transpose(1, 2),
                                                           args[1].unflatten(2, (2, -1)).transpose(1, 2), args[2])) > 0.1
    monkeypatch.setenv("SIXBIT_KERNELS", "0")  # the reference path: the spec, bit for bit
    assert torch.equal(ops.quantized_attention_qk_norm_rope(*args), _reference(*args))


def test_op_falls_back_to_the_eager_prologue_and_exact_sdpa(caplog):
    """A head dim the attention kernel does not take (24): the chain and exact SDPA, one log line."""
    import torch.nn.functional as F

    from sixbit_compiler import ops

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("without kernels the op runs the spec, not a fallback")
    args = [a.to(_device()) if isinstance(a, torch.Tensor) else a for a in _op_args(s=20, h=2, d=24)]
    with caplog.at_level("WARNING", logger="sixbit"):
        out = ops.quantized_attention_qk_norm_rope(*args)
    q, k = (spec.rms_norm_rope(x, w, e, c, s_, 2) for x, w, e, c, s_ in ((args[0], args[3], args[5], args[7], args[8]),
                                                                      (args[1], args[4], args[6], args[9], args[10])))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, args[2]))
    assert "quantized_attention_qk_norm_rope runs the eager prologue and exact SDPA" in caplog.text
    assert "head dim 24" in caplog.text


def test_op_kernels_on_gpu_match_spec():
    if not torch.cuda.is_available():
        pytest.skip("the compiled kernels need a GPU (the interpreter runs them above)")
    from sixbit_compiler import ops

    args = _op_args(b=2, s=300, h=4, d=64, dtype=torch.bfloat16)
    out = ops.quantized_attention_qk_norm_rope(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    assert rel_err(out.float().cpu(), _reference(*args).float()) < 5e-3


def test_op_passes_opcheck():
    from sixbit_compiler import ops

    torch.library.opcheck(ops.quantized_attention_qk_norm_rope, _op_args(s=16),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the pass ----------------------------------------------------------------------------

def run_fold(model, inputs, edit=None):
    gm, ex = capture(model, **inputs)
    gm, ctx = context_for(gm, ex, attention="int8")
    find_blocks(gm, ctx)
    apply_pass(quantize_attention, gm, ctx)
    if edit:
        edit(gm)
    return (gm, ctx, *apply_pass(fold_qk_norm_rope, gm, ctx))


def test_pass_folds_wan_self_attention():
    gm, ctx, before, after = run_fold(tiny_wan(num_layers=2), wan_inputs())
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta = {k: v for k, v in delta.items() if v}
    # per block (2): one attention, two chains of 1 rms_norm, 2 + 2 unflatten... each
    assert delta == {FOLDED: 2, QATTN: -2, "torch.rms_norm": -4, "Tensor.unflatten": -8, "Tensor.unbind": -4,
                     "operator.getitem": -8, "operator.mul": -16, "operator.sub": -4, "operator.add": -4,
                     "torch.empty_like": -4, "operator.setitem": -8, "Tensor.type_as": -4, "Tensor.permute": -4}
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) == FOLDED:
            x_q, x_k = node.args[:2]
            assert x_q.name.startswith("query") and x_k.name.startswith("key")  # the projections' outputs
            assert node.args[5:7] == (1e-6, 1e-6) and node.meta["sixbit_block"] is not None
    # the attention output's type_as(rotated q) now reads the projection (same dtype)
    readers = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "type_as"
               and getattr(n.args[1], "target", None) is torch._C._nn.linear]
    assert len(readers) == 2
    assert not ctx.notes
    assert [a.reason.endswith("q/k RMS norms and RoPE folded in") for a in ctx.attentions] == [True, False] * 2


def test_pass_leaves_other_prologues_alone_with_a_note():
    """CogVideoX norms per head with LayerNorm and rotates only the video tokens: not Wan's form."""
    gm, ctx, before, after = run_fold(tiny_cogvideox(num_layers=1), cogvideox_inputs())
    assert before == after
    assert len(ctx.notes) == 1 and "fold_qk_norm_rope" in ctx.notes[0] and "left alone" in ctx.notes[0]


def test_pass_keeps_a_chain_with_another_reader():
    """A second reader of the rotated q (here: an inserted product) keeps that call unfolded."""

    def add_reader(gm):
        attention = next(n for n in gm.graph.nodes if str(n.target) == QATTN)
        rotated = attention.args[0].args[0]
        with gm.graph.inserting_after(rotated):
            gm.graph.call_function(operator.mul, (rotated, 2.0))

    gm, ctx, before, after = run_fold(tiny_wan(num_layers=2), wan_inputs(), edit=add_reader)
    assert after[FOLDED] == 1 and after[QATTN] == 1
    assert len(ctx.notes) == 1 and "is also read by mul" in ctx.notes[0]


def test_pass_is_off_without_quantized_attention():
    from sixbit_compiler.passes import PASS_REGISTRY

    assert fold_qk_norm_rope.enabled_by == "quantizes_attention"
    names = list(PASS_REGISTRY)
    assert names.index("fold_qk_norm_rope") == names.index("quantize_attention") + 1


def test_backend_folded_equals_unfolded(tmp_path):
    """Tiny Wan compiled with INT8 attention, the pass on and off: the same output within
    rounding (the CPU reference path runs the same chain; the interpreter's kernels give the
    codes the unfolded kernels give), and the dump lists the folded op."""
    inputs = wan_inputs(frames=5, height=16, width=16)
    outs = {}
    for fold in (True, False):
        compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options={
            "activation": "bf16", "attention": "int8", "lowering": "eager", "dump_dir": str(tmp_path / str(fold)),
            "passes": {"fold_qk_norm_rope": fold}})
        with torch.no_grad():
            outs[fold] = compiled(**inputs)[0]
        torch._dynamo.reset()
    assert rel_err(outs[True], outs[False]) < 1e-5
    (index,) = (tmp_path / "True").glob("*/index.md")
    assert "sixbit.quantized_attention_qk_norm_rope" in index.read_text()
    (index,) = (tmp_path / "False").glob("*/index.md")
    assert "sixbit.quantized_attention_qk_norm_rope" not in index.read_text()
