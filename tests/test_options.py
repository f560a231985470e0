"""options= -> SixbitOptions: typed, validated, errors that name the key."""

import pytest
import torch

from sixbit_compiler import SixbitOptionError, SixbitOptions
from sixbit_compiler.formats import Precision


def test_defaults():
    o = SixbitOptions.from_dict(None)
    assert o.activation == "auto" and o.precision == Precision.INT8
    o = o.for_device(torch.device("cpu"))  # on CPU (the method's emulation) "auto" is DMPQ
    assert o.activation == "dynamic" and o.dynamic and o.precision == Precision.INT8  # DMPQ's fallback
    assert o.dmpq_budget is None and o.calibration is None and o.preset is None
    assert o.include == () and o.exclude == () and o.hadamard is False and o.free_weights is True
    assert o.pass_enabled("quantize_linears")


@pytest.mark.parametrize("capability, expected", [((9, 0), "int8"), ((8, 0), "int8"), ((10, 0), "dynamic")])
def test_auto_activation_runs_dmpq_only_where_nvfp4_pays(monkeypatch, caplog, capability, expected):
    """Hopper has no FP4 tensor cores: emulated NVFP4 activations are slower than INT8 there
    (C-2B's fast preset: 0.85x bf16 with 98 % NVFP4 on the H200), so "auto" runs INT8."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    with caplog.at_level("INFO", logger="sixbit"):
        o = SixbitOptions.from_dict({"preset": "fast"}).for_device(torch.device("cuda"))
    assert o.activation == expected and o.block_cache  # the rest of the preset stays
    assert (expected == "int8") == any("activation='auto' runs INT8" in r.getMessage() for r in caplog.records)
    explicit = SixbitOptions.from_dict({"activation": "dynamic"}).for_device(torch.device("cuda"))
    assert explicit.activation == "dynamic"  # asked for by name: DMPQ anywhere


def test_values_are_parsed():
    o = SixbitOptions.from_dict(
        {"activation": "nvfp4", "include": "blocks.*", "exclude": ["*.ffn.*"], "hadamard": True,
         "passes": {"quantize_linears": False}, "dump_dir": "/tmp/x"}
    )
    assert o.precision == Precision.NVFP4 and o.include == ("blocks.*",) and o.exclude == ("*.ffn.*",)
    assert SixbitOptions.from_dict({"int8_weights": "*.attn1.to_q"}).int8_weights == ("*.attn1.to_q",)
    assert not o.pass_enabled("quantize_linears") and o.pass_enabled("find_blocks")


@pytest.mark.parametrize(
    "options, key",
    [
        ({"activaton": "int8"}, "activaton"),
        ({"activation": "fp4"}, "activation"),
        ({"activation": "dynamc"}, "activation"),
        ({"dmpq_budget": -0.1}, "dmpq_budget"),
        ({"calibration": "/no/such/file.json"}, "calibration"),
        ({"preset": "fastest"}, "preset"),
        ({"activation": 8}, "activation"),
        ({"hadamard": "yes"}, "hadamard"),
        ({"include": 3}, "include"),
        ({"exclude": ["ok", 4]}, "exclude"),
        ({"int8_weights": 5}, "int8_weights"),
        ({"weight_scales": "max"}, "weight_scales"),
        ({"passes": {"no_such_pass": False}}, "passes"),
        ({"passes": ["find_blocks"]}, "passes"),
        ({"passes": {"find_blocks": "off"}}, "passes"),
        ({"lowering": "tvm"}, "lowering"),
        ({"free_weights": 1}, "free_weights"),
        ({"dump_dir": 5}, "dump_dir"),
        ({"block_cache": "on"}, "block_cache"),
        ({"codegen": "yes"}, "codegen"),
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


def test_presets_set_the_method_and_explicit_options_win():
    from sixbit_compiler.options import PRESETS

    fast = SixbitOptions.from_dict({"preset": "fast"})
    assert fast.activation == "auto" and fast.block_cache and fast.dmpq_budget == PRESETS["fast"]["dmpq_budget"]
    quality = SixbitOptions.from_dict({"preset": "quality"})
    assert not quality.block_cache and quality.dmpq_budget < fast.dmpq_budget
    assert quality.int8_weights == ("*.attn1.to_q", "*.attn1.to_k") and fast.int8_weights == ()
    assert SixbitOptions.from_dict({"preset": "quality", "int8_weights": ()}).int8_weights == ()
    mine = SixbitOptions.from_dict({"preset": "balanced", "cache_threshold": 0.5, "activation": "int8"})
    assert mine.cache_threshold == 0.5 and mine.activation == "int8" and mine.block_cache
    assert mine.cache_tau == PRESETS["balanced"]["cache_tau"]


def test_a_bad_calibration_file_is_refused_at_compile_time(tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text("{}")
    with pytest.raises(SixbitOptionError, match="'calibration'.*not a readable calibration file"):
        SixbitOptions.from_dict({"calibration": str(bad)})


def test_pass_test_contexts_resolve_auto_like_the_backend():
    from conftest import capture, context_for
    from models import tiny_wan, wan_inputs

    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    _, ctx = context_for(gm, ex)  # CPU inputs: "auto" is DMPQ, as torch.compile(backend="sixbit") runs it
    assert ctx.options.activation == "dynamic" and ctx.options.measures_blocks
