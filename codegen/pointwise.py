"""Triton source for a chain of elementwise FX nodes, and its compiled, disk-cached kernel.

This is the expression layer of the region codegen: the prologue and epilogue chains that
``fuse_regions`` records are translated op by op into Triton expressions, computed in fp32
and rounded wherever the graph's value is bf16 / fp16 (as eager PyTorch rounds after each op),
so a generated chain matches the unfused graph within one rounding. A chain holding a layer /
RMS norm over the last dim (a prologue) runs one program per row with the row in one tile.
It emits standalone kernels (prologues; an epilogue for NVFP4 / bf16 calls), and
``codegen.gemm`` puts the same expression lines into the GEMM template as its epilogue.

Index arithmetic is symbolic (sympy): the kernel takes the output's sizes and every input's
strides as arguments, so one kernel serves every shape of a rank (the token count under
``dynamic=True``, a new resolution), and inputs may be non-contiguous or broadcast (stride 0).
An input laid out as the output skips the index arithmetic (a ``SAMEj`` constexpr chosen at
launch), and offsets are 32-bit where they fit. Kernels are cached on disk under
``$SIXBIT_CACHE_DIR`` (default ``~/.cache/sixbit/codegen``), named and keyed by a hash of their
source without comments, which depends only on the ops, dtypes and rank: every block's same
chain is one kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import operator
import os
import re

import sympy
import torch
import torch.fx as fx

from sixbit_compiler.fx_utils import example_value


class Unsupported(Exception):
    """The chain holds an op the codegen cannot emit; the caller leaves it unfused."""


TL_DTYPES = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}
_BINARY = {operator.add: "+", torch.add: "+", "add": "+", operator.mul: "*", torch.mul: "*", "mul": "*",
           operator.sub: "-", torch.sub: "-", "sub": "-", operator.truediv: "/", torch.div: "/", "div": "/"}
_UNARY = {
    operator.neg: "(-{x})", torch.neg: "(-{x})", "neg": "(-{x})",
    torch.sigmoid: "tl.sigmoid({x})", "sigmoid": "tl.sigmoid({x})",
    torch.tanh: "(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)", "tanh": "(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)",
    torch.exp: "tl.exp({x})",
}
# 0.5·x·(1 + tanh(y)) = x·sigmoid(2y): no cancellation where tanh(y) is close to -1 (the same
# expression as ``kernels._common.gelu_tanh``, which the quantization kernel's GELU uses)
_GELU_TANH = "({x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x})))"
_GELU_ERF = "(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"


def _tensor_meta(node: fx.Node):
    """(dtype, rank) of ``node``'s value: Dynamo's fake tensor, or ShapeProp's ``tensor_meta``."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return value.dtype, value.dim()
    tm = node.meta.get("tensor_meta")
    if tm is not None:
        return tm.dtype, len(tm.shape)
    raise Unsupported(f"{node.name}: no dtype and shape in its meta")


def value_dtype(node: fx.Node) -> torch.dtype:
    return _tensor_meta(node)[0]


def _rank(node: fx.Node) -> int:
    return _tensor_meta(node)[1]


def _literal(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unsupported(f"operand {value!r} is neither a tensor nor a number")
    return repr(float(value))


def _arg(node: fx.Node, position: int, name: str, default=None):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def is_inert_dropout(node: fx.Node) -> bool:
    """``F.dropout`` with p = 0 or outside training: the identity."""
    if node.op != "call_function" or node.target is not torch.nn.functional.dropout:
        return False
    p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
    return p == 0.0 or training is False


class _AnyOperand(dict):
    def __missing__(self, key):
        return "x"


def translates(node: fx.Node) -> bool:
    """Whether :func:`emit_pointwise` can emit ``node`` as per-element code (``fuse_regions``
    puts only such ops, and the norms, into regions)."""
    try:
        expression(node, _AnyOperand())
    except Unsupported:
        return False
    return True


def expression(node: fx.Node, var: dict[fx.Node, str]) -> str:
    """The fp32 Triton expression of one node, given its operands' variables."""
    def operand(a):
        return var[a] if isinstance(a, fx.Node) else _literal(a)

    if node.op not in ("call_function", "call_method"):
        raise Unsupported(f"{node.name}: {node.op}")
    target = node.target
    if target in _BINARY and len(node.args) == 2 and not node.kwargs:
        return f"({operand(node.args[0])} {_BINARY[target]} {operand(node.args[1])})"
    if target in _UNARY and len(node.args) == 1 and not node.kwargs:
        return _UNARY[target].format(x=operand(node.args[0]))
    if target in (torch.nn.functional.gelu, torch._C._nn.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return (_GELU_TANH if approximate == "tanh" else _GELU_ERF).format(x=operand(node.args[0]))
    if is_inert_dropout(node):
        return operand(node.args[0])
    if target in ("float", "to", "type_as") and node.op == "call_method":
        if target == "to" and (node.kwargs or not all(isinstance(a, torch.dtype) for a in node.args[1:])):
            raise Unsupported(f"{node.name}: .to() other than a dtype cast")
        return operand(node.args[0])  # the rounding to the node's dtype follows in emit()
    name = _torch_function_name(target)
    if name in _BY_NAME and len(node.args) == 1 and not node.kwargs.get("inplace", False):
        return _BY_NAME[name].format(x=operand(node.args[0]))
    raise Unsupported(f"{node.name}: {getattr(target, '__name__', target)} has no Triton translation")


#: functional ops matched by name: tracing may hand over torch.nn.functional's or torch._C._nn's object
_BY_NAME = {"silu": "({x} * tl.sigmoid({x}))", "relu": "tl.maximum({x}, 0.0)"}


def _torch_function_name(target) -> str | None:
    module = getattr(target, "__module__", None) or ""
    if callable(target) and (module.startswith("torch.nn.functional") or module.startswith("torch._C")):
        return getattr(target, "__name__", None)
    return None


_LAYER_NORMS = (torch.nn.functional.layer_norm, torch.layer_norm)
_RMS_NORMS = (torch.rms_norm, torch.nn.functional.rms_norm)


def is_row_norm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LAYER_NORMS + _RMS_NORMS


def _norm_lines(node: fx.Node, var: dict[fx.Node, str], out: str, rank: int) -> list[str]:
    """Statements of a layer / RMS norm over the last dim: the tile is one whole row (masked)."""
    shape = _arg(node, 1, "normalized_shape")
    if rank == 0 or len(shape) != 1:
        raise Unsupported(f"{node.name}: a norm over more than the last dim")
    n = f"size{rank - 1}"
    x = var[node.args[0]]
    lines = [f"    {out}_x = tl.where(mask, {x}, 0.0)"]
    if node.target in _LAYER_NORMS:
        weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        lines += [f"    {out}_mean = tl.sum({out}_x, axis=0) / {n}",
                  f"    {out}_c = tl.where(mask, {out}_x - {out}_mean, 0.0)",
                  f"    {out}_var = tl.sum({out}_c * {out}_c, axis=0) / {n}",
                  f"    {out} = {out}_c * tl.rsqrt({out}_var + {_literal(eps)})"]
    else:
        weight, bias, eps = _arg(node, 2, "weight"), None, _arg(node, 3, "eps")
        if eps is None:  # torch's default: the input dtype's machine epsilon
            eps = torch.finfo(value_dtype(node.args[0])).eps
        lines += [f"    {out}_ms = tl.sum({out}_x * {out}_x, axis=0) / {n}",
                  f"    {out} = {out}_x * tl.rsqrt({out}_ms + {_literal(eps)})"]
    if weight is not None:
        lines.append(f"    {out} = {out} * {var[weight]}")
    if bias is not None:
        lines.append(f"    {out} = {out} + {var[bias]}")
    return lines


#: the helper every generated kernel defines (the interpreter truncates in ``.to(bf16)``)
ROUND_BF16_SOURCE = [
    "@triton.jit",
    "def _round_bf16(x):",
    "    # fp32 -> nearest bf16 (ties to even) as fp32, by bits: Triton's interpreter truncates in .to(bf16)",
    "    b = x.to(tl.uint32, bitcast=True)",
    "    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000",
    "    return tl.where(x != x, x, b.to(tl.float32, bitcast=True))",
    "",
    "",
]


def source_head(*imports: str) -> list[str]:
    """The first lines of every generated kernel file: Triton, the given import lines, and the
    ``_round_bf16`` helper."""
    return ["import triton", "import triton.language as tl", "", *([*imports, ""] if imports else []), "",
            *ROUND_BF16_SOURCE]


def input_parameters(n_inputs: int, sizes: list, rank: int) -> tuple[list[str], list[str], list[str]]:
    """The parameters every generated kernel takes for a chain's outside inputs, as three lists
    of names to place in its signature: the inputs' pointers (``inN_ptr``), the output's sizes
    and each input's strides (``sizeD``, ``strideN_D``), and the ``SAMEN`` flags (input N is
    laid out as the output)."""
    pointers = [f"in{j}_ptr" for j in range(n_inputs)]
    layout = [s.name for s in sizes] + [f"stride{j}_{d}" for j in range(n_inputs) for d in range(rank)]
    same = [f"SAME{j}: tl.constexpr" for j in range(n_inputs)]
    return pointers, layout, same


def rounded(expr: str, dtype: torch.dtype) -> str:
    """``expr`` (fp32) rounded to ``dtype`` and back, as eager rounds each op's result."""
    if dtype == torch.bfloat16:
        return f"_round_bf16({expr})"
    if dtype == torch.float16:
        return f"({expr}).to(tl.float16).to(tl.float32)"
    return expr


def _coordinates(index: sympy.Expr, sizes: list[sympy.Symbol]) -> list[sympy.Expr]:
    """Row-major coordinates of a linear ``index`` over ``sizes``."""
    coords = []
    for d in range(len(sizes)):
        inner = sympy.Mul(*sizes[d + 1:])
        coords.append(sympy.Mod(sympy.floor(index / inner), sizes[d]) if d else sympy.floor(index / inner))
    return coords


def input_offsets(coords: list[sympy.Expr], n_inputs: int) -> list[sympy.Expr]:
    """sympy offset of each input ``j`` (strides ``stride{j}_{d}``) at ``coords``."""
    offsets = []
    for j in range(n_inputs):
        strides = [sympy.Symbol(f"stride{j}_{d}", integer=True) for d in range(len(coords))]
        offsets.append(sum((c * s for c, s in zip(coords, strides)), sympy.Integer(0)))
    return offsets


def _index_expressions(rank: int, n_inputs: int) -> tuple[list[sympy.Symbol], list[sympy.Expr]]:
    """sympy offsets of each input for the output's linear index ``i`` (row-major)."""
    i = sympy.Symbol("i", integer=True, nonnegative=True)
    sizes = [sympy.Symbol(f"size{d}", integer=True, positive=True) for d in range(rank)]
    return sizes, input_offsets(_coordinates(i, sizes), n_inputs)


def chain_lines(nodes: list[fx.Node], var: dict[fx.Node, str], rank: int, first: int = 0) -> list[str]:
    """Statements computing each node of the chain as ``v{k}`` (k from ``first``) in fp32, rounded
    to the node's dtype as eager rounds each op's result; a layer / RMS norm spans the row tile.
    Adds each node's variable to ``var``. Raises :class:`Unsupported` for a dtype or op it cannot
    emit."""
    lines = []
    for k, n in enumerate(nodes, start=first):
        dtype = value_dtype(n)
        if dtype not in TL_DTYPES:
            raise Unsupported(f"{n.name}: dtype {dtype}")
        if is_row_norm(n):
            lines += _norm_lines(n, var, f"v{k}", rank)
            expr = f"v{k}"
        else:
            expr = expression(n, var)
        var[n] = f"v{k}"
        lines.append(f"    v{k} = {rounded(expr, dtype)}  # {n.name}")
    return lines


def load_lines(inputs: list[fx.Node], offsets: list[sympy.Expr], same_offset: str,
               numbers: list[int] | None = None) -> list[str]:
    """Statements loading input j as fp32 ``in{j}`` under ``mask``: at ``same_offset`` when the
    constexpr ``SAMEj`` says it is laid out as the output, else at its sympy offset. ``numbers``
    gives each input's j (default: its position), for a kernel loading only some of its inputs."""
    lines = []
    for j, a, off in zip(numbers if numbers is not None else range(len(inputs)), inputs, offsets):
        lines += [f"    if SAME{j}:",
                  f"        off{j} = {same_offset}",
                  "    else:",
                  f"        off{j} = {print_index(sympy.expand(off))}",
                  f"    in{j} = tl.load(in{j}_ptr + off{j}, mask=mask, other=0.0).to(tl.float32)  # {a.name}"]
    return lines


def print_index(expr: sympy.Expr) -> str:
    """A sympy index expression as Triton (integer) code."""
    if isinstance(expr, sympy.Symbol):
        return expr.name
    if isinstance(expr, sympy.Integer):
        return str(int(expr))
    if isinstance(expr, sympy.Add):
        return "(" + " + ".join(print_index(a) for a in expr.args) + ")"
    if isinstance(expr, sympy.Mul):
        return "(" + " * ".join(print_index(a) for a in expr.args) + ")"
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        return f"({print_index(num)} // {print_index(den)})"
    if isinstance(expr, sympy.Mod):
        return f"({print_index(expr.args[0])} % {print_index(expr.args[1])})"
    raise Unsupported(f"index expression {expr}")


_COMMENT = re.compile(r"\s+#.*$", re.MULTILINE)


def named_source(prefix: str, lines: list[str]) -> tuple[str, str, str]:
    """(name, source, key) of a kernel written as ``def KERNEL(...)``: the key hashes the source
    without its comments (which name FX nodes), so the same chain in every block of a model
    is one kernel, compiled and autotuned once; the name is ``<prefix>_<key>``."""
    body = "\n".join(lines) + "\n"
    key = hashlib.sha256(_COMMENT.sub("", body).encode()).hexdigest()[:16]
    name = f"{prefix}_{key}"
    return name, body.replace("def KERNEL(", f"def {name}("), key


@dataclasses.dataclass
class PointwiseKernel:
    name: str
    source: str
    inputs: list[str]  # FX names of the external tensor inputs, in argument order
    output: str
    output_dtype: torch.dtype
    rank: int
    rows: bool = False  # one program per row of the last dim (the chain holds a norm)
    key: str = ""  # hash of the source without comments (see named_source)
    int8_key: str = ""  # the chunked variant that also writes INT8 codes (codegen.rows), if emitted


def data_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The tensors a chain reads from outside for their values, in first-use order: the
    kernel's arguments (``y`` of ``x.type_as(y)`` gives only its dtype and is not loaded)."""
    def reads(n: fx.Node) -> list[fx.Node]:
        if n.op == "call_method" and n.target == "type_as":
            return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
        return n.all_input_nodes

    inside, found = set(nodes), []
    for n in nodes:
        for a in reads(n):
            if a not in inside and a not in found:
                found.append(a)
    return found


def emit_pointwise(nodes: list[fx.Node], prefix: str = "pointwise") -> PointwiseKernel:
    """Triton source computing ``nodes[-1]`` from the chain ``nodes`` (graph order) and the
    tensors it reads from outside. A chain with a layer / RMS norm over the last dim (a
    prologue) runs one program per row, the whole row in one tile. Raises
    :class:`Unsupported` for an op with no translation."""
    inputs = data_inputs(nodes)
    out = nodes[-1]
    rank = _rank(out)
    sizes, offsets = _index_expressions(rank, len(inputs))
    var = {a: f"in{j}" for j, a in enumerate(inputs)}
    pointers, layout, same = input_parameters(len(inputs), sizes, rank)
    params = pointers + ["out_ptr", "n_elements"] + layout + same + ["INDEX_64: tl.constexpr", "BLOCK: tl.constexpr"]
    lines = [
        *source_head(),
        "@triton.jit",
        f"def KERNEL({', '.join(params)}):",
        "    # SAMEj: input j is laid out as the output (read at i, no index arithmetic);",
        "    # INDEX_64: offsets may pass 2**31 (else 32-bit index arithmetic, much cheaper)",
        "    pid = tl.program_id(0).to(tl.int64) if INDEX_64 else tl.program_id(0)",
    ]
    rows = any(is_row_norm(n) for n in nodes)
    if rows:
        lines += ["    cols = tl.arange(0, BLOCK)",
                  f"    i = pid * size{rank - 1} + cols",
                  f"    mask = cols < size{rank - 1}"]
    else:
        lines += ["    i = pid * BLOCK + tl.arange(0, BLOCK)",
                  "    mask = i < n_elements"]
    lines += load_lines(inputs, offsets if rank else [sympy.Integer(0)] * len(inputs), "i")
    lines += chain_lines(nodes, var, rank)
    out_dtype = value_dtype(out)
    lines.append(f"    tl.store(out_ptr + i, v{len(nodes) - 1}.to({TL_DTYPES[out_dtype]}), mask=mask)")
    name, source, key = named_source(prefix, lines)
    return PointwiseKernel(name, source, [a.name for a in inputs], out.name, out_dtype, rank, rows, key)


def cache_dir() -> str:
    return os.environ.get("SIXBIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sixbit", "codegen")


_LOADED: dict[str, object] = {}

#: key -> kernel, for ``sixbit::region_kernel`` (process-wide; keys are source hashes, so two
#: models with the same chain share one entry)
REGISTRY: dict[str, PointwiseKernel] = {}


def load_kernel(kernel: PointwiseKernel):
    """The compiled ``@triton.jit`` function, from the disk cache (written on a miss)."""
    path = os.path.join(cache_dir(), f"{kernel.name}.py")
    if path in _LOADED:
        return _LOADED[path]
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(kernel.source)
        os.replace(tmp, path)  # atomic: concurrent compiles never read half a file
    spec = importlib.util.spec_from_file_location(f"sixbit_codegen_{kernel.key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _LOADED[path] = getattr(module, kernel.name)
    return _LOADED[path]


def layout_args(views: list[torch.Tensor], out: torch.Tensor) -> tuple[dict[str, bool], int]:
    """The ``SAMEj`` constexprs (input j has the output's strides: read it at the output's
    offset) and the largest element offset any input or the output reaches (for ``INDEX_64``)."""
    same = {f"SAME{j}": v.stride() == out.stride() for j, v in enumerate(views)}
    reach = max([out.numel()] + [sum((d - 1) * abs(s) for d, s in zip(v.shape, v.stride())) + 1 for v in views])
    return same, reach


def broadcast_inputs(kernel, tensors) -> tuple[torch.Size, list[torch.Tensor]]:
    """(common shape, each input expanded to it: broadcast dims get stride 0) for a generated
    kernel of ``kernel.rank`` taking ``kernel.inputs``."""
    if len(tensors) != len(kernel.inputs):
        raise ValueError(f"{kernel.name} takes {len(kernel.inputs)} tensors, got {len(tensors)}")
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if len(shape) != kernel.rank:
        raise ValueError(f"{kernel.name} is for rank {kernel.rank}, the inputs broadcast to {tuple(shape)}")
    return shape, [t.expand(shape) for t in tensors]


def run_pointwise(kernel: PointwiseKernel, *tensors: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Run ``kernel`` on its input tensors (broadcast to a common shape of the kernel's rank)."""
    shape, views = broadcast_inputs(kernel, tensors)
    out = torch.empty(shape, dtype=kernel.output_dtype, device=tensors[0].device)
    n = out.numel()
    if n == 0:
        return out
    fn = load_kernel(kernel)
    strides = [s for v in views for s in v.stride()]
    same, reach = layout_args(views, out)
    warps = 4
    if kernel.rows:  # one program per row, the row in one tile
        import triton

        grid, block = (n // shape[-1],), triton.next_power_of_2(shape[-1])
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16  # <= 64 fp32 values a thread
    else:
        grid = (-(-n // block),)
    # FMA contraction off: a * b + c rounds twice, as the two eager ops it replaces do
    fn[grid](*views, out, n, *shape, *strides, **same, INDEX_64=reach + block >= 2**31, BLOCK=block,
             num_warps=warps, enable_fp_fusion=False)
    return out
