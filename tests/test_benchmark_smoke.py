"""The end-to-end benchmark script runs on CPU with tiny configs (no timing is asserted)."""

import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(name: str):
    """Import a script from benchmarks/ (not a package) as a module."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("workload", ["tiny-wan", "tiny-cogvideox"])
def test_e2e_benchmark_smoke(workload, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    e2e = benchmark("e2e")
    report = e2e.main(["--workload", workload, "--steps", "3", "--modes", "bf16_eager,sixbit_int8,sixbit_int8_skip50"])
    modes = report["modes"]
    assert set(modes) == {"bf16_eager", "sixbit_int8", "sixbit_int8_skip50"}
    assert all("failed" not in m for m in modes.values()), modes
    assert modes["bf16_eager"]["fidelity_vs_bf16"]["relative_l2"] == 0
    assert 0 < modes["sixbit_int8"]["fidelity_vs_bf16"]["relative_l2"] < 0.2
    assert modes["sixbit_int8_skip50"]["skip_rate"] > 0 and modes["sixbit_int8"]["skip_rate"] == 0
    assert modes["sixbit_int8"]["weights_bytes"] < modes["sixbit_int8"]["weights_bf16_bytes"]
    assert (tmp_path / f"e2e_{workload}.json").exists()


def test_e2e_modes_across_commands_share_the_reference_and_pick_the_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    e2e = benchmark("e2e")
    ref = str(tmp_path / "ref.pt")
    common = ["--workload", "tiny-wan", "--steps", "3", "--reference", ref]
    first = e2e.main(common + ["--modes", "bf16_eager"])["modes"]
    second = e2e.main(common + ["--modes", "sixbit_int8_skip50@host,sixbit_int8_skip50@device,"
                                          "sixbit_int8_skip50+int8_weights=*.attn1.to_[qk]@host"])["modes"]
    assert "failed" not in first["bf16_eager"] and os.path.exists(ref)
    host, device = second["sixbit_int8_skip50@host"], second["sixbit_int8_skip50@device"]
    assert host["cache_location"] == "host" and device["cache_location"] == "device"
    assert host["fidelity_vs_bf16"] == device["fidelity_vs_bf16"]  # same values wherever the cache lives
    assert 0 < host["fidelity_vs_bf16"]["relative_l2"] < 0.5
    int8qk = second["sixbit_int8_skip50+int8_weights=*.attn1.to_[qk]@host"]
    assert "failed" not in int8qk and int8qk["weights_bytes"] > host["weights_bytes"]  # q, k at 8 bits


def test_e2e_mode_overrides_parse_json_or_keep_strings():
    overrides = benchmark("e2e").option_overrides
    assert overrides(["int8_weights=*.attn1.to_[qk]", "cache_threshold=0.2", "hadamard=true"]) == {
        "int8_weights": "*.attn1.to_[qk]", "cache_threshold": 0.2, "hadamard": True}
    assert overrides(["hadamard=True", "cache_max_skips=2", "cache_dtype=fp8"]) == {
        "hadamard": True, "cache_max_skips": 2, "cache_dtype": "fp8"}
    with pytest.raises(ValueError, match="key=value"):
        overrides(["int8_weights"])


def test_e2e_modes_split_at_commas_outside_json_lists():
    split = benchmark("e2e").split_modes
    assert split('bf16_eager,sixbit_int8+int8_weights=["blocks.?.attn1.to_k","blocks.1?.attn1.to_k"]@host,inductor') == [
        "bf16_eager", 'sixbit_int8+int8_weights=["blocks.?.attn1.to_k","blocks.1?.attn1.to_k"]@host', "inductor"]
    assert split("a,b,") == ["a", "b"]


def test_memory_peak_replay():
    peak_from_trace = benchmark("memory_peak").peak_from_trace
    frame = [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
             {"filename": "/repo/sixbit_compiler/runtime.py", "line": 7, "name": "block_computed"}]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frame},
        {"action": "alloc", "addr": 2, "size": 50, "frames": []},
        {"action": "free_requested", "addr": 1, "size": 100},  # not freed yet (stream use)
        {"action": "free_completed", "addr": 9, "size": 30},  # allocated before the recording
        {"action": "alloc", "addr": 3, "size": 10, "frames": []},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},
    ]
    out = peak_from_trace(events, baseline=1000)
    assert out["peak_bytes"] == 1150 and out["live_at_peak_bytes"] == 150
    assert [e["mb"] for e in out["live_at_peak"]] == [0.0, 0.0]
    assert out["live_at_peak"][0]["where"] == ["sixbit_compiler/runtime.py:7 block_computed"]


def test_block_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    block = benchmark("block")
    res = block.main(["--model", "tiny", "--modes", "eager,sixbit,sixbit_fused"])
    modes = res["modes"]
    assert all("error" not in m for m in modes.values()), modes
    assert modes["eager"]["rel_l2_vs_eager"] == 0
    assert 0 < modes["sixbit"]["rel_l2_vs_eager"] < 0.2
    assert abs(modes["sixbit_fused"]["rel_l2_vs_eager"] - modes["sixbit"]["rel_l2_vs_eager"]) < 1e-3
    assert res["min_bytes_nvfp4"] < res["min_bytes_bf16"] and (tmp_path / "block_tiny.json").exists()


def test_chart_draws_every_workload_from_the_stored_results(tmp_path):
    chart = benchmark("chart")
    titles = [t for t, _, points in chart.panels() if points]
    assert len(titles) == 4  # W-1.3B, W-14B, C-2B, REF: each with points
    out = chart.draw(str(tmp_path / "chart.png"))
    from PIL import Image

    assert Image.open(out).size == (4 * 560, 420)


def test_ncu_csv_is_summed_per_block_with_attention_apart():
    block = benchmark("block")
    header = '"ID","Process ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    rows = [
        '"0","1","cudnn_generated_fort_native_sdpa_sm90_flash_fprop","dram__bytes_read.sum","Gbyte","2.5"',
        '"0","1","cudnn_generated_fort_native_sdpa_sm90_flash_fprop","dram__bytes_write.sum","Mbyte","100"',
        '"1","1","_scaled_gemm_body","dram__bytes_read.sum","Mbyte","1,500"',
        '"1","1","_scaled_gemm_body","dram__bytes_write.sum","byte","4000"',
    ]
    text = "==PROF== Connected to process\n" + "\n".join([header, *rows]) + "\n"
    got = block.parse_ncu_csv(text, calls=2)
    assert got == {"read": 2.0e9, "written": (100e6 + 4000) / 2, "attention_read": 1.25e9,
                   "attention_written": 50e6, "kernels_per_block": 1.0}
    assert block.parse_ncu_csv("no metrics here") is None


def test_gpu_idle_counts_the_gaps_between_kernels_per_block():
    """Overlapping kernels leave no gap; a gap is measured from the latest end so far."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    block = benchmark("block")

    def kernel(name, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [kernel("a", 0, 100), kernel("b", 50, 80),  # b inside a: no gap
              kernel("c", 130, 200),  # 30 µs after a's end
              kernel("host", 200, 900, DeviceType.CPU),  # host events do not count
              kernel("d", 210, 300)]  # 10 µs
    got = block.gpu_idle(events)
    assert got["span_s"] == pytest.approx(150e-6) and got["idle_s"] == pytest.approx(20e-6) and got["gaps"] == 1.0
    assert got["longest_gaps"] == [[30.0, "a", "c"], [10.0, "c", "d"]]
    assert block.gpu_idle([]) == {}
