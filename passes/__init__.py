"""The sixbit FX passes, one per file, in the order the pass manager runs them.

Each pass is ``pass_fn(gm: torch.fx.GraphModule, ctx: CompileContext) -> None``
and states its contract in its module docstring. Switch one off with
``options={"passes": {"<name>": False}}``.
"""

from .block_regions import block_regions
from .find_blocks import find_blocks
from .fold_gelu import fold_gelu
from .fold_qk_norm_rope import fold_qk_norm_rope
from .fuse_regions import fuse_regions
from .lower_regions import lower_regions
from .precision_guards import precision_guards
from .quantize_attention import quantize_attention
from .quantize_linears import quantize_linears
from .quantize_prologues import quantize_prologues
from .share_quantization import share_quantization

#: name -> pass, in execution order.
PASS_REGISTRY = {
    "find_blocks": find_blocks,
    "quantize_linears": quantize_linears,
    "quantize_attention": quantize_attention,
    "fold_qk_norm_rope": fold_qk_norm_rope,
    "fuse_regions": fuse_regions,
    "lower_regions": lower_regions,
    "fold_gelu": fold_gelu,
    "quantize_prologues": quantize_prologues,
    "share_quantization": share_quantization,
    "block_regions": block_regions,
    "precision_guards": precision_guards,
}

__all__ = ["PASS_REGISTRY", "block_regions", "find_blocks", "fold_gelu", "fold_qk_norm_rope", "fuse_regions", "lower_regions", "precision_guards", "quantize_attention", "quantize_linears",
           "quantize_prologues", "share_quantization"]
