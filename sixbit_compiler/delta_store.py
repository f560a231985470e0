"""Where the temporal delta cache keeps its residuals: on the device, or in pinned host memory.

The cache holds one Δ per (CFG branch, block, residual stream). On Wan2.1-14B at 480p that is
40 blocks × 2 branches × 168 MB of per-token INT8: 13.4 GB, as much as the quantized weights
and the activations together. Yet a block's Δ is read only twice per call of its branch: when
the block is skipped (X + Δ) or when it computes and refreshes Δ (the residual-change
statistic reads the old one). So the host can hold it:

* ``DeviceDeltaStore``: a dict of device tensors (``cache_location="device"``).
* ``HostDeltaStore``: one pinned host buffer per entry, reused across generations. A refreshed
  Δ goes to the host on a copy stream (device-to-host, ordered after the kernel that wrote
  it); an entry the call will read comes back on another copy stream into a fresh device
  buffer (:meth:`prefetch`), and the compute stream waits for that copy only when it reads it
  (:meth:`get`). The runtime prefetches a computing block's entry when the block starts (the
  copy overlaps the block's own compute) and a skipped block's entry one block ahead: at most
  two entries come in at a time, and refreshes still going out are bounded at 384 MiB.

Both stores give the same values: the host copy is bit-exact. Safety with the caching
allocator: a refreshed Δ being copied out is ``record_stream``-ed on its copy stream, so its
memory is not reused before the copy ends; a prefetched buffer is only ever read or dropped
after the compute stream waited for its copy, so it frees at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .formats import dequantize_fp8_rows, dequantize_int8, quantize_fp8_rows, quantize_int8

log = logging.getLogger("sixbit")

Key = tuple[int, int]  # (CFG branch, block index)


@dataclasses.dataclass
class StoredDelta:
    """A cached block residual, kept in the activation dtype or per-token INT8 / FP8."""

    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype

    @property
    def shape(self):
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.scale is None else [self.data, self.scale]

    @classmethod
    def store(cls, delta: torch.Tensor, how: str) -> "StoredDelta":
        if how == "int8":
            codes, scale = quantize_int8(delta)
            return cls(codes, scale, delta.dtype)
        if how == "fp8":
            codes, scale = quantize_fp8_rows(delta)
            return cls(codes, scale, delta.dtype)
        return cls(delta, None, delta.dtype)

    def load(self) -> torch.Tensor:
        if self.scale is None:
            return self.data
        if self.data.dtype == torch.int8:
            return dequantize_int8(self.data, self.scale, self.dtype)
        return dequantize_fp8_rows(self.data, self.scale, self.dtype)

    def like(self, make) -> "StoredDelta":
        """A StoredDelta of the same layout whose tensors are ``make(t)`` of this one's."""
        return StoredDelta(make(self.data), None if self.scale is None else make(self.scale), self.dtype)


class PinnedArena:
    """Host buffers carved out of large pinned slabs.

    PyTorch's pinned-memory allocator rounds every allocation up to a power of two: 80
    entries of 168 MB would pin 20 GB for 13.4 GB of data. Slabs of ``SLAB_BYTES`` (a power
    of two; smaller for small entries) are cut into 512-byte aligned pieces instead; an entry
    larger than a slab gets a slab of its own. Pieces are never returned one by one (the
    store reuses an entry's buffers from generation to generation); :meth:`release` drops
    everything.
    """

    SLAB_BYTES = 1 << 30
    ALIGN = 512
    #: A new slab is only taken while the host keeps this much memory available after it.
    HOST_RESERVE_BYTES = 4 << 30

    def __init__(self, pin: bool):
        self.pin = pin
        self._slabs: list[torch.Tensor] = []
        self._free_at = 0  # offset of the free space in the last slab

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """A buffer of this shape and dtype, or None if a new slab would leave the host short."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        size = max(1, -(-nbytes // self.ALIGN)) * self.ALIGN
        if not self._slabs or self._free_at + size > self._slabs[-1].numel():
            pow2 = 1 << (size - 1).bit_length()
            slab_bytes = max(pow2, min(self.SLAB_BYTES, 16 * pow2))  # small entries, small slabs
            available = host_available_bytes()
            if available is not None and slab_bytes > available - self.HOST_RESERVE_BYTES:
                return None
            self._slabs.append(self._slab(slab_bytes))
            self._free_at = 0
        piece = self._slabs[-1][self._free_at : self._free_at + nbytes]
        self._free_at += size
        return piece.view(dtype).view(shape)

    def _slab(self, nbytes: int) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc:  # e.g. a container's locked-memory limit
                log.warning("sixbit: could not pin %d MB of host memory for the block cache (%s); the cache "
                            "stays in host memory but its copies are no longer asynchronous. "
                            "cache_location='device' avoids host memory.", nbytes >> 20, exc)
                self.pin = False
        return torch.empty(nbytes, dtype=torch.uint8)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self._slabs)

    def release(self) -> None:
        self._slabs.clear()
        self._free_at = 0


def host_available_bytes() -> int | None:
    """Host memory available to allocate (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _signature(deltas: list[StoredDelta]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for d in deltas for t in d.tensors())


def _copy_entry(dst: list[StoredDelta], src: list[StoredDelta], non_blocking: bool = False) -> None:
    """Copy every tensor of an entry into the matching tensor of another (same layout)."""
    for d, s in zip(dst, src):
        for a, b in zip(d.tensors(), s.tensors()):
            a.copy_(b, non_blocking=non_blocking)


class DeviceDeltaStore:
    """Residuals stay where they were computed."""

    location = "device"

    def __init__(self):
        self._entries: dict[Key, list[StoredDelta]] = {}

    def shapes(self, key: Key) -> list[torch.Size] | None:
        """The stored streams' shapes (host metadata: no transfer, no sync)."""
        entry = self._entries.get(key)
        return None if entry is None else [d.shape for d in entry]

    def get(self, key: Key) -> list[StoredDelta] | None:
        return self._entries.get(key)

    def put(self, key: Key, deltas: list[StoredDelta]) -> None:
        self._entries[key] = deltas

    def prefetch(self, key: Key) -> None:
        pass

    def clear(self) -> None:
        self._entries.clear()

    release = clear  # nothing is kept between generations

    def entry_bytes(self) -> int:
        """Bytes of the entries held now."""
        return sum(d.nbytes for ds in self._entries.values() for d in ds)

    def device_bytes(self) -> int:
        return self.entry_bytes()

    def host_bytes(self) -> int:
        return 0


class HostDeltaStore:
    """Residuals live in pinned host memory; entries travel on side streams (module docstring).

    Two copy streams, one per direction, so a refresh going out and a prefetch coming in
    overlap (PCIe is full duplex). A host buffer is the only thing both touch: a copy out
    waits for the last copy in from the same buffer, and the other way round (per-entry
    events). Refreshes in flight hold device memory (their buffers cannot be reused before the
    copy ends), so a CPU running far ahead of the GPU would pile them up: past
    ``MAX_OUTGOING_BYTES`` the CPU waits for the oldest (an event wait, not a device-to-host
    transfer). Small models never reach the bound, so their CPU runs ahead freely.
    """

    location = "host"
    MAX_OUTGOING_BYTES = 384 << 20  # two W-14B entries (168 MB each)

    def __init__(self):
        self._host: dict[Key, list[StoredDelta]] = {}  # buffers, kept across generations
        self._arena: PinnedArena | None = None
        self._valid: set[Key] = set()  # entries written in this generation
        self._incoming: dict[Key, tuple[list[StoredDelta], torch.cuda.Event | None]] = {}
        self._written: dict[Key, torch.cuda.Event] = {}  # last copy out to the entry's host buffer
        self._read: dict[Key, torch.cuda.Event] = {}  # last copy in from it
        self._outgoing: list[tuple[torch.cuda.Event, int]] = []  # (copy done, bytes)
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        # each entry goes back to the device it came from (a model may span GPUs)
        self._devices: dict[Key, torch.device] = {}
        # entries for which the host had no memory left stay on the device (one warning)
        self._kept_on_device: dict[Key, list[StoredDelta]] = {}
        self._warned_host_short = False

    def _copy_streams(self, device: torch.device):
        """(host-to-device, device-to-host) streams, or None off CUDA (copies run inline)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    # ---- the store's interface --------------------------------------------------------
    def shapes(self, key: Key) -> list[torch.Size] | None:
        if key in self._kept_on_device:
            return [d.shape for d in self._kept_on_device[key]]
        if key not in self._valid:
            return None
        return [d.shape for d in self._host[key]]

    def put(self, key: Key, deltas: list[StoredDelta]) -> None:
        """Copy a refreshed entry to its host buffers (asynchronously on CUDA)."""
        device = deltas[0].data.device
        self._devices[key] = device
        self._kept_on_device.pop(key, None)
        self._drop_incoming(key)  # a copy of the previous entry is stale now
        buffers = self._host.get(key)
        if buffers is None or _signature(buffers) != _signature(deltas):
            if self._arena is None:
                self._arena = PinnedArena(pin=device.type == "cuda")
            buffers = [d.like(lambda t: self._arena.take(t.shape, t.dtype)) for d in deltas]
            self._host.pop(key, None)
            self._valid.discard(key)
            self._read.pop(key, None)
            if any(t is None for d in buffers for t in d.tensors()):
                self._keep_on_device(key, deltas)
                return
            self._host[key] = buffers
        streams = self._copy_streams(device)
        self._valid.add(key)
        if streams is None:
            _copy_entry(buffers, deltas)
            return
        out = streams[1]
        out.wait_stream(torch.cuda.current_stream(device))  # after the kernel that wrote Δ
        if key in self._read:
            out.wait_event(self._read.pop(key))  # the old entry has left this buffer
        with torch.cuda.stream(out):
            _copy_entry(buffers, deltas, non_blocking=True)
            written = torch.cuda.Event()
            written.record(out)
        for d in deltas:
            for t in d.tensors():
                t.record_stream(out)
        self._written[key] = written
        self._outgoing = [(e, n) for e, n in self._outgoing if not e.query()]
        self._outgoing.append((written, sum(d.nbytes for d in deltas)))
        while len(self._outgoing) > 1 and sum(n for _, n in self._outgoing) > self.MAX_OUTGOING_BYTES:
            self._outgoing.pop(0)[0].synchronize()

    def _keep_on_device(self, key: Key, deltas: list[StoredDelta]) -> None:
        if not self._warned_host_short:
            self._warned_host_short = True
            log.warning("sixbit: host memory is short (under %d GB would stay available); block cache entries "
                        "that do not fit stay on the device from now on", PinnedArena.HOST_RESERVE_BYTES >> 30)
        self._kept_on_device[key] = deltas

    def prefetch(self, key: Key) -> None:
        """Start bringing an entry to the device, if stored and not already on its way."""
        self._start_copy(key)

    def _start_copy(self, key: Key) -> None:
        if key not in self._valid or key in self._incoming:
            return
        device = self._devices[key]
        streams = self._copy_streams(device)
        if streams is None:
            self._incoming[key] = ([h.like(lambda t: t.clone()) for h in self._host[key]], None)
            return
        into = streams[0]
        main = torch.cuda.current_stream(device)
        # Allocated on the compute stream; the copy waits for what is queued there so far,
        # because this memory may have been freed by a kernel still queued.
        on_device = [h.like(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device)) for h in self._host[key]]
        into.wait_stream(main)
        if key in self._written:
            into.wait_event(self._written[key])  # the entry has fully arrived in host memory
        with torch.cuda.stream(into):
            _copy_entry(on_device, self._host[key], non_blocking=True)
            done = torch.cuda.Event()
            done.record(into)
        # No record_stream here: the compute stream waits for ``done`` before it reads the
        # buffers or drops them unread (_drop_incoming), so they free as soon as it is done.
        self._read[key] = done
        self._incoming[key] = (on_device, done)

    def _drop_incoming(self, key: Key) -> None:
        """Forget an entry's device copy; the compute stream first waits for the copy to land
        (its memory must not be reused under a copy still writing it)."""
        entry = self._incoming.pop(key, None)
        if entry is not None and entry[1] is not None:
            torch.cuda.current_stream(self._devices[key]).wait_event(entry[1])

    def get(self, key: Key) -> list[StoredDelta] | None:
        """The entry on the device, ready for the compute stream (it waits for the copy)."""
        if key in self._kept_on_device:
            return self._kept_on_device[key]
        if key not in self._valid:
            return None
        self._start_copy(key)  # no-op if prefetched
        on_device, done = self._incoming.pop(key)
        if done is not None:
            torch.cuda.current_stream(self._devices[key]).wait_event(done)
        return on_device

    def clear(self) -> None:
        """Forget every entry (buffers stay allocated for the next generation)."""
        self._valid.clear()
        self._kept_on_device.clear()
        for key in list(self._incoming):
            self._drop_incoming(key)

    def release(self) -> None:
        """Free the host buffers too."""
        self.clear()
        self._host.clear()
        self._written.clear()
        self._read.clear()
        self._outgoing.clear()
        if self._arena is not None:
            self._arena.release()

    def entry_bytes(self) -> int:
        """Bytes of the entries held now (in host memory, or kept on the device)."""
        return sum(d.nbytes for key in self._valid for d in self._host[key]) + self._kept_bytes()

    def device_bytes(self) -> int:
        """Bytes on the device: entries on their way there, and any kept there."""
        return sum(d.nbytes for ds, _ in self._incoming.values() for d in ds) + self._kept_bytes()

    def _kept_bytes(self) -> int:
        return sum(d.nbytes for ds in self._kept_on_device.values() for d in ds)

    def host_bytes(self) -> int:
        """Pinned host bytes allocated (kept across generations for reuse)."""
        return 0 if self._arena is None else self._arena.nbytes


def make_delta_store(location: str):
    return HostDeltaStore() if location == "host" else DeviceDeltaStore()
