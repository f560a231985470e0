"""The block cache's residual stores (delta_store.py): device dict and pinned-host offload."""

import pytest
import torch

import sixbit_compiler
from models import tiny_wan, wan_inputs
from sixbit_compiler.delta_store import DeviceDeltaStore, HostDeltaStore, PinnedArena, StoredDelta
from sixbit_compiler.options import SixbitOptionError, SixbitOptions

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def entry(tokens, dim, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(tokens, dim, generator=g).to(torch.bfloat16).to(device)
    return [StoredDelta.store(delta, "int8"), StoredDelta.store(delta[:, : dim // 2].contiguous(), "activation")]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def same(a: list[StoredDelta], b: list[StoredDelta]) -> bool:
    """Bit-for-bit equal (NaN included)."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and len(x.tensors()) == len(y.tensors())
        and all(s.shape == t.shape and torch.equal(bits(s), bits(t)) for s, t in zip(x.tensors(), y.tensors()))
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_host_store_round_trip_is_bit_exact_and_reads_nothing_stale(device):
    store = HostDeltaStore()
    first, second = entry(7, 32, device, 0), entry(7, 32, device, 1)
    assert store.get((0, 3)) is None and store.shapes((0, 3)) is None
    store.put((0, 3), first)
    assert store.shapes((0, 3)) == [torch.Size([7, 32]), torch.Size([7, 16])]
    got = store.get((0, 3))
    assert got[0].data.device.type == device and same(got, first)
    store.prefetch((0, 3))  # on its way when the block refreshes: the refresh wins
    store.put((0, 3), second)
    assert same(store.get((0, 3)), second)
    assert same(got, first)  # a fetched copy does not alias the host buffer
    assert store.entry_bytes() == sum(d.nbytes for d in second)


def test_host_store_reuses_buffers_across_generations_and_reallocates_on_a_new_shape():
    store = HostDeltaStore()
    store.put((1, 0), entry(5, 32))
    ptr, pinned = store._host[(1, 0)][0].data.data_ptr(), store.host_bytes()
    store.clear()  # a new generation
    assert store.get((1, 0)) is None and store.entry_bytes() == 0 and store.host_bytes() == pinned
    store.put((1, 0), entry(5, 32, seed=2))
    assert store._host[(1, 0)][0].data.data_ptr() == ptr and store.host_bytes() == pinned
    store.put((1, 0), entry(9, 32))  # a new resolution: new buffers, right values
    assert store._host[(1, 0)][0].data.data_ptr() != ptr
    assert same(store.get((1, 0)), entry(9, 32))
    store.release()
    assert store.host_bytes() == 0 and store.get((1, 0)) is None


def test_device_store_keeps_the_entry_itself():
    store = DeviceDeltaStore()
    e = entry(4, 32)
    store.put((0, 0), e)
    assert store.get((0, 0)) is e and store.shapes((0, 0)) == [torch.Size([4, 32]), torch.Size([4, 16])]
    assert store.device_bytes() == store.entry_bytes() == sum(d.nbytes for d in e) and store.host_bytes() == 0


def test_pinned_arena_pieces_are_aligned_disjoint_and_big_ones_get_their_own_slab():
    arena = PinnedArena(pin=False)
    arena.SLAB_BYTES = 4096
    pieces = [arena.take((3, 5), torch.float32), arena.take((100,), torch.int8), arena.take((3000,), torch.int8),
              arena.take((0,), torch.int8), arena.take((2, 2), torch.bfloat16)]
    filled = [p for p in pieces if p.numel()]
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in filled)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all((p.data_ptr() - p.untyped_storage().data_ptr()) % PinnedArena.ALIGN == 0 for p in filled)
    assert [tuple(p.shape) for p in pieces] == [(3, 5), (100,), (3000,), (0,), (2, 2)]
    big = arena.take((10_000,), torch.int8)  # larger than a slab: a power-of-two slab of its own
    assert big.numel() == 10_000 and arena.nbytes >= 4096 + 16384
    for i, p in enumerate(pieces):  # writing one piece leaves the others alone
        p.fill_(i + 1)
    assert all(bool((p == i + 1).all()) for i, p in enumerate(pieces))


def test_cache_location_option():
    assert SixbitOptions.from_dict({}).cache_location == "auto"
    assert SixbitOptions.from_dict({}).for_device(torch.device("cpu")).cache_location == "device"
    gpu = torch.device("cuda", 0)  # activation set: resolving "auto" for a GPU would query it
    assert SixbitOptions.from_dict({"activation": "int8"}).for_device(gpu).cache_location == "host"
    assert SixbitOptions.from_dict({"activation": "int8", "cache_location": "device"}).for_device(gpu).cache_location == "device"
    with pytest.raises(SixbitOptionError, match="'cache_location'"):
        SixbitOptions.from_dict({"cache_location": "disk"})


def run_with_skips(location, device="cpu", calls=(900, 800, 700, 600)):
    torch.manual_seed(0)
    model = tiny_wan(num_layers=4).to(device)
    inp = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in wan_inputs().items()}
    compiled = torch.compile(model, backend="sixbit", options={"block_cache": True, "cache_location": location})
    outs = []
    with torch.no_grad():
        compiled(**inp)
        sixbit_compiler.reset(compiled)
        sixbit_compiler.set_skip_schedule(compiled, sixbit_compiler.evenly_spaced_skips(4, 0.5))
        for t in calls:
            for branch in range(2):  # Wan's two CFG calls per step
                cond = inp["encoder_hidden_states"] * (1 if branch == 0 else -1)
                outs.append(compiled(**{**inp, "timestep": torch.tensor([t], device=device), "encoder_hidden_states": cond})[0])
    return model, outs


@pytest.mark.parametrize("device", DEVICES)
def test_host_cache_gives_the_device_cache_outputs_exactly(device):
    torch._dynamo.reset()
    model_d, outs_d = run_with_skips("device", device)
    torch._dynamo.reset()
    model_h, outs_h = run_with_skips("host", device)
    assert all(torch.equal(a, b) for a, b in zip(outs_d, outs_h))
    assert sixbit_compiler.stats(model_h)["last_generation"]["skip_rate"] > 0.3  # the cache was read
    rep_d, rep_h = sixbit_compiler.memory_report(model_d), sixbit_compiler.memory_report(model_h)
    assert rep_d["cache_location"] == "device" and rep_h["cache_location"] == "host"
    assert rep_d["cache_bytes"] == rep_h["cache_bytes"] > 0
    assert rep_h["cache_pinned_host_bytes"] >= rep_h["cache_bytes"] and rep_d["cache_pinned_host_bytes"] == 0
    sixbit_compiler.reset(model_h)  # entries go, buffers stay for the next generation
    rep = sixbit_compiler.memory_report(model_h)
    assert rep["cache_bytes"] == 0 and rep["cache_pinned_host_bytes"] == rep_h["cache_pinned_host_bytes"]
    sixbit_compiler.reset(model_h, free_cache_memory=True)
    assert sixbit_compiler.memory_report(model_h)["cache_pinned_host_bytes"] == 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA streams")
def test_host_store_copies_are_ordered_after_the_producer_on_a_busy_stream():
    # The producer's last write is queued behind a long matmul chain; the side-stream
    # device-to-host copy must wait for it, and the later host-to-device copy must land
    # before the compute stream reads it.
    store = HostDeltaStore()
    a = torch.randn(4096, 4096, device="cuda")
    expected = []
    for k in range(6):
        x = torch.zeros(2048, 1024, device="cuda", dtype=torch.bfloat16)
        for _ in range(4):
            a = torch.tanh(a @ a / 64)  # bounded: no Inf / NaN however long the chain
        x += a[:2048, :1024].to(torch.bfloat16)  # written after the matmuls, on the compute stream
        e = [StoredDelta.store(x, "int8")]
        store.put((0, k), e)
        expected.append([d.like(lambda t: t.clone()) for d in e])
    for k in range(6):
        store.prefetch((0, k))
    got = [store.get((0, k)) for k in range(6)]
    torch.cuda.synchronize()
    assert all(same(g, e) for g, e in zip(got, expected))
    assert all(g[0].data.device.type == "cuda" for g in got)


class RecordingStore(HostDeltaStore):
    """The host store, logging the runtime's requests."""

    def __init__(self):
        super().__init__()
        self.log = []

    def prefetch(self, key):
        self.log.append(("prefetch", key))
        super().prefetch(key)

    def get(self, key):
        self.log.append(("get", key))
        return super().get(key)

    def put(self, key, deltas):
        self.log.append(("put", key))
        super().put(key, deltas)


def test_runtime_prefetches_a_computing_block_at_its_start_and_a_skipped_one_a_block_ahead():
    torch._dynamo.reset()
    model = tiny_wan(num_layers=4)
    inp = wan_inputs()
    compiled = torch.compile(model, backend="sixbit", options={"block_cache": True, "cache_location": "host"})
    with torch.no_grad():
        compiled(**inp)
        sixbit_compiler.reset(compiled)
        store = RecordingStore()
        sixbit_compiler.runtime_of(model)._deltas = store
        sixbit_compiler.set_skip_schedule(compiled, sixbit_compiler.evenly_spaced_skips(4, 0.5))  # skips 1 and 3
        compiled(**{**inp, "timestep": torch.tensor([900])})  # step 0: everything computes and is stored
        # nothing stored yet: prefetches find nothing, no reads, every block stores its Δ
        assert store.log == [op for i in range(4) for op in (("prefetch", (0, i)), ("put", (0, i)))]
        store.log.clear()
        compiled(**{**inp, "timestep": torch.tensor([800])})  # step 1: blocks 1 and 3 reuse their Δ
    assert store.log == [
        ("prefetch", (0, 0)), ("prefetch", (0, 1)), ("get", (0, 0)), ("put", (0, 0)),  # block 0 computes
        ("get", (0, 1)),  # block 1 skipped: its copy was started at block 0's start
        ("prefetch", (0, 2)), ("prefetch", (0, 3)), ("get", (0, 2)), ("put", (0, 2)),
        ("get", (0, 3)),
    ]
    assert [c["skipped_blocks"] for c in sixbit_compiler.stats(model)["calls"][-1:]] == [[1, 3]]


def test_an_arena_that_cannot_pin_falls_back_to_pageable_memory_with_one_warning(monkeypatch, caplog):
    real_empty = torch.empty

    def no_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cannot pin: locked-memory limit")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_pinning)
    arena = PinnedArena(pin=True)
    arena.SLAB_BYTES = 4096
    with caplog.at_level("WARNING", logger="sixbit"):
        pieces = [arena.take((3000,), torch.int8) for _ in range(3)]  # three slabs
    assert [p.numel() for p in pieces] == [3000] * 3 and arena.pin is False
    assert len([r for r in caplog.records if "could not pin" in r.getMessage()]) == 1


def test_when_host_memory_runs_short_entries_stay_on_the_device_with_one_warning(monkeypatch, caplog):
    import sixbit_compiler.delta_store as ds

    store = HostDeltaStore()
    store.put((0, 0), entry(8, 32, seed=0))  # fits
    monkeypatch.setattr(ds, "host_available_bytes", lambda: PinnedArena.HOST_RESERVE_BYTES)  # nothing to spare
    first, second = entry(8, 32, seed=1), entry(300_000, 32, seed=2)  # the second needs a new slab
    with caplog.at_level("WARNING", logger="sixbit"):
        store.put((0, 0), first)  # reuses its buffer: still host
        store.put((0, 1), second)
        store.put((1, 1), second)
    assert len([r for r in caplog.records if "host memory is short" in r.getMessage()]) == 1
    assert same(store.get((0, 0)), first) and store.get((0, 1)) is second
    assert store.shapes((0, 1)) == [torch.Size([300_000, 32]), torch.Size([300_000, 16])]
    assert store.entry_bytes() == sum(d.nbytes for d in first) + 2 * sum(d.nbytes for d in second)
    assert store.device_bytes() == 2 * sum(d.nbytes for d in second)
    store.clear()
    assert store.get((0, 1)) is None and store.entry_bytes() == 0
