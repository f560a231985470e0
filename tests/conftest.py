import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run on CPU under the interpreter; the variable must be set before any
# kernel is defined, i.e. before sixbit_compiler.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


def capture(model, *args, **kwargs):
    """Dynamo-capture ``model`` once; returns (GraphModule, example_inputs)."""
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    assert len(captured) == 1, "expected a single graph"
    return captured[0]


def context_for(gm, example_inputs, **options):
    from sixbit_compiler.backend import copy_graph_module
    from sixbit_compiler.context import CompileContext
    from sixbit_compiler.options import SixbitOptions
    from sixbit_compiler.runtime import SixbitRuntime

    opts = SixbitOptions.from_dict(options)
    gm = copy_graph_module(gm)
    return gm, CompileContext.for_graph(gm, example_inputs, opts, runtime=SixbitRuntime(opts))
