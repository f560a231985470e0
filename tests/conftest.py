import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run on CPU under the interpreter; the variable must be set before any
# kernel is defined, i.e. before sixbit_compiler.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: one GEMM tile per kernel instead of autotuning seven at every small test shape.
os.environ.setdefault("SIXBIT_GEMM_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty Dynamo caches and counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# Pass-test helpers are public API (sixbit_compiler.testing); tests import them from here.
from sixbit_compiler.testing import apply_pass, capture, context_for  # noqa: E402,F401
