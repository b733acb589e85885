"""CUDA IPC point-to-point transport: NCCL-style `batch_isend_irecv` between processes on one GPU.

Why it exists: ranks that share ONE GPU (the lent single-H100 machine runs 2 and 4 ranks that
way) cannot use NCCL ("Duplicate GPU detected") and gloo aborts on CUDA send/recv, but CUDA IPC
between the processes works and, under MPS, their kernels run concurrently (design.md,
"Transports"). Control traffic (setup, `reserve`) goes over a CPU-capable group (gloo); the data
never leaves the GPU.

    transport = CudaIpcTransport(group=gloo_group, device=torch.device("cuda", 0), slots=2)
    transport.reserve(max_message_bytes)            # collective; capacity = max over ranks
    works = transport.batch_isend_irecv([
        dist.P2POp(dist.isend, kv_next_src, next_rank, gloo_group),
        dist.P2POp(dist.irecv, kv_next_dst, prev_rank, gloo_group),
    ])
    out = attention(q, kv_cur)                       # overlaps the copies
    for w in works:
        w.wait()                                     # current stream waits, device-side only

Contract (the same as NCCL's P2P):
- A send reads its tensor on the transport's send stream, ordered after all work already on the
  caller's current stream when `batch_isend_irecv` is called. Do not write the tensor (on any
  stream) until you called that send's `work.wait()`, which orders your current stream after the
  read. A recv writes its tensor on the recv stream, also ordered after the caller's current
  stream at post time; its data may be used on the current stream after `work.wait()`.
- `wait()` never blocks the host. The host blocks only in `synchronize()`, `reserve()`, `close()`
  and `check="host"` mode, each with a timeout that raises `TimeoutError` with the flag state.
- Matching: the k-th send from rank a to rank b pairs with the k-th recv at b from a (MPI/NCCL
  order); size and dtype must agree (checked, see `check`). Within one call all sends are issued
  before all recvs, so op order inside a batch does not matter. All sends of this transport run
  in order on one stream, all recvs on another: waiting a later recv implies the earlier ones.
- At most `slots` sends per destination may be posted and not yet `wait()`ed (RuntimeError
  otherwise): each holds one inbox slot at the receiver until the receiver consumed it.
- Tensors: CUDA, on the transport's device, contiguous, at most the reserved bytes.
- Not thread-safe; not capturable in CUDA graphs (sequence numbers are host state).

Protocol (push model; all synchronisation is device-side):
Each rank owns one buffer, shared with every peer once per `reserve` through
`torch.multiprocessing.reductions.reduce_tensor` handles (all_gather_object on the gloo group):

    [ready u32 [W][S] | ack u32 [W][S] | hdr i64 [W][S] | probe u32 [W][2] | pad | data [W][S][capacity]]

ready/hdr/data[src][slot] are written by rank src, ack[dst][slot] by rank dst, probe[src] by rank
src (at each `reserve`, to check the flag ops on the IPC-mapped peer buffers, see below). Message s
(s = 1, 2, ... per ordered pair, u32 with cyclic comparison) uses slot (s - 1) % S.
Sender (send stream, after waiting on the caller's stream):
    if s > S: wait   my.ack[dst][slot] >= s - S          (receiver has drained the slot)
    copy      tensor bytes -> peer.data[me][slot]         (cudaMemcpyAsync D2D into IPC memory)
    write     peer.hdr[me][slot] = nbytes | dtype_code << 48
    write     peer.ready[me][slot] = s                    (default flags: memory barrier first)
Receiver (recv stream, after waiting on the caller's stream):
    wait      my.ready[src][slot] >= s
    check     my.hdr[src][slot] == expected header        (device assert, or host in check="host")
    copy      my.data[src][slot] -> tensor bytes
    write     peer(src).ack[me][slot] = s                 (after the copy: stream order)
The writes/waits are the driver's stream memory operations cuStreamWriteValue32 /
cuStreamWaitValue32 (CU_STREAM_WAIT_VALUE_GEQ is a cyclic >=), called through ctypes on
libcuda.so.1; if the driver refuses them, tiny Triton kernels do the same (release store /
acquire spin), see `sync=`. Every op records an event on its side stream; `work.wait()` makes the
caller's current stream wait on it.

Flag mechanism checks: at construction a write/wait/write probe on local memory picks the
mechanism (cached per process and device); at each `reserve` every rank repeats the probe on its
own probe words in every peer's IPC-mapped buffer. If the driver refuses the stream memory ops
there (an error at enqueue) and sync="auto", this rank switches to the Triton kernels: both
mechanisms act on the same u32 words (release store / acquire load), so ranks may differ.

Hardware queues: a stream parked on cuStreamWaitValue32 blocks its hardware work queue, and
streams beyond CUDA_DEVICE_MAX_CONNECTIONS (default 8) share queues, so an unrelated stream of
this process (another transport's send, the compute stream) can be held behind a flag wait (the
driver documents that memop-only orderings can deadlock the scheduler this way). Set
CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA starts when several transports are in use at once
(scripts/gpu_check.sh does); every transport uses 2 streams (send, recv).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import os
import tempfile
import time
import uuid
import weakref
import zlib
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["CudaIpcTransport", "IpcWork"]

_ALIGN = 512  # bytes; every inbox slot starts on a 512-byte boundary
_MASK32 = 0xFFFFFFFF
_NBYTES_BITS = 48  # the header keeps the byte count in 48 bits and a dtype code above
_SYNC_KINDS = ("auto", "memops", "triton")
_CHECK_KINDS = ("device", "host", "none")

_KNOWN_DTYPES = [
    getattr(torch, n)
    for n in (
        "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32",
        "int16", "int8", "uint8", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn",
        "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    )
    if hasattr(torch, n)
]


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _i32(v: int) -> int:
    """v mod 2^32 as a signed 32-bit value (what an int32 tensor or a Triton i32 holds)."""
    v &= _MASK32
    return v - (1 << 32) if v >= (1 << 31) else v


def _seq_reached(current: int, target: int) -> bool:
    """Cyclic u32 `current >= target`: CU_STREAM_WAIT_VALUE_GEQ, i.e. (int32)(cur - target) >= 0."""
    return ((current - target) & _MASK32) < (1 << 31)


def _dtype_code(dtype: torch.dtype) -> int:
    return zlib.crc32(str(dtype).encode()) & 0x7FFF  # same in every process; 15 bits


def _header(nbytes: int, dtype: torch.dtype) -> int:
    return nbytes | (_dtype_code(dtype) << _NBYTES_BITS)


def _describe_header(h: int) -> str:
    if h == 0:
        return "nothing written"
    nbytes, code = h & ((1 << _NBYTES_BITS) - 1), h >> _NBYTES_BITS
    names = [str(d).replace("torch.", "") for d in _KNOWN_DTYPES if _dtype_code(d) == code]
    return f"{nbytes} bytes of {'/'.join(names) or f'dtype code {code}'}"


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (t is contiguous), outside autograd."""
    return t.detach().reshape(-1).view(torch.uint8)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Byte offsets inside one rank's shared buffer: W ranks, S slots, `capacity` bytes a slot."""

    world: int
    slots: int
    capacity: int

    def _i(self, rank: int, slot: int) -> int:
        return rank * self.slots + slot

    def ready(self, src: int, slot: int) -> int:  # u32, written by src
        return 4 * self._i(src, slot)

    def ack(self, dst: int, slot: int) -> int:  # u32, written by dst
        return 4 * (self.world * self.slots + self._i(dst, slot))

    def hdr(self, src: int, slot: int) -> int:  # i64, written by src
        return 8 * (self.world * self.slots + self._i(src, slot))

    def probe(self, src: int) -> int:  # 2 x u32, written (and waited on) by src only
        return 16 * self.world * self.slots + 8 * src

    @property
    def flags_bytes(self) -> int:
        return _round_up(16 * self.world * self.slots + 8 * self.world, _ALIGN)

    def data(self, src: int, slot: int) -> int:
        return self.flags_bytes + self._i(src, slot) * self.capacity

    @property
    def total(self) -> int:
        return self.flags_bytes + self.world * self.slots * self.capacity


# --------------------------------------------------------------------------------------------
# Device-side flags: CUDA driver stream memory operations through ctypes (loaded lazily).

_CU_STREAM_WAIT_VALUE_GEQ = 0x0  # (int32_t)(*addr - value) >= 0, cyclic
_CU_STREAM_WRITE_VALUE_DEFAULT = 0x0  # memory barrier before the write
_CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 = 92  # only meaningful for the v1 entry points

_DRIVER = None


class _CudaDriver:
    """The CUDA driver entry points the transport needs (signatures from cuda.h, CUDA 12/13)."""

    def __init__(self):
        try:
            self._lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeError(
                "CudaIpcTransport: cannot load libcuda.so.1 (the NVIDIA driver library); "
                "it needs a machine with an NVIDIA GPU and driver"
            ) from e
        c_int, c_uint, c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
        P = ctypes.POINTER
        self.cuGetErrorString = self._fn(("cuGetErrorString",), [c_int, P(ctypes.c_char_p)])
        self.cuGetErrorName = self._fn(("cuGetErrorName",), [c_int, P(ctypes.c_char_p)])
        self.cuInit = self._fn(("cuInit",), [c_uint])
        self.cuDriverGetVersion = self._fn(("cuDriverGetVersion",), [P(c_int)])
        self.cuDeviceGet = self._fn(("cuDeviceGet",), [P(c_int), c_int])  # CUdevice is an int
        self.cuDeviceGetAttribute = self._fn(("cuDeviceGetAttribute",), [P(c_int), c_int, c_int])
        self.cuDevicePrimaryCtxRetain = self._fn(("cuDevicePrimaryCtxRetain",), [P(c_void_p), c_int])
        self.cuCtxGetCurrent = self._fn(("cuCtxGetCurrent",), [P(c_void_p)])
        self.cuCtxPushCurrent = self._fn(("cuCtxPushCurrent_v2", "cuCtxPushCurrent"), [c_void_p])
        self.cuCtxPopCurrent = self._fn(("cuCtxPopCurrent_v2", "cuCtxPopCurrent"), [P(c_void_p)])
        self.cuCtxGetStreamPriorityRange = self._fn(("cuCtxGetStreamPriorityRange",), [P(c_int), P(c_int)])
        self.cuStreamCreateWithPriority = self._fn(("cuStreamCreateWithPriority",), [P(c_void_p), c_uint, c_int])
        # CUresult cuStreamWaitValue32(CUstream, CUdeviceptr, cuuint32_t, unsigned int); cuda.h
        # (12.x) maps the name to the _v2 symbol, which needs no driver module parameter. The plain
        # symbol is the v1 API (gated by attribute 92); it is only a fallback for old drivers.
        memop = [c_void_p, ctypes.c_uint64, ctypes.c_uint32, c_uint]
        self.cuStreamWaitValue32, self.wait_symbol = self._fn(
            ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"), memop, with_name=True
        )
        self.cuStreamWriteValue32, self.write_symbol = self._fn(
            ("cuStreamWriteValue32_v2", "cuStreamWriteValue32"), memop, with_name=True
        )
        self.check(self.cuInit(0), "cuInit")
        v = ctypes.c_int()
        self.check(self.cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
        self.version = v.value

    def _fn(self, names, argtypes, with_name=False):
        for name in names:
            f = getattr(self._lib, name, None)
            if f is not None:
                f.restype, f.argtypes = ctypes.c_int, argtypes
                return (f, name) if with_name else f
        raise RuntimeError(f"CudaIpcTransport: libcuda.so.1 exports none of {names} (driver too old?)")

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            name, desc = ctypes.c_char_p(), ctypes.c_char_p()
            self.cuGetErrorName(rc, ctypes.byref(name))
            self.cuGetErrorString(rc, ctypes.byref(desc))
            n = name.value.decode() if name.value else "?"
            d = desc.value.decode() if desc.value else "?"
            raise RuntimeError(f"CudaIpcTransport: {what} failed with CUDA driver error {rc} ({n}: {d})")


def _driver() -> _CudaDriver:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = _CudaDriver()
    return _DRIVER


_PRIMARY_CTX: dict[int, int] = {}


def _primary_ctx(device: torch.device) -> int:
    """torch's context for `device` (the primary one), retained once per process."""
    if device.index not in _PRIMARY_CTX:
        drv = _driver()
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        drv.check(drv.cuDeviceGet(ctypes.byref(dev), device.index), "cuDeviceGet")
        drv.check(drv.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        _PRIMARY_CTX[device.index] = ctx.value
    return _PRIMARY_CTX[device.index]


@contextlib.contextmanager
def _ctx_current(ctx: int):
    """Driver calls act on the current context: push torch's when this thread has another/none."""
    drv = _driver()
    cur = ctypes.c_void_p()
    drv.check(drv.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
    pushed = cur.value != ctx
    if pushed:
        drv.check(drv.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        yield
    finally:
        if pushed:
            popped = ctypes.c_void_p()
            drv.cuCtxPopCurrent(ctypes.byref(popped))


def _private_stream(device: torch.device, high_priority: bool):
    """A non-blocking stream of our own (not from torch's pool of 32, which hands the same
    stream out again: other code sharing a stream that is parked on a flag wait would stall)."""
    try:
        drv = _driver()
        with _ctx_current(_primary_ctx(device)):
            least, greatest = ctypes.c_int(), ctypes.c_int()
            drv.check(drv.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest)), "cuCtxGetStreamPriorityRange")
            handle = ctypes.c_void_p()
            priority = greatest.value if high_priority else least.value
            drv.check(drv.cuStreamCreateWithPriority(ctypes.byref(handle), 1, priority), "cuStreamCreateWithPriority")  # 1 = CU_STREAM_NON_BLOCKING
    except (RuntimeError, OSError):  # no usable driver entry points: a pool stream is second best
        return torch.cuda.Stream(device=device, priority=-1 if high_priority else 0)
    # Never destroyed: events, the caching allocator's record_stream entries and peers' pending
    # waits may refer to it; a transport costs a few streams per process.
    return torch.cuda.ExternalStream(handle.value, device=device)


class _MemopsSync:
    """Flag write / wait enqueued on a stream with cuStreamWriteValue32 / cuStreamWaitValue32."""

    kind = "memops"

    def __init__(self, device: torch.device):
        drv = _driver()
        self._drv = drv
        self._ctx = _primary_ctx(device)
        dev = ctypes.c_int()
        drv.check(drv.cuDeviceGet(ctypes.byref(dev), device.index), "cuDeviceGet")
        # Attribute 92 gates only the v1 entry points; recorded for diagnostics, the probe
        # (_probe_sync) decides whether the ops really work.
        attr = ctypes.c_int(-1)
        drv.cuDeviceGetAttribute(ctypes.byref(attr), _CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1, dev)
        self.detail = f"{drv.wait_symbol}/{drv.write_symbol}, driver {drv.version}, attr92={attr.value}"

    def _call(self, fn, what, stream, tensor, offset, value):
        # torch runs on the device's primary context; driver calls need it current on this thread
        # (an autograd or user thread may have none): pushed per call only when it is not.
        drv = self._drv
        cur = ctypes.c_void_p()
        drv.check(drv.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
        pushed = cur.value != self._ctx
        if pushed:
            drv.check(drv.cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")
        try:
            rc = fn(
                ctypes.c_void_p(stream.cuda_stream),
                ctypes.c_uint64(tensor.data_ptr() + offset),
                ctypes.c_uint32(value & _MASK32),
                0,  # GEQ for the wait; DEFAULT (barrier before the write) for the write
            )
        finally:
            if pushed:
                popped = ctypes.c_void_p()
                drv.cuCtxPopCurrent(ctypes.byref(popped))
        drv.check(rc, what)

    def write(self, stream, tensor: torch.Tensor, offset: int, value: int) -> None:
        self._call(self._drv.cuStreamWriteValue32, "cuStreamWriteValue32", stream, tensor, offset, value)

    def wait_geq(self, stream, tensor: torch.Tensor, offset: int, value: int) -> None:
        self._call(self._drv.cuStreamWaitValue32, "cuStreamWaitValue32", stream, tensor, offset, value)


# Triton fallback: the two kernels are plain functions here (so importing this module never
# imports Triton) and are jitted on first use; `tl` is bound at that moment.
tl = None
_TRITON_KERNELS = None


def _flag_write_kernel(flag_ptr, value):
    # Release at system scope: the data copy before this kernel (stream order) is visible to the
    # other process before the flag is.
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


def _flag_wait_geq_kernel(flag_ptr, value):
    # Spin until (int32)(*flag - value) >= 0, the same cyclic >= as CU_STREAM_WAIT_VALUE_GEQ.
    cur = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    while (cur - value) < 0:
        cur = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")


def _triton_kernels():
    global tl, _TRITON_KERNELS
    if _TRITON_KERNELS is None:
        import triton
        import triton.language

        tl = triton.language
        _TRITON_KERNELS = (triton.jit(_flag_write_kernel), triton.jit(_flag_wait_geq_kernel))
    return _TRITON_KERNELS


class _TritonSync:
    """Fallback flags: one-warp Triton kernels (a spinning kernel holds an SM while it waits)."""

    kind = "triton"

    def __init__(self, device: torch.device):
        self._write, self._wait = _triton_kernels()
        self.detail = "triton spin kernels"

    def write(self, stream, tensor, offset, value):
        with torch.cuda.stream(stream):
            self._write[(1,)](tensor[offset : offset + 4].view(torch.int32), _i32(value), num_warps=1)

    def wait_geq(self, stream, tensor, offset, value):
        with torch.cuda.stream(stream):
            self._wait[(1,)](tensor[offset : offset + 4].view(torch.int32), _i32(value), num_warps=1)


def _poll_events(events, timeout_s: float, on_timeout) -> None:
    deadline = time.monotonic() + timeout_s
    pause = 20e-6
    while not all(e.query() for e in events):
        if time.monotonic() > deadline:
            on_timeout()
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


class _DriverRefused(RuntimeError):
    """The flag mechanism failed when an op was enqueued (a driver/launch error), not by hanging."""


# Probe tensors and streams of failed probes: a stream stuck on a probe wait may still execute
# its later write, so neither may be freed (and the memory reused) afterwards.
_STUCK_PROBES: list = []
_PROBE_STREAMS: dict = {}  # device index -> the stream every probe there runs on (until one fails)


def _probe_stream(device: torch.device):
    if device.index not in _PROBE_STREAMS:
        _PROBE_STREAMS[device.index] = _private_stream(device, high_priority=False)
    return _PROBE_STREAMS[device.index]


def _probe_sync(sync, device: torch.device, timeout_s: float, words=None) -> None:
    """Enqueue write / wait / write on a scratch stream and check the values landed.

    words: (uint8 tensor, byte offset) pairs of 8 bytes each (default: a fresh local tensor);
    the probe writes 0xFFFFFFF0 (unsigned round trip), waits for it, then writes 7 after it.
    """
    if words is None:
        words = [(torch.zeros(8, dtype=torch.uint8, device=device), 0)]
    torch.cuda.current_stream(device).synchronize()
    stream = _probe_stream(device)  # a stream of its own: if the probe hangs, only it is stuck
    big = 0xFFFFFFF0

    def retire():  # never reuse or free what a stuck probe may still touch
        _STUCK_PROBES.append((words, stream))
        _PROBE_STREAMS.pop(device.index, None)

    try:
        for t, off in words:
            sync.write(stream, t, off, big)
            sync.wait_geq(stream, t, off, big)
            sync.write(stream, t, off + 4, 7)
    except Exception as e:  # noqa: BLE001 - re-raised with its kind
        retire()
        raise _DriverRefused(f"{sync.kind}: enqueueing the probe failed: {type(e).__name__}: {e}") from e
    ev = torch.cuda.Event()
    ev.record(stream)

    def fail():
        retire()
        raise RuntimeError(f"{sync.kind}: a write followed by a wait on it did not complete in {timeout_s:.0f} s")

    _poll_events([ev], timeout_s, fail)
    for t, off in words:
        got = t[off : off + 8].view(torch.int32).cpu().tolist()
        if got != [_i32(big), 7]:
            raise RuntimeError(f"{sync.kind}: probe flags read back {got}, expected {[_i32(big), 7]}")


_SYNC_CACHE: dict = {}


def _get_sync(kind: str, device: torch.device, timeout_s: float):
    """The flag mechanism `kind` ("memops"/"triton"), probed once per process and device."""
    key = (kind, device.index)
    if key not in _SYNC_CACHE:
        sync = _MemopsSync(device) if kind == "memops" else _TritonSync(device)
        _probe_sync(sync, device, timeout_s)
        _SYNC_CACHE[key] = sync
    return _SYNC_CACHE[key]


def _select_sync(kind: str, device: torch.device, timeout_s: float):
    errors = []
    for k in ("memops", "triton") if kind == "auto" else (kind,):
        try:
            return _get_sync(k, device, timeout_s)
        except Exception as e:  # noqa: BLE001 - collected into one message below
            errors.append(f"{k}: {type(e).__name__}: {e}")
    raise RuntimeError(f"CudaIpcTransport: no device-side flag mechanism works on {device}: " + " | ".join(errors))


# --------------------------------------------------------------------------------------------
# Backends: where buffers live and how streams/events behave.


class _CudaBackend:
    sim = False

    def __init__(self, device: torch.device, sync_kind: str, timeout_s: float):
        self.device = device
        self.sync_kind = sync_kind
        self.probe_timeout_s = min(timeout_s, 30.0)
        with torch.cuda.device(device):
            self.sync = _select_sync(sync_kind, device, self.probe_timeout_s)
            # Load the kernels a recv queues behind its flag wait (the header compare and
            # _assert_async) now: with lazy module loading (CUDA's default) a first launch may need a
            # context synchronisation, which would wait on a parked recv whose sender waits on us.
            torch._assert_async(torch.zeros(1, dtype=torch.int64, device=device) == 0)
            torch.cuda.synchronize(device)
        props = torch.cuda.get_device_properties(device)
        self.device_id = str(getattr(props, "uuid", "")) or f"{props.name}:{getattr(props, 'pci_bus_id', device.index)}"

    def new_stream(self, high_priority: bool = True):
        # High priority: a copy that unblocks a peer should not queue behind long compute kernels.
        # Non-blocking: a stream parked on a flag never stalls the legacy default stream.
        return _private_stream(self.device, high_priority)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def stream(self, s):
        return torch.cuda.stream(s)

    def record(self, s):
        ev = torch.cuda.Event()
        ev.record(s)
        return ev

    @staticmethod
    def wait_stream(s, other):
        s.wait_stream(other)

    @staticmethod
    def wait_event(s, ev):
        s.wait_event(ev)

    @staticmethod
    def record_stream(t, s):
        t.record_stream(s)  # the caching allocator must not reuse t's memory before s read/wrote it

    def assert_equal_async(self, s, value_i64: torch.Tensor, expected: int) -> None:
        with torch.cuda.stream(s):
            torch._assert_async(value_i64 == expected)

    def read_bytes(self, src: torch.Tensor, stream, timeout_s: float):
        """Copy src to host on `stream` without blocking behind anything else; None on timeout."""
        host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(src, non_blocking=True)
        ev = self.record(stream)
        deadline = time.monotonic() + timeout_s
        while not ev.query():
            if time.monotonic() > deadline:
                return None
            time.sleep(1e-3)
        return host

    def share(self, total: int, zero_bytes: int, group, rank: int, world: int):
        from torch.multiprocessing.reductions import reduce_tensor

        with torch.cuda.device(self.device):
            buf = torch.empty(total, dtype=torch.uint8, device=self.device)
            buf[:zero_bytes].zero_()
            torch.cuda.current_stream(self.device).synchronize()  # flags are 0 before anyone writes
            rebuild, args = reduce_tensor(buf)
            everyone = [None] * world
            dist.all_gather_object(everyone, (self.device_id, rebuild, args), group=group)
            peers = []
            for j, (device_id, fn, a) in enumerate(everyone):
                if device_id != self.device_id:
                    raise ValueError(
                        f"CudaIpcTransport: rank {j} of the group is on GPU {device_id}, this rank on "
                        f"{self.device_id}; the transport is for ranks sharing one GPU (use NCCL across GPUs)"
                    )
                if j == rank:
                    peers.append(buf)  # a process cannot open its own IPC handle
                    continue
                t = fn(*a)  # cudaIpcOpenMemHandle; keep `t` alive as long as the mapping is used
                if t.device != self.device or t.numel() != total or t.dtype != torch.uint8:
                    raise RuntimeError(
                        f"CudaIpcTransport: rank {j}'s buffer opened as {t.dtype}[{t.numel()}] on "
                        f"{t.device}, expected uint8[{total}] on {self.device}"
                    )
                peers.append(t)
            torch.cuda.current_stream(self.device).synchronize()  # the rebuilds' event waits
        return buf, peers

    def probe_mapped(self, peers, rank: int, layout: "_Layout") -> str | None:
        """Repeat the flag probe on this rank's probe words in every peer's IPC-mapped buffer.

        Returns a note when this rank switched from memops to Triton (sync="auto" and the
        driver refused the memory ops on mapped memory at enqueue); raises otherwise on failure.
        """
        words = [(t, layout.probe(rank)) for j, t in enumerate(peers) if j != rank]
        if not words:
            return None
        with torch.cuda.device(self.device):
            try:
                _probe_sync(self.sync, self.device, self.probe_timeout_s, words)
                return None
            except _DriverRefused as e:
                if self.sync_kind != "auto" or self.sync.kind != "memops":
                    raise RuntimeError(f"CudaIpcTransport: flag ops on the peers' IPC-mapped buffers fail: {e}") from e
                first = str(e)
            self.sync = _get_sync("triton", self.device, self.probe_timeout_s)
            _probe_sync(self.sync, self.device, self.probe_timeout_s, words)
        return f"memops refused on IPC-mapped memory ({first}); using triton"

    def release(self):
        torch.cuda.ipc_collect()


class _SimStream:
    cuda_stream = 0


class _SimEvent:
    @staticmethod
    def query():
        return True


class _HostSimSync:
    """CPU stand-in for the flag operations: blocking host writes and spins on shared memory."""

    kind = "host-sim"
    detail = "host spin on shared memory (tests only)"

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def write(self, stream, tensor, offset, value):
        tensor[offset : offset + 4].view(torch.int32).fill_(_i32(value))

    def wait_geq(self, stream, tensor, offset, value):
        flag = tensor[offset : offset + 4].view(torch.int32)
        deadline = time.monotonic() + self.timeout_s
        spins = 0
        while not _seq_reached(int(flag.item()), value):
            spins += 1
            if spins > 64:
                time.sleep(2e-4)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"host-sim: flag at byte {offset} stayed {int(flag.item()) & _MASK32}, waited for "
                    f">= {value & _MASK32} for {self.timeout_s:.0f} s"
                )


class _HostSimBackend:
    """Runs the transport's protocol on CPU tensors in shared memory, one op at a time.

    For tests of the protocol logic (offsets, sequence numbers, acks, headers, errors) on
    machines without a GPU: ops execute synchronously at post time (sends first), so a pattern
    in which a rank must receive before it can send blocks here although it would not on a GPU.
    """

    sim = True

    def __init__(self, timeout_s: float):
        self.device = torch.device("cpu")
        self.sync = _HostSimSync(timeout_s)
        self.device_id = "host"

    def new_stream(self, high_priority: bool = True):
        return _SimStream()

    def current_stream(self):
        return _SimStream()

    def stream(self, s):
        return contextlib.nullcontext()

    def record(self, s):
        return _SimEvent()

    @staticmethod
    def wait_stream(s, other):
        pass

    @staticmethod
    def wait_event(s, ev):
        pass

    @staticmethod
    def record_stream(t, s):
        pass

    def assert_equal_async(self, s, value_i64, expected):
        raise AssertionError("unreachable: the host simulation always checks headers on the host")

    def read_bytes(self, src, stream, timeout_s):
        return src.clone()

    def share(self, total, zero_bytes, group, rank, world):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(folder, f"ringattn_ipc_{os.getpid()}_{uuid.uuid4().hex}")
        with open(path, "wb") as f:
            f.truncate(total)  # zero-filled
        buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        paths = [None] * world
        dist.all_gather_object(paths, path, group=group)
        peers = [buf if j == rank else torch.from_file(p, shared=True, size=total, dtype=torch.uint8) for j, p in enumerate(paths)]
        dist.barrier(group=group)  # everyone mapped every file: the names can go
        os.unlink(path)
        return buf, peers

    def probe_mapped(self, peers, rank, layout):
        return None

    def release(self):
        pass


# --------------------------------------------------------------------------------------------


class IpcWork:
    """Handle of one posted send or recv; `wait()` orders the caller's current stream after it."""

    __slots__ = ("_backend", "_event", "kind", "peer", "seq", "nbytes", "_waited", "__weakref__")

    def __init__(self, backend, event, kind: str, peer: int, seq: int, nbytes: int):
        self._backend, self._event = backend, event
        self.kind, self.peer, self.seq, self.nbytes = kind, peer, seq, nbytes
        self._waited = False

    def wait(self, timeout=None) -> bool:
        """Make the current stream wait (device-side) for this op; the host does not block.

        `timeout` is accepted for signature compatibility with torch's Work and ignored: use
        `CudaIpcTransport.synchronize(timeout_s)` for a host-side wait with a deadline.
        """
        b = self._backend
        b.wait_event(b.current_stream(), self._event)
        self._waited = True
        return True

    def is_completed(self) -> bool:
        return bool(self._event.query())

    def __repr__(self) -> str:
        d = "to" if self.kind == "send" else "from"
        return f"IpcWork({self.kind} #{self.seq} {d} rank {self.peer}, {self.nbytes} bytes)"


@dataclasses.dataclass
class _Op:
    index: int
    is_send: bool
    tensor: torch.Tensor
    peer: int  # group rank
    global_peer: int
    nbytes: int


def _env_choice(value, env: str, default: str, allowed: Sequence[str], what: str) -> str:
    v = value if value is not None else os.environ.get(env, default)
    if v not in allowed:
        raise ValueError(f"CudaIpcTransport: {what}={v!r} (from {'argument' if value is not None else env}); expected one of {allowed}")
    return v


class CudaIpcTransport:
    """NCCL-like P2P between processes sharing one GPU, over CUDA IPC; control over `group` (gloo).

    Args:
        group: process group for setup and `reserve` (all_gather_object, all_reduce, barrier on
            CPU tensors, so gloo); None = the default group. Peers in P2POps are global ranks.
        device: this rank's CUDA device (default: the current one). All ranks of the group must
            be on the same physical GPU.
        slots: inbox slots per ordered pair (>= 1): how many messages a sender may have in
            flight to one receiver before it waits (device-side) for the receiver to drain one.
        nbytes: if given, `reserve(nbytes)` right away (collective).
        sync: "memops" (cuStreamWaitValue32/WriteValue32), "triton" (spin kernels), or "auto"
            (memops, else triton; probed once per process, and again on the peers' mapped
            buffers at each reserve, where "auto" may switch a rank to triton); default env
            RINGATTN_IPC_SYNC or "auto".
        check: how a recv checks the sender's size+dtype header: "device" (async device assert:
            a mismatch kills the CUDA context - under MPS possibly every client's - but data is
            never silently wrong; rerun with "host" to see which message), "host" (the host
            waits for the message and raises a ValueError naming both sides: for debugging, it
            serialises), "none"; default env RINGATTN_IPC_CHECK or "device".
        timeout_s: deadline of every host-side wait (synchronize, reserve, close, check="host").

    Construction is local (no collective) unless `nbytes` is given; `reserve` and `close` are
    collectives. Counters: `bytes_sent[peer]`, `bytes_received[peer]` (global ranks), `stats()`.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | int | None = None,
        slots: int = 2,
        nbytes: int | None = None,
        *,
        sync: str | None = None,
        check: str | None = None,
        timeout_s: float = 300.0,
        _backend: str = "cuda",
    ):
        if _backend not in ("cuda", "host-sim"):
            raise ValueError(f"CudaIpcTransport: unknown backend {_backend!r}")
        if _backend == "cuda":
            if device is not None:
                device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
                if device.type != "cuda":
                    raise ValueError(
                        f"CudaIpcTransport moves CUDA tensors between processes that share a GPU; got "
                        f"device={device}. For CPU tensors use torch.distributed (gloo) directly."
                    )
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "CudaIpcTransport needs CUDA: torch.cuda.is_available() is False on this machine "
                    "(use torch.distributed with gloo for CPU tensors)"
                )
            if device is None or device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"CudaIpcTransport: slots must be an int >= 1, got {slots!r}")
        if not dist.is_initialized():
            raise RuntimeError("CudaIpcTransport: torch.distributed is not initialized (init_process_group first)")
        self.group = group if group is not None else dist.group.WORLD
        backend_name = str(dist.get_backend(self.group))
        if backend_name == "nccl":
            raise ValueError(
                "CudaIpcTransport: the control group must handle CPU tensors (gloo); got an NCCL-only "
                "group. Pass e.g. dist.new_group(backend='gloo')."
            )
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._global_ranks = list(dist.get_process_group_ranks(self.group))
        self._group_rank_of = {g: i for i, g in enumerate(self._global_ranks)}
        self.slots = slots
        self.timeout_s = float(timeout_s)
        self.check = _env_choice(check, "RINGATTN_IPC_CHECK", "device", _CHECK_KINDS, "check")
        if _backend == "cuda":
            torch.cuda.init()
            sync_kind = _env_choice(sync, "RINGATTN_IPC_SYNC", "auto", _SYNC_KINDS, "sync")
            self._backend = _CudaBackend(device, sync_kind, self.timeout_s)
            with torch.cuda.device(device):
                self._send_stream = self._backend.new_stream()
                self._recv_stream = self._backend.new_stream()
            self._debug_stream = None  # made on first use (debug_state): fewer streams in use
        else:
            self._backend = _HostSimBackend(self.timeout_s)
            self._send_stream = self._recv_stream = self._debug_stream = _SimStream()
            if self.check == "device":
                self.check = "host"
        self.device = self._backend.device
        self.sync = self._backend.sync.kind
        self.sync_detail = self._backend.sync.detail
        self._layout: _Layout | None = None
        self._buf: torch.Tensor | None = None
        self._peer_bufs: list[torch.Tensor] | None = None
        self.reset_counters()
        self._reset_protocol()
        if nbytes is not None:
            self.reserve(nbytes)

    # ---- setup ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Bytes one message may carry (0 before the first `reserve`)."""
        return 0 if self._layout is None else self._layout.capacity

    def reserve(self, nbytes_per_message: int) -> int:
        """Collective: make every inbox hold messages of max-over-ranks(nbytes) bytes.

        Every rank of the group calls it (values may differ; the max wins). When the current
        capacity suffices it only costs the all_reduce. Otherwise it waits until all posted ops
        completed (every send must have its recv posted), frees the old buffers and shares new
        ones; sequence numbers restart. Returns the capacity in bytes.
        """
        n = int(nbytes_per_message)
        if n < 0:
            raise ValueError(f"CudaIpcTransport.reserve: nbytes must be >= 0, got {n}")
        want = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(want, op=dist.ReduceOp.MAX, group=self.group)
        need = int(want.item())
        if self._buf is not None and need <= self.capacity:
            return self.capacity
        capacity = _round_up(max(need, 1), _ALIGN)
        if capacity >= 1 << _NBYTES_BITS:
            raise ValueError(f"CudaIpcTransport.reserve: {need} bytes per message is beyond the 48-bit header")
        self._release()
        layout = _Layout(self.world_size, self.slots, capacity)
        self._buf, self._peer_bufs = self._backend.share(
            layout.total, layout.flags_bytes, self.group, self.rank, self.world_size
        )
        self._layout = layout
        self._reset_protocol()
        note = self._backend.probe_mapped(self._peer_bufs, self.rank, layout)
        if note is not None:  # this rank's flag ops now run as Triton kernels (peers may differ)
            self.sync = self._backend.sync.kind
            self.sync_detail = f"{self._backend.sync.detail}; {note}"
        return capacity

    def close(self) -> None:
        """Collective: wait for all posted ops, then unmap the peers' buffers and free this one."""
        self._release()
        self._layout = None

    def _release(self) -> None:
        if self._buf is None:
            return
        self.synchronize()
        dist.barrier(group=self.group)  # every rank's ops done: nobody writes into old buffers
        self._peer_bufs = None  # closes the IPC mappings of the peers' buffers
        dist.barrier(group=self.group)  # every rank dropped its mapping of this rank's buffer
        self._buf = None
        self._backend.release()

    def _reset_protocol(self) -> None:
        w = self.world_size
        self._send_seq = [0] * w  # messages posted this rank -> j
        self._recv_seq = [0] * w  # messages posted j -> this rank
        self._unwaited_sends: list[list[weakref.ref]] = [[] for _ in range(w)]

    def reset_counters(self) -> None:
        self.bytes_sent = {g: 0 for g in self._global_ranks}
        self.bytes_received = {g: 0 for g in self._global_ranks}
        self.messages_sent = {g: 0 for g in self._global_ranks}
        self.messages_received = {g: 0 for g in self._global_ranks}

    def stats(self) -> dict[str, Any]:
        return {
            "bytes_sent": dict(self.bytes_sent),
            "bytes_received": dict(self.bytes_received),
            "messages_sent": dict(self.messages_sent),
            "messages_received": dict(self.messages_received),
            "capacity": self.capacity,
            "slots": self.slots,
            "sync": self.sync,
            "sync_detail": self.sync_detail,
        }

    # ---- posting ---------------------------------------------------------------------------

    def batch_isend_irecv(self, p2p_ops: Sequence[Any]) -> list[IpcWork]:
        """Post sends and recvs (`dist.P2POp`s with isend/irecv, global peer ranks).

        Returns one `IpcWork` per op, in the order given. Every op is validated before any is
        posted, so a ValueError leaves the transport untouched.
        """
        if self._buf is None:
            raise RuntimeError(
                "CudaIpcTransport: no buffers yet; call transport.reserve(max_message_bytes) on every "
                "rank of the group (collective) before batch_isend_irecv"
            )
        if not self._backend.sim and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("CudaIpcTransport cannot be captured in a CUDA graph (host-side sequence numbers)")
        ops = [self._parse_op(i, op) for i, op in enumerate(p2p_ops)]
        new_sends = collections.Counter(o.peer for o in ops if o.is_send)
        for j, n in new_sends.items():
            live = [r for r in self._unwaited_sends[j] if (w := r()) is not None and not w._waited]
            self._unwaited_sends[j] = live
            if len(live) + n > self.slots:
                raise RuntimeError(
                    f"CudaIpcTransport rank {self.rank}: {len(live) + n} sends to rank "
                    f"{self._global_ranks[j]} would be outstanding (posted, not yet wait()ed), but there "
                    f"are only slots={self.slots} inbox slots per pair; wait() the earlier sends first, "
                    f"or construct the transport with slots >= {len(live) + n}"
                )
        works: list[IpcWork | None] = [None] * len(ops)
        b = self._backend
        caller = b.current_stream()
        sends = [o for o in ops if o.is_send]
        recvs = [o for o in ops if not o.is_send]
        try:
            if sends:
                b.wait_stream(self._send_stream, caller)  # the caller's writes of the data are done
                for o in sends:
                    works[o.index] = self._post_send(o)
            if recvs:
                b.wait_stream(self._recv_stream, caller)  # the caller no longer reads the buffers
                for o in recvs:
                    works[o.index] = self._post_recv(o)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.debug_state()}") from None
        return works  # type: ignore[return-value]

    def _parse_op(self, i: int, op: Any) -> _Op:
        fn = getattr(op, "op", None)
        name = getattr(fn, "__name__", "")
        if fn is dist.isend or fn is dist.send or name in ("isend", "send"):
            is_send = True
        elif fn is dist.irecv or fn is dist.recv or name in ("irecv", "recv"):
            is_send = False
        else:
            raise ValueError(f"CudaIpcTransport: op {i}: P2POp.op must be torch.distributed.isend or irecv, got {fn!r}")
        peer = getattr(op, "peer", None)
        what = f"op {i} ({'send to' if is_send else 'recv from'} rank {peer})"
        t = getattr(op, "tensor", None)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"CudaIpcTransport: {what}: tensor must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(
                f"CudaIpcTransport: {what}: tensor is on {t.device}, but this transport moves tensors on "
                f"{self.device} (CUDA IPC: CUDA tensors on the transport's device only)"
            )
        if not t.is_contiguous():
            raise ValueError(
                f"CudaIpcTransport: {what}: tensor {tuple(t.shape)} with strides {t.stride()} is not "
                "contiguous; send t.contiguous() / receive into a contiguous buffer"
            )
        group_peer = self._group_rank_of.get(peer) if isinstance(peer, int) else None
        if group_peer is None:
            raise ValueError(
                f"CudaIpcTransport: {what}: peer {peer!r} is not a rank of this transport's group "
                f"(global ranks {self._global_ranks})"
            )
        nbytes = t.numel() * t.element_size()
        if nbytes > self.capacity:
            raise ValueError(
                f"CudaIpcTransport: {what}: message of {nbytes} bytes ({tuple(t.shape)} {t.dtype}) exceeds "
                f"the reserved capacity of {self.capacity} bytes; call transport.reserve({nbytes}) on every "
                "rank of the group (collective) first"
            )
        return _Op(i, is_send, t, group_peer, peer, nbytes)

    def _post_send(self, o: _Op) -> IpcWork:
        b, L, sync, st = self._backend, self._layout, self._backend.sync, self._send_stream
        j, me = o.peer, self.rank
        s = self._send_seq[j] + 1
        self._send_seq[j] = s
        slot = (s - 1) % self.slots
        if s > self.slots:  # the receiver must have drained message s - slots from this slot
            sync.wait_geq(st, self._buf, L.ack(j, slot), s - self.slots)
        dst = self._peer_bufs[j]
        if o.nbytes:
            with b.stream(st):
                start = L.data(me, slot)
                dst[start : start + o.nbytes].copy_(_bytes_view(o.tensor), non_blocking=True)
        h = _header(o.nbytes, o.tensor.dtype)
        sync.write(st, dst, L.hdr(me, slot), h & _MASK32)
        sync.write(st, dst, L.hdr(me, slot) + 4, h >> 32)
        sync.write(st, dst, L.ready(me, slot), s)  # barrier first: data and header are visible
        b.record_stream(o.tensor, st)
        work = IpcWork(b, b.record(st), "send", o.global_peer, s, o.nbytes)
        self._unwaited_sends[j].append(weakref.ref(work))
        self.bytes_sent[o.global_peer] += o.nbytes
        self.messages_sent[o.global_peer] += 1
        return work

    def _post_recv(self, o: _Op) -> IpcWork:
        b, L, sync, st = self._backend, self._layout, self._backend.sync, self._recv_stream
        j, me = o.peer, self.rank
        s = self._recv_seq[j] + 1
        self._recv_seq[j] = s
        slot = (s - 1) % self.slots
        sync.wait_geq(st, self._buf, L.ready(j, slot), s)
        expected = _header(o.nbytes, o.tensor.dtype)
        hdr = self._buf[L.hdr(j, slot) : L.hdr(j, slot) + 8]
        if self.check == "device":
            b.assert_equal_async(st, hdr.view(torch.int64), expected)
        elif self.check == "host":
            got = self._read_header_on_host(hdr, st, o, s)
            if got != expected:
                raise ValueError(
                    f"CudaIpcTransport rank {self.rank}: message #{s} from rank {o.global_peer} carries "
                    f"{_describe_header(got)}, but the matching recv (op {o.index}) expects "
                    f"{_describe_header(expected)} ({tuple(o.tensor.shape)}); the k-th send from a rank "
                    "pairs with the k-th recv from it. The transport is unusable after this error."
                )
        if o.nbytes:
            with b.stream(st):
                start = L.data(j, slot)
                _bytes_view(o.tensor).copy_(self._buf[start : start + o.nbytes], non_blocking=True)
        sync.write(st, self._peer_bufs[j], L.ack(me, slot), s)  # stream order: after the copy-out
        b.record_stream(o.tensor, st)
        work = IpcWork(b, b.record(st), "recv", o.global_peer, s, o.nbytes)
        self.bytes_received[o.global_peer] += o.nbytes
        self.messages_received[o.global_peer] += 1
        return work

    def _read_header_on_host(self, hdr: torch.Tensor, stream, o: _Op, s: int) -> int:
        host = self._backend.read_bytes(hdr, stream, self.timeout_s)  # queued behind the flag wait
        if host is None:
            raise TimeoutError(
                f"CudaIpcTransport rank {self.rank}: message #{s} from rank {o.global_peer} did not "
                f"arrive within {self.timeout_s:.0f} s (check='host')"
            )
        return int(host.view(torch.int64).item())

    # ---- host-side waits and diagnostics ------------------------------------------------------

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Block the host until every posted op and the current stream's work are done.

        Raises TimeoutError with `debug_state()` after `timeout_s` (default: the constructor's),
        instead of hanging when a send has no matching recv or a peer died.
        """
        if self._backend.sim:
            return
        t = self.timeout_s if timeout_s is None else timeout_s
        b = self._backend
        events = [b.record(self._send_stream), b.record(self._recv_stream), b.record(b.current_stream())]

        def fail():
            raise TimeoutError(
                f"CudaIpcTransport rank {self.rank}: posted ops not complete after {t:.0f} s (a send "
                f"without its matching recv, mismatched order, or a peer that stopped?)\n{self.debug_state()}"
            )

        _poll_events(events, t, fail)

    def debug_state(self) -> str:
        """What each side posted and what the flags in this rank's buffer say (racy snapshot)."""
        lines = [
            f"CudaIpcTransport rank {self.rank}/{self.world_size} (global {self._global_ranks[self.rank]}) "
            f"on {self.device}: sync={self.sync} ({self.sync_detail}) check={self.check} slots={self.slots} capacity={self.capacity}"
        ]
        if self._buf is None:
            return lines[0] + " (no buffers: reserve() not called)"
        L = self._layout
        if self._debug_stream is None:  # only reads flags; its own so it never queues behind a wait
            self._debug_stream = self._backend.new_stream(high_priority=False)
        host = self._backend.read_bytes(self._buf[: L.flags_bytes], self._debug_stream, 2.0)
        for j, g in enumerate(self._global_ranks):
            line = f"  rank {g}: posted sends->{self._send_seq[j]} recvs<-{self._recv_seq[j]}"
            if host is not None:
                u32 = host.view(torch.int32)
                i64 = host.view(torch.int64)
                ready = [int(u32[L.ready(j, k) // 4]) & _MASK32 for k in range(self.slots)]
                ack = [int(u32[L.ack(j, k) // 4]) & _MASK32 for k in range(self.slots)]
                hdrs = [_describe_header(int(i64[L.hdr(j, k) // 8])) for k in range(self.slots)]
                line += f"; ready[slot]={ready} (its messages here) ack[slot]={ack} (mine it drained) hdr={hdrs}"
            lines.append(line)
        if host is None:
            lines.append("  (flags unreadable within 2 s: the device looks stuck)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"CudaIpcTransport(rank={self.rank}, world_size={self.world_size}, device={self.device}, "
            f"slots={self.slots}, capacity={self.capacity}, sync={self.sync!r}, check={self.check!r})"
        )
