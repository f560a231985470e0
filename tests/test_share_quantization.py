"""share_quantization: the quantized GEMMs reading one activation share its INT8 quantization."""

import operator

import pytest
import torch

from conftest import apply_pass, capture, context_for, rel_err
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.formats import Precision, quantize_int8
from sixbit_compiler.ops import QUANTIZED_GEMMS, SHARED_INT8_QUANTIZATION, shared_int8_quantization
from sixbit_compiler.passes import find_blocks, fuse_regions, lower_regions, quantize_linears, share_quantization

OP = "sixbit.shared_int8_quantization.default"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIXBIT_CACHE_DIR", str(tmp_path / "codegen"))


def shared_graph(make=tiny_wan, inputs=wan_inputs, codegen=False, **options):
    gm, ex = capture(make(num_layers=2), **inputs())
    gm, ctx = context_for(gm, ex, activation="int8", codegen=codegen, **options)
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


def test_cogvideox_q_k_v_share_too():
    gm, ctx, before, after = shared_graph(tiny_cogvideox, cogvideox_inputs)
    assert after[OP] == 2  # one per block: q, k, v read the normed joint sequence


def test_rotated_activations_are_left_with_a_note():
    gm, ctx, before, after = shared_graph(hadamard=True)
    assert OP not in after and after == before
    notes = [n for n in ctx.notes if n.startswith("share_quantization")]
    assert len(notes) == 4 and all("hadamard" in n for n in notes)


def test_the_op_computes_the_spec_only_when_a_reader_takes_int8_on_the_kernels(monkeypatch):
    import sixbit_compiler.kernels.quantize as kq
    import sixbit_compiler.ops as ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 48, generator=g) * 3
    x[0, 1] = 0
    x[1, 2, 5] = float("nan")
    x[1, 3, 7] = float("inf")
    # on a GPU machine the kernels run on CUDA tensors only (on CPU under the interpreter)
    x = x.to("cuda" if torch.cuda.is_available() else "cpu")
    slots = torch.tensor([int(Precision.NVFP4), int(Precision.INT8)], dtype=torch.int8)
    codes, scales = shared_int8_quantization(x, slots, [0, 1])
    ref_codes, ref_scales = quantize_int8(x.cpu().reshape(-1, 48))
    codes, scales = codes.cpu(), scales.cpu()
    assert torch.equal(codes.reshape(-1, 48), ref_codes)
    assert torch.equal(scales.reshape(-1, 1).isnan(), ref_scales.isnan())
    assert torch.equal(scales.reshape(-1, 1).nan_to_num(0), ref_scales.nan_to_num(0))
    calls = []
    real = kq.quantize_int8_rows
    monkeypatch.setattr(kq, "quantize_int8_rows", lambda *a: calls.append(1) or real(*a))
    shared_int8_quantization(x, slots, [0, 1])
    assert len(calls) == 1  # (the spy sees the kernel run)
    shared_int8_quantization(x, slots, [0])  # no INT8 reader this call: nothing computed
    monkeypatch.setattr(ops, "generated_kernels_run_on", lambda t: False)
    shared_int8_quantization(x, slots, [0, 1])  # no kernels: every reader runs the reference on x
    assert len(calls) == 1
    monkeypatch.undo()
    # (finite input: opcheck compares outputs without NaN == NaN)
    torch.library.opcheck(torch.ops.sixbit.shared_int8_quantization, (torch.randn(2, 9, 48, generator=g), slots, [1]))


def compiled_outputs(options, make=tiny_wan, inputs=wan_inputs, calls=2):
    torch._dynamo.reset()
    model = torch.compile(make(num_layers=2), backend="sixbit", options=options)
    with torch.no_grad():
        return [model(**inputs())[0] for _ in range(calls)]  # DMPQ decides from call 1's Γ


@pytest.mark.parametrize("codegen", [False, True], ids=["unfused", "codegen"])
@pytest.mark.parametrize("block_cache", [False, True], ids=["flat", "block_regions"])
@pytest.mark.parametrize("activation", ["int8", "dynamic", "nvfp4"])
def test_outputs_are_bit_identical_to_each_gemm_quantizing_itself(activation, block_cache, codegen, monkeypatch):
    """Every GEMM runs the kernels (the interpreter, as on CUDA) and takes the shared codes instead
    of quantizing x: the same codes, so the same outputs to the bit (block regions rebase the slot
    lists; NVFP4 calls never read the codes)."""
    import sixbit_compiler.ops as ops

    monkeypatch.setattr(ops, "linear_kernels_run_on", ops.generated_kernels_run_on)
    base = {"activation": activation, "codegen": codegen, "block_cache": block_cache}
    on = compiled_outputs(base)
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
