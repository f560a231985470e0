"""share_quantization: the quantized GEMMs reading one activation share its INT8 (or FP8)
quantization."""

import operator

import pytest
import torch

from conftest import apply_pass, capture, context_for, rel_err
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.formats import Precision, quantize_fp8_rows, quantize_int8
from sixbit_compiler.ops import (QUANTIZED_GEMMS, SHARED_INT8_QUANTIZATION, shared_fp8_quantization,
                                 shared_int8_quantization)
from sixbit_compiler.passes import find_blocks, fuse_regions, lower_regions, quantize_linears, share_quantization

OP = "sixbit.shared_int8_quantization.default"
FP8_OP = "sixbit.shared_fp8_quantization.default"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIXBIT_CACHE_DIR", str(tmp_path / "codegen"))


def shared_graph(make=tiny_wan, inputs=wan_inputs, codegen=False, activation="int8", **options):
    gm, ex = capture(make(num_layers=2), **inputs())
    gm, ctx = context_for(gm, ex, activation=activation, codegen=codegen, **options)
    for p in (find_blocks, quantize_linears) + ((fuse_regions, lower_regions) if codegen else ()):
        p(gm, ctx)
    return (gm, ctx, *apply_pass(share_quantization, gm, ctx))


@pytest.mark.parametrize("codegen", [False, True], ids=["unfused", "codegen"])
def test_q_k_v_and_the_text_k_v_share_one_quantization_per_block(codegen):
    gm, ctx, before, after = shared_graph(codegen=codegen)
    # per Wan block: the normed input of q, k, v; the text states of cross-attention's k, v
    assert after[OP] == 2 * 2
    assert after["operator.getitem"] == before["operator.getitem"] + 2 * after[OP]
    assert {k: v for k, v in after.items() if k not in (OP, "operator.getitem")} == \
        {k: v for k, v in before.items() if k != "operator.getitem"}  # nothing removed
    readers = []
    for call in (n for n in gm.graph.nodes if n.target is SHARED_INT8_QUANTIZATION):
        codes, scales = sorted(call.users, key=lambda g: g.args[1])
        assert all(g.target is operator.getitem for g in (codes, scales))
        gemms = [u for u in codes.users]
        assert all(g.target in QUANTIZED_GEMMS and g.args[0] is call.args[0] for g in gemms)
        assert all(g.kwargs["x_codes"] is codes and g.kwargs["x_scales"] is scales for g in gemms)
        assert call.args[2] == [g.args[6] for g in gemms]  # the GEMMs' own slots
        assert {g.meta["sixbit_block"] for g in gemms} == {call.meta["sixbit_block"]}  # within one block
        readers.append(len(gemms))
    assert sorted(readers) == [2, 2, 3, 3]


@pytest.mark.parametrize("activation, op", [("fp8", FP8_OP), ("dynamic", OP), ("nvfp4", OP)])
def test_the_shared_codes_are_fp8_where_every_gemm_runs_fp8(activation, op):
    """FP8 codes with ``activation="fp8"``; INT8 codes otherwise (DMPQ's calls fall back to INT8)."""
    gm, ctx, before, after = shared_graph(activation=activation)
    assert after[op] == 2 * 2 and ({OP, FP8_OP} - {op}).isdisjoint(after)


def test_cogvideox_q_k_v_share_too():
    gm, ctx, before, after = shared_graph(tiny_cogvideox, cogvideox_inputs)
    assert after[OP] == 2  # one per block: q, k, v read the normed joint sequence


def test_rotated_activations_are_left_with_a_note():
    gm, ctx, before, after = shared_graph(hadamard=True)
    assert OP not in after and after == before
    notes = [n for n in ctx.notes if n.startswith("share_quantization")]
    assert len(notes) == 4 and all("hadamard" in n for n in notes)


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_the_op_computes_the_spec_only_when_a_reader_takes_its_precision_on_the_kernels(fp8, monkeypatch):
    import sixbit_compiler.kernels.quantize as kq
    import sixbit_compiler.ops as ops

    op, spec, precision = ((shared_fp8_quantization, quantize_fp8_rows, Precision.FP8) if fp8 else
                           (shared_int8_quantization, quantize_int8, Precision.INT8))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 48, generator=g) * 3
    x[0, 1] = 0
    x[1, 2, 5] = float("nan")
    x[1, 3, 7] = float("inf")
    # on a GPU machine the kernels run on CUDA tensors only (on CPU under the interpreter)
    x = x.to("cuda" if torch.cuda.is_available() else "cpu")
    slots = torch.tensor([int(Precision.NVFP4), int(precision)], dtype=torch.int8)
    codes, scales = op(x, slots, [0, 1])
    ref_codes, ref_scales = spec(x.cpu().reshape(-1, 48))
    codes, scales = codes.cpu(), scales.cpu()
    assert codes.dtype == (torch.uint8 if fp8 else torch.int8)  # (FP8 crosses the op boundary as bits)
    assert torch.equal(codes.reshape(-1, 48), ref_codes.view(codes.dtype))
    assert torch.equal(scales.reshape(-1, 1).isnan(), ref_scales.isnan())
    assert torch.equal(scales.reshape(-1, 1).nan_to_num(0), ref_scales.nan_to_num(0))
    calls = []
    real = kq.quantize_rows_into
    monkeypatch.setattr(kq, "quantize_rows_into", lambda *a, **k: calls.append(k["fp8"]) or real(*a, **k))
    op(x, slots, [0, 1])
    assert calls == [fp8]  # (the spy sees the kernel run)
    op(x, slots, [0])  # no reader of this precision this call: nothing computed
    other = torch.tensor([int(Precision.INT8 if fp8 else Precision.FP8)], dtype=torch.int8)
    op(x, other, [0])  # nor for a reader of the other one-byte precision
    monkeypatch.setattr(ops, "generated_kernels_run_on", lambda t: False)
    op(x, slots, [0, 1])  # no kernels: every reader runs the reference on x
    assert calls == [fp8]
    monkeypatch.undo()
    # (finite input: opcheck compares outputs without NaN == NaN; on x's device, where the kernels
    # write the codes: unwritten ones would differ between opcheck's calls)
    torch.library.opcheck(op._opoverload, (torch.randn(2, 9, 48, generator=g).to(x.device), slots, [1]))


def test_a_gemm_takes_only_codes_of_its_own_precision():
    from sixbit_compiler.kernels.dispatch import usable_codes
    from sixbit_compiler.weight_store import quantize_weight

    w = quantize_weight(torch.randn(8, 32), False)
    scales = torch.ones(4, 1)
    int8, fp8 = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 32, dtype=torch.uint8)
    assert usable_codes(int8, scales, Precision.INT8, False, w.packed) is not None
    assert usable_codes(fp8, scales, Precision.FP8, False, w.packed) is not None
    assert usable_codes(int8, scales, Precision.FP8, False, w.packed) is None
    assert usable_codes(fp8, scales, Precision.INT8, False, w.packed) is None
    assert usable_codes(int8, scales, Precision.NVFP4, False, w.packed) is None
    assert usable_codes(int8, scales, Precision.INT8, True, w.packed) is None  # rotated x: not x's codes
    assert usable_codes(int8[:, :16], scales, Precision.INT8, False, w.packed) is None  # another width


def compiled_outputs(options, make=tiny_wan, inputs=wan_inputs, calls=2):
    torch._dynamo.reset()
    model = torch.compile(make(num_layers=2), backend="sixbit", options=options)
    with torch.no_grad():
        return [model(**inputs())[0] for _ in range(calls)]  # DMPQ decides from call 1's Γ


@pytest.mark.parametrize("codegen", [False, True], ids=["unfused", "codegen"])
@pytest.mark.parametrize("block_cache", [False, True], ids=["flat", "block_regions"])
@pytest.mark.parametrize("activation", ["int8", "fp8", "dynamic", "nvfp4"])
def test_outputs_are_bit_identical_to_each_gemm_quantizing_itself(activation, block_cache, codegen, monkeypatch):
    """Every GEMM runs the kernels (the interpreter, as on CUDA) and takes the shared codes instead
    of quantizing x: the same codes, so the same outputs to the bit (block regions rebase the slot
    lists; NVFP4 calls never read the codes)."""
    import sixbit_compiler.kernels.dispatch as dispatch
    import sixbit_compiler.ops as ops

    monkeypatch.setattr(ops, "linear_kernels_run_on", ops.generated_kernels_run_on)
    taken = []
    real = dispatch.operands_from_codes
    monkeypatch.setattr(dispatch, "operands_from_codes", lambda p, *a: taken.append(p) or real(p, *a))
    base = {"activation": activation, "codegen": codegen, "block_cache": block_cache}
    on = compiled_outputs(base)
    # the GEMMs did take the shared codes (INT8 ones in DMPQ's INT8 calls; NVFP4 calls never do)
    assert set(taken) == {"int8": {Precision.INT8}, "fp8": {Precision.FP8}, "dynamic": {Precision.INT8},
                          "nvfp4": set()}[activation]
    off = compiled_outputs({**base, "passes": {"share_quantization": False}})
    for a, b in zip(on, off):
        assert torch.equal(a, b)


def test_reference_path_outputs_are_unchanged():
    """On CPU without the kernels the GEMMs run the reference, which reads x: the codes are
    computed by the spec and unused, and the outputs stay as they were."""
    base = {"activation": "int8", "block_cache": True}
    on = compiled_outputs(base, tiny_cogvideox, cogvideox_inputs)
    off = compiled_outputs({**base, "passes": {"share_quantization": False}}, tiny_cogvideox, cogvideox_inputs)
    for a, b in zip(on, off):
        assert rel_err(a, b) == 0


def test_the_pass_is_switched_off_by_name_and_listed_in_the_dump(tmp_path):
    for name, passes in (("on", {}), ("off", {"share_quantization": False})):
        compiled_outputs({"activation": "int8", "passes": passes, "dump_dir": str(tmp_path / name)}, calls=1)
    (on,), (off,) = (tmp_path / "on").iterdir(), (tmp_path / "off").iterdir()
    assert "`share_quantization` | ran" in (on / "index.md").read_text()
    assert "`share_quantization` | disabled" in (off / "index.md").read_text()


def test_a_model_switched_to_the_other_tier_at_run_time_stays_exact(monkeypatch):
    """Compiled with INT8 codes shared, switched to FP8 (``set_activation``): the FP8 GEMMs find
    no codes of their precision and quantize x themselves, as an FP8 compile without sharing does."""
    import sixbit_compiler
    import sixbit_compiler.ops as ops

    monkeypatch.setattr(ops, "linear_kernels_run_on", ops.generated_kernels_run_on)
    torch._dynamo.reset()
    model = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options={"activation": "int8"})
    with torch.no_grad():
        model(**wan_inputs())  # compiles (the runtime exists from the first call)
        sixbit_compiler.set_activation(model, "fp8")
        switched = [model(**wan_inputs())[0] for _ in range(2)]
    fp8 = compiled_outputs({"activation": "fp8", "passes": {"share_quantization": False}})
    int8 = compiled_outputs({"activation": "int8"})
    for a, b, c in zip(switched, fp8, int8):
        assert torch.equal(a, b) and not torch.equal(a, c)
