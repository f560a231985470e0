"""options= -> SixbitOptions: typed, validated, errors that name the key."""

import pytest
import torch

from sixbit_compiler import SixbitOptionError, SixbitOptions
from sixbit_compiler.formats import Precision


def test_defaults():
    o = SixbitOptions.from_dict(None)
    assert o.activation == "int8" and o.precision == Precision.INT8
    assert o.include == () and o.exclude == () and o.hadamard is False and o.free_weights is True
    assert o.pass_enabled("quantize_linears")


def test_values_are_parsed():
    o = SixbitOptions.from_dict(
        {"activation": "nvfp4", "include": "blocks.*", "exclude": ["*.ffn.*"], "hadamard": True,
         "passes": {"quantize_linears": False}, "dump_dir": "/tmp/x"}
    )
    assert o.precision == Precision.NVFP4 and o.include == ("blocks.*",) and o.exclude == ("*.ffn.*",)
    assert not o.pass_enabled("quantize_linears") and o.pass_enabled("find_blocks")


@pytest.mark.parametrize(
    "options, key",
    [
        ({"activaton": "int8"}, "activaton"),
        ({"activation": "fp4"}, "activation"),
        ({"activation": "dynamic"}, "activation"),
        ({"activation": 8}, "activation"),
        ({"hadamard": "yes"}, "hadamard"),
        ({"include": 3}, "include"),
        ({"exclude": ["ok", 4]}, "exclude"),
        ({"passes": {"no_such_pass": False}}, "passes"),
        ({"passes": ["find_blocks"]}, "passes"),
        ({"passes": {"find_blocks": "off"}}, "passes"),
        ({"lowering": "tvm"}, "lowering"),
        ({"free_weights": 1}, "free_weights"),
        ({"dump_dir": 5}, "dump_dir"),
        ({"block_cache": "on"}, "block_cache"),
        ({"cache_dtype": "fp4"}, "cache_dtype"),
        ({"cache_policy": "teacache"}, "cache_policy"),
        ({"cache_threshold": -1}, "cache_threshold"),
        ({"cache_max_skips": 1.5}, "cache_max_skips"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(SixbitOptionError, match=repr(key)):
        SixbitOptions.from_dict(options)


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SIXBIT_DUMP_DIR", str(tmp_path))
    assert SixbitOptions.from_dict({}).dump_dir == str(tmp_path)
    assert SixbitOptions.from_dict({"dump_dir": "/elsewhere"}).dump_dir == "/elsewhere"


def test_bad_option_through_torch_compile_names_the_key():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    compiled = torch.compile(model, backend="sixbit", options={"activation": "fp4"})
    with pytest.raises(Exception, match="'activation'"):
        compiled(torch.randn(2, 8))
