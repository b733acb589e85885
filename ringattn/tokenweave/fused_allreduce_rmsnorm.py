"""Fused AllReduce + residual + RMSNorm (TokenWeave) with a fallback ladder agreed by all ranks.

    y, residual = fused_allreduce_rmsnorm(x, residual, weight, eps=1e-6, group=None)
    # residual_new = all_reduce_sum(x over group) + residual ; y = rmsnorm(residual_new) * weight

Paths, best first; the group's path is chosen ONCE (when its handle is built, a collective) from
facts every rank gathers, so ranks never diverge:

    multimem      two-shot kernel on multimem.ld_reduce / multimem.st (needs multicast_ptr != 0:
                  Hopper behind an NVSwitch). Compiled and gated; untested on hardware here.
    symm          the same kernel over peer pointers from torch symmetric memory:
                  symm_twoshot (each rank reduces its token shard, adds the residual, normalises,
                  writes the rows to every peer) or symm_oneshot (few tokens: every rank reduces
                  all rows). All CUDA ranks on one host whose devices can share memory.
    rs_ag         NCCL reduce-scatter + local add_rmsnorm on the shard + all-gather.
    allreduce     NCCL/gloo all-reduce + add_rmsnorm.
    local         world size 1: add_rmsnorm.

Per call, the path can only step down, and only on values every rank shares (token count,
hidden size, dtype, residual layout): a hidden size or dtype the kernel does not take uses the
collective path. `AllReduceRMSNorm.path_for(...)` / `fused_allreduce_rmsnorm_path(...)` say which
path a call takes, and `describe()` why the group got its path.

Residual layout: TokenWeave keeps the residual sharded by token between layers (rank r holds rows
[shard_begin(r), shard_end(r)) with ceil(T / W) rows per rank). `shard_residual_in/out` select
full (T x H, replicated) or shard layouts for the input and the returned residual.

Environment (must be equal on all ranks; the handle checks it): RINGATTN_TW_PATH (force a path),
RINGATTN_TW_MAX_CTAS (kernel CTAs, default 8), RINGATTN_TW_ONE_SHOT_MAX_TOKENS (default 64),
RINGATTN_TW_TIMEOUT_S (kernel barrier timeout, default 600 like NCCL's watchdog, 0 = never), RINGATTN_TW_DEBUG=1
(log every call's path, synchronise and check the kernel status after every call, timeout 10 s),
RINGATTN_TW_VALIDATE=0 (skip the per-call shape check on the collective paths).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import tempfile
import warnings
import weakref
import zlib

import torch
import torch.distributed as dist

log = logging.getLogger("ringattn.tokenweave")

BASE_PATHS = ("multimem", "symm", "rs_ag", "allreduce", "local")
CALL_PATHS = ("multimem", "symm_twoshot", "symm_oneshot", "rs_ag", "allreduce", "local")

# Mirrors csrc/cuda/fused_allreduce_rmsnorm.cuh.
MAX_WORLD_SIZE = 8
MAX_BLOCKS = 32
MAX_HIDDEN = 16384
NUM_SLOTS = 2
_NUM_PHASES = 2
_MODE_ONE_SHOT, _MODE_MULTIMEM, _MODE_RES_IN_FULL, _MODE_RES_OUT_GATHER = 1, 2, 4, 8
_STATUS_WORDS = 8
_STATUS_NAMES = {1: "barrier timeout", 2: "call mismatch across ranks", 3: "multimem not compiled for this GPU"}
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ALIGN = 256  # region alignment in bytes (>= 16 for the vectorised kernel)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return default if v in (None, "") else float(v)


@dataclasses.dataclass(frozen=True)
class TokenWeaveConfig:
    """Knobs of the fused op. Every rank of a group must use the same values (checked)."""

    path: str | None = None  # force a base path (one of BASE_PATHS); None = best available
    max_ctas: int = 8  # CTAs (~SMs) of the fused kernel; TokenWeave uses 2-8
    one_shot_max_tokens: int = 64  # full-residual calls with at most this many tokens go one-shot
    # kernel barrier timeout (0 = wait forever). Long by default: a fused call's kernel spins until
    # every peer's kernel arrives, and a rank legitimately late (a checkpoint save, a data stall)
    # must not make the others give up and poison the group; debug mode and tests use seconds.
    timeout_s: float = 600.0
    debug: bool = False
    validate: bool = True  # collective paths: check (T, H, dtype, layout) agree across ranks per call
    symm_backend: str = "cuda"  # "cuda" (torch symmetric memory) or "host-sim" (CPU test vehicle)
    # TokenWeave layers: check each call's input hidden states are identical on every rank (one small
    # host-read all_gather per call; on in debug mode). Ranks fed different tokens (e.g. sampling
    # with unequal seeds) otherwise sum partials of different inputs: silently wrong.
    check_inputs: bool = False

    @staticmethod
    def from_env(**overrides) -> "TokenWeaveConfig":
        debug = os.environ.get("RINGATTN_TW_DEBUG", "0") not in ("", "0")
        kw = dict(
            path=os.environ.get("RINGATTN_TW_PATH") or None,
            max_ctas=_env_int("RINGATTN_TW_MAX_CTAS", 8),
            one_shot_max_tokens=_env_int("RINGATTN_TW_ONE_SHOT_MAX_TOKENS", 64),
            timeout_s=_env_float("RINGATTN_TW_TIMEOUT_S", 10.0 if debug else 600.0),
            debug=debug,
            validate=os.environ.get("RINGATTN_TW_VALIDATE", "1") not in ("", "0"),
            check_inputs=debug or os.environ.get("RINGATTN_TW_CHECK_INPUTS", "0") not in ("", "0"),
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        cfg = TokenWeaveConfig(**kw)
        cfg.check()
        return cfg

    def check(self):
        if self.path is not None and self.path not in BASE_PATHS:
            raise ValueError(f"path must be one of {BASE_PATHS} or None, got {self.path!r}")
        if not 1 <= self.max_ctas <= MAX_BLOCKS:
            raise ValueError(f"max_ctas must be in [1, {MAX_BLOCKS}], got {self.max_ctas}")
        if self.one_shot_max_tokens < 0 or self.timeout_s < 0:
            raise ValueError("one_shot_max_tokens and timeout_s must be >= 0")
        if self.symm_backend not in ("cuda", "host-sim"):
            raise ValueError(f"symm_backend must be 'cuda' or 'host-sim', got {self.symm_backend!r}")


class TokenWeaveError(RuntimeError):
    """The fused kernel reported a barrier timeout or ranks disagreeing on a call."""


# ---- token shards (same formula as the kernel) -------------------------------------------------


def shard_bounds(num_tokens: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [begin, end) of the token shard of `rank`: ceil(T / W) rows per rank, last ones shorter."""
    chunk = -(-num_tokens // world_size)
    return min(rank * chunk, num_tokens), min((rank + 1) * chunk, num_tokens)


def co_resident_ctas(facts: list[dict], max_ctas: int) -> str | None:
    """Why the fused kernel cannot run on ranks sharing a GPU (None: it can). Each CTA spins in its
    barriers until the same CTA of every peer arrives, and takes a whole SM (512 threads, up to 128
    registers): every rank's CTAs of both slots (the two token-split halves) must be resident at
    once, or the ones waiting hold the SMs the missing ones need -- a deadlock until the timeout.
    Decided from gathered facts (every rank the same answer)."""
    per_gpu: dict = {}
    for f in facts:
        per_gpu[f["uuid"]] = per_gpu.get(f["uuid"], 0) + 1
    sharing = max(per_gpu.values())
    sms = min(f.get("sms", 0) for f in facts)
    if sharing > 1 and sms and sharing * max_ctas * NUM_SLOTS > sms:
        return (f"{sharing} ranks share a GPU: {sharing} x max_ctas={max_ctas} x {NUM_SLOTS} slots = "
                f"{sharing * max_ctas * NUM_SLOTS} spinning CTAs (one SM each) exceed its {sms} SMs; "
                "lower RINGATTN_TW_MAX_CTAS")
    return None


def num_blocks_for(num_tokens: int, world_size: int, one_shot: bool, max_ctas: int) -> int:
    """CTAs requested for one call: from values all ranks share only (never tuned per rank). The
    kernel trims it to ctas_for(...) so that no CTA is idle."""
    rows = num_tokens if one_shot else -(-num_tokens // world_size)
    return max(1, min(max_ctas, rows))


def launch_shape(hidden: int, esize: int) -> dict:
    """Mirror of launch_shape() in csrc/cuda/fused_allreduce_rmsnorm.cuh (threads per row, rows per CTA)."""
    vec_ok = (hidden * esize) % 16 == 0
    vec = 16 // esize if vec_ok else 1
    lanes = hidden // vec
    if not vec_ok:
        per = 32
    elif lanes > 512 * 4:
        per = 8
    elif lanes >= 128:
        per = 4
    elif lanes >= 64:
        per = 2
    else:
        per = 1
    group = -(-(-(-lanes // per)) // 32) * 32
    rows = 1 if group >= 512 else 512 // group
    return dict(vec=vec, per_thread=per, group=group, rows_per_block=rows, threads=group * rows)


def ctas_for(num_tokens: int, hidden: int, dtype: torch.dtype, world_size: int, one_shot: bool, max_ctas: int) -> int:
    """CTAs (at most that many SMs) the fused kernel launches for this call."""
    shape = launch_shape(hidden, torch.empty((), dtype=dtype).element_size())
    rows = num_tokens if one_shot else -(-num_tokens // world_size)
    need = -(-rows // shape["rows_per_block"])
    return max(1, min(num_blocks_for(num_tokens, world_size, one_shot, max_ctas), need))


# ---- the compiled op -------------------------------------------------------------------------


def _op():
    try:
        from ringattn import _C  # noqa: F401
    except ImportError:
        return None
    return getattr(torch.ops.ringattn, "tw_fused_allreduce_rmsnorm_", None)


def _op_has_kernel(device_type: str) -> bool:
    return device_type in ("cuda", "cpu") and _ringattn_op("tw_fused_allreduce_rmsnorm_", device_type) is not None


if _op() is not None:
    try:
        @torch.library.register_fake("ringattn::tw_fused_allreduce_rmsnorm_")
        def _fake(local_in, y_out, residual, residual_out, weight, *args):  # noqa: ANN001
            return None
    except RuntimeError:  # already registered (module reloaded)
        pass


@functools.lru_cache(maxsize=None)
def _ringattn_op(name: str, device_type: str):
    """torch.ops.ringattn.<name> when ringattn._C is built and has a kernel for the device (asked once
    per name and device type: the dispatcher query cost ~9 us per fused call on the decode path)."""
    try:
        from ringattn import _C  # noqa: F401
    except ImportError:
        return None
    op = getattr(torch.ops.ringattn, name, None)
    key = "CUDA" if device_type == "cuda" else "CPU"
    if op is None or not torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), key):
        return None
    return op.default


def _add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, x + residual): ringattn's add_rmsnorm op where it has a kernel for the device, else the
    same math in eager PyTorch (fp32 inside, new residual rounded to x's dtype first)."""
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    if weight.dtype not in (x.dtype, torch.float32, torch.float64):  # the CUDA kernel takes x's dtype or fp32
        weight = weight.float()
    op = _ringattn_op("add_rmsnorm", x.device.type)
    if op is not None and x.dtype != torch.float64:  # the op computes in fp32; float64 stays float64
        return op(x, residual, weight, float(eps))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    new_res = (x.to(acc) + residual.to(acc)).to(x.dtype)
    f = new_res.to(acc)
    y = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)
    return y, new_res


# ---- symmetric-memory workspaces -------------------------------------------------------------


def _symm_module():
    try:
        import torch.distributed._symmetric_memory as symm

        return symm
    except ImportError:
        return None


def _symm_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A private symmetric allocation (its own signal pad: never shared with other users of the
    implicit symmetric-memory pool, whose kernels use the same pad words)."""
    symm = _symm_module()
    try:
        fn = symm._SymmetricMemory.empty_strided_p2p
    except AttributeError:  # no private allocation in this torch: the pool (shared pad; no multimem)
        return symm.empty(nbytes, dtype=torch.uint8, device=device)
    # An allocation failure (e.g. out of memory) raises: falling back to the implicit pool would
    # share its signal pad with torch's own symmetric-memory kernels.
    return fn((nbytes,), (1,), torch.uint8, device)


def _torch_version() -> tuple[int, int]:
    try:
        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (99, 0)


def _enable_symm_for_group(group) -> None:
    """torch < 2.11 needs the group registered with symmetric memory (enable_symm_mem_for_group);
    2.11 deprecated it and resolves the group's store in C++ (pytorch/pytorch#172163), so it is
    only called before 2.11."""
    symm = _symm_module()
    fn = getattr(symm, "enable_symm_mem_for_group", None)
    if fn is None or _torch_version() >= (2, 11):
        return
    is_enabled = getattr(symm, "is_symm_mem_enabled_for_group", None)
    if is_enabled is not None and is_enabled(group.group_name):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fn(group.group_name)


class HostSimSymmetricMemory:
    """CPU stand-in for torch's _SymmetricMemory (test vehicle for the kernel protocol).

    Every rank's buffer and signal pad live in a file-backed shared mapping that every rank maps,
    so the CPU kernel reads and writes peers' memory through raw pointers, as the CUDA kernel does.
    Processes must share a filesystem (one host).
    """

    def __init__(self, nbytes: int, group, signal_pad_size: int):
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        my_dir = tempfile.mkdtemp(prefix="ringattn_tw_", dir=shm)
        for name, size in (("buf", nbytes), ("pad", signal_pad_size)):
            with open(os.path.join(my_dir, name), "wb") as f:
                f.truncate(size)
        dirs = [None] * self.world_size
        dist.all_gather_object(dirs, my_dir, group=group)
        self._bufs = [torch.from_file(os.path.join(d, "buf"), shared=True, size=nbytes, dtype=torch.uint8) for d in dirs]
        self._pads = [
            torch.from_file(os.path.join(d, "pad"), shared=True, size=signal_pad_size, dtype=torch.uint8) for d in dirs
        ]
        dist.barrier(group=group)  # every rank mapped every file: the names can go
        for name in ("buf", "pad"):
            os.unlink(os.path.join(my_dir, name))
        os.rmdir(my_dir)
        self.buffer = self._bufs[self.rank]
        self.buffer_ptrs = [b.data_ptr() for b in self._bufs]
        self.signal_pad_ptrs = [p.data_ptr() for p in self._pads]
        self._ptr_arrays = (torch.tensor(self.buffer_ptrs, dtype=torch.int64), torch.tensor(self.signal_pad_ptrs, dtype=torch.int64))
        self.buffer_ptrs_dev = self._ptr_arrays[0].data_ptr()
        self.signal_pad_ptrs_dev = self._ptr_arrays[1].data_ptr()
        self.multicast_ptr = 0
        self.buffer_size = nbytes
        self.signal_pad_size = signal_pad_size

    def get_signal_pad(self, rank: int) -> torch.Tensor:
        return self._pads[rank].view(torch.int32)


class _Workspace:
    """One symmetric buffer per (group, device): NUM_SLOTS slots x (in, out, res) regions."""

    def __init__(self, group, device: torch.device, slot_bytes: int, backend: str):
        self.slot_bytes = slot_bytes
        nbytes = slot_bytes * NUM_SLOTS
        world = dist.get_world_size(group)
        need_pad = NUM_SLOTS * _NUM_PHASES * MAX_BLOCKS * world * 4
        if backend == "host-sim":
            self.handle = HostSimSymmetricMemory(nbytes, group, max(need_pad, 4096))
            self.buffer = self.handle.buffer
        else:
            _enable_symm_for_group(group)
            # Agree on the allocation before the rendezvous: a rank whose allocation failed would
            # otherwise leave its peers blocked in rendezvous (a collective) instead of raising.
            err = None
            try:
                self.buffer = _symm_empty(nbytes, device)
            except Exception as e:  # noqa: BLE001 - gathered and raised on every rank below
                err = f"{type(e).__name__}: {e}"
            errs = [None] * world
            dist.all_gather_object(errs, err, group=group)
            if any(errs):
                raise RuntimeError(
                    f"symmetric-memory allocation of {nbytes} bytes failed: "
                    + "; ".join(f"rank {r}: {e}" for r, e in enumerate(errs) if e)
                )
            self.handle = _symm_module().rendezvous(self.buffer, group)
        # torch versions without a configurable pad size (no attribute) have a fixed 2048-byte pad
        pad_size = int(getattr(self.handle, "signal_pad_size", 0) or 0) or 2048
        if backend != "host-sim" and pad_size < need_pad:
            raise RuntimeError(f"symmetric-memory signal pad is {pad_size} bytes, the fused kernel needs {need_pad}")
        self.rank = self.handle.rank if isinstance(self.handle.rank, int) else dist.get_rank(group)
        ptrs = list(self.handle.buffer_ptrs)
        # The tensor may sit at an offset inside the symmetric allocation (pooled allocators). The
        # kernel adds this rank's offsets to every peer's buffer_ptrs[p], so they must be equal.
        self.base_offset = self.buffer.data_ptr() - int(ptrs[self.rank])
        if backend == "host-sim":
            offsets = [self.base_offset] * world
        else:
            offsets = [None] * world
            dist.all_gather_object(offsets, self.base_offset, group=group)
        if min(offsets) < 0 or len(set(offsets)) != 1:
            raise RuntimeError(
                f"symmetric buffer offsets inside their allocations differ across ranks or are negative: {offsets}"
            )
        self.buffer_ptrs_dev = int(self.handle.buffer_ptrs_dev)
        self.signal_pad_ptrs_dev = int(self.handle.signal_pad_ptrs_dev)
        # torch's multicast_ptr already includes the handle's offset into the allocation
        # (CUDASymmetricMemory::get_multicast_ptr: mc_addr + offset_) while buffer_ptrs do not, and
        # the kernel adds base_offset to both: only an allocation of our own (offset 0) can go multimem.
        mc = int(getattr(self.handle, "multicast_ptr", 0) or 0)
        self.multicast_ptr = mc if self.base_offset == 0 else 0

    @staticmethod
    def region_bytes(tokens: int, hidden: int, dtype: torch.dtype) -> int:
        n = tokens * hidden * torch.empty((), dtype=dtype).element_size()
        return max(_ALIGN, -(-n // _ALIGN) * _ALIGN)

    def fits(self, tokens: int, hidden: int, dtype: torch.dtype) -> bool:
        return 3 * self.region_bytes(tokens, hidden, dtype) <= self.slot_bytes

    def regions(self, tokens: int, hidden: int, dtype: torch.dtype, slot: int):
        """(in, out, res) views (tokens x hidden) of this rank's buffer and their byte offsets
        from the allocation base (equal on every rank)."""
        reg = self.region_bytes(tokens, hidden, dtype)
        views, offsets = [], []
        for i in range(3):
            start = slot * self.slot_bytes + i * reg
            raw = self.buffer[start : start + tokens * hidden * torch.empty((), dtype=dtype).element_size()]
            views.append(raw.view(dtype).view(tokens, hidden))
            offsets.append(self.base_offset + start)
        return views, offsets


# ---- the per-group handle --------------------------------------------------------------------


def _device_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{socket.gethostname()}:{device}"
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else f"{socket.gethostname()}:cuda:{device.index}"


def _backend_for(group, device: torch.device) -> str:
    """The collective backend the group uses for tensors on `device` ('nccl' or 'gloo'...)."""
    b = str(dist.get_backend(group)).lower()
    if ":" in b:  # e.g. "cpu:gloo,cuda:nccl"
        for part in b.split(","):
            dev, _, name = part.partition(":")
            if dev.strip() == device.type:
                return name.strip()
    return b


class AllReduceRMSNorm:
    """Fused all-reduce + residual + RMSNorm for one process group on one device.

    Building it is a collective (all ranks of `group`): it gathers every rank's capabilities and
    picks the base path all ranks take. Call it like the function:
        y, residual = handle(x, residual, weight, eps)
    Producers may write their partial sums straight into `handle.input_buffer(T, H, dtype, slot)`
    (a view of the symmetric buffer: no copy into it on the call).
    """

    def __init__(self, group=None, device: torch.device | str | None = None, config: TokenWeaveConfig | None = None):
        self.config = config or TokenWeaveConfig.from_env()
        self.config.check()
        self.group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
        self.world_size = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._ws: _Workspace | None = None
        self._old_ws: list[_Workspace] = []
        self._status = None
        self._poisoned: str | None = None
        self._validated: set = set()
        self.backend = _backend_for(self.group, self.device) if self.group is not None else "none"
        self.base_path, self.reason = self._choose_base_path()
        self.collective_path = self._choose_collective_path()
        (log.warning if self.config.debug else log.info)(
            "tokenweave group of %d (rank %d, %s): path %s (%s)", self.world_size, self.rank, self.backend,
            self.base_path, self.reason,
        )

    # -- path choice (collective) --

    def _choose_base_path(self) -> tuple[str, str]:
        cfg = self.config
        if self.world_size == 1:
            return "local", "world size 1"
        if cfg.path == "local":
            raise ValueError(f"path 'local' needs world size 1, the group has {self.world_size} ranks")
        host_sim = cfg.symm_backend == "host-sim"
        want_symm = cfg.path in (None, "symm", "multimem")
        my_facts = dict(
            config=dataclasses.astuple(cfg),
            host=socket.gethostname(),
            device_type=self.device.type,
            uuid=_device_uuid(self.device),
            has_kernel=_op_has_kernel(self.device.type),
            symm_module=_symm_module() is not None,
            cc=torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else (0, 0),
            overlap_env=os.environ.get("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "0") == "1",
            sms=torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 0,
        )
        facts = [None] * self.world_size
        dist.all_gather_object(facts, my_facts, group=self.group)
        configs = {f["config"] for f in facts}
        if len(configs) != 1:
            raise ValueError(
                "TokenWeave config differs across ranks (set the same RINGATTN_TW_* everywhere): "
                + "; ".join(f"rank {r}: {f['config']}" for r, f in enumerate(facts))
            )
        why_not = None
        if not want_symm:
            why_not = f"path forced to {cfg.path}"
        elif self.world_size > MAX_WORLD_SIZE:
            why_not = f"world size {self.world_size} > {MAX_WORLD_SIZE}"
        elif len({f["host"] for f in facts}) != 1:
            why_not = "ranks on more than one host"
        elif not all(f["has_kernel"] for f in facts):
            why_not = "ringattn._C has no fused kernel for this device on some rank (rebuild with CUDA)"
        elif host_sim:
            if any(f["device_type"] != "cpu" for f in facts):
                why_not = "host-sim backend needs CPU tensors"
        elif any(f["device_type"] != "cuda" for f in facts):
            why_not = "tensors not on CUDA"
        elif not all(f["symm_module"] for f in facts):
            why_not = "torch.distributed._symmetric_memory unavailable"
        elif len({f["uuid"] for f in facts}) != self.world_size and not all(f["overlap_env"] for f in facts):
            why_not = (
                "ranks share a GPU and TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1 is not set "
                "(set it, and run under MPS so the ranks' kernels run concurrently)"
            )
        elif (crowd := co_resident_ctas(facts, cfg.max_ctas)) is not None:
            why_not = crowd
        if why_not is None:
            ok, err, mc = True, "", 0
            try:
                self._ws = _Workspace(self.group, self.device, 1 << 20, cfg.symm_backend)
                mc = self._ws.multicast_ptr
            except Exception as e:  # noqa: BLE001 - reported and agreed on below
                ok, err = False, f"{type(e).__name__}: {e}"
            outcome = [None] * self.world_size
            dist.all_gather_object(outcome, (ok, err, mc != 0), group=self.group)
            if all(o[0] for o in outcome):
                self._status = self._make_status()
                multimem = all(o[2] for o in outcome) and all(tuple(f["cc"]) >= (9, 0) for f in facts)
                if cfg.path == "multimem" and not multimem:
                    raise RuntimeError("path 'multimem' forced but multicast_ptr is 0 or the GPU is pre-Hopper on some rank")
                if multimem and cfg.path != "symm":
                    return "multimem", "symmetric memory with multicast (NVLS)"
                return "symm", "symmetric memory P2P" + ("" if not all(o[2] for o in outcome) else " (multimem not chosen)")
            self._ws = None
            why_not = "symmetric-memory rendezvous failed: " + "; ".join(
                f"rank {r}: {o[1]}" for r, o in enumerate(outcome) if not o[0]
            )
        if cfg.path in ("symm", "multimem"):
            raise RuntimeError(f"path {cfg.path!r} forced but unavailable: {why_not}")
        path = cfg.path or ("rs_ag" if self.backend == "nccl" else "allreduce")
        return path, f"{'forced' if cfg.path else 'fallback'}; no fused kernel: {why_not}"

    def _choose_collective_path(self) -> str:
        if self.base_path in ("rs_ag", "allreduce", "local"):
            return self.base_path
        return "rs_ag" if self.backend == "nccl" else "allreduce"

    def _make_status(self) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.zeros(_STATUS_WORDS, dtype=torch.int32, pin_memory=pin)

    # -- queries --

    def path_for(self, num_tokens: int, hidden: int, dtype: torch.dtype, shard_residual_in: bool = False) -> str:
        """The path a call with these (rank-agreed) values takes."""
        base = self.base_path
        if base not in ("multimem", "symm"):
            return base
        if dtype not in _KERNEL_DTYPES or not 1 <= hidden <= MAX_HIDDEN:
            return self.collective_path
        if not shard_residual_in and num_tokens <= self.config.one_shot_max_tokens:
            return "symm_oneshot"
        esize = torch.empty((), dtype=dtype).element_size()
        if base == "multimem" and (hidden * esize) % 16 == 0:
            return "multimem"
        return "symm_twoshot"

    def describe(self) -> dict:
        return dict(
            base_path=self.base_path,
            reason=self.reason,
            collective_fallback=self.collective_path,
            world_size=self.world_size,
            backend=self.backend,
            device=str(self.device),
            max_ctas=self.config.max_ctas,
            one_shot_max_tokens=self.config.one_shot_max_tokens,
            multicast=bool(self._ws and self._ws.multicast_ptr),
            torch=torch.__version__,
            symm_backend=self._symm_backend_name(),
            signal_pad_bytes=int(getattr(self._ws.handle, "signal_pad_size", 0) or 0) if self._ws else 0,
            workspace_bytes=(self._ws.slot_bytes * NUM_SLOTS) if self._ws else 0,
        )

    def _symm_backend_name(self) -> str | None:
        if self._ws is None:
            return None
        if isinstance(self._ws.handle, HostSimSymmetricMemory):
            return "host-sim"
        try:
            return _symm_module().get_backend(self.device)
        except Exception:  # noqa: BLE001 - informational only
            return "unknown"

    def num_blocks(self, num_tokens: int, path: str) -> int:
        return num_blocks_for(num_tokens, self.world_size, path == "symm_oneshot", self.config.max_ctas)

    def ctas(self, num_tokens: int, hidden: int, dtype: torch.dtype, shard_residual_in: bool = False) -> int:
        """CTAs the fused kernel launches for this call (0 on the collective paths)."""
        path = self.path_for(num_tokens, hidden, dtype, shard_residual_in)
        if path not in ("symm_oneshot", "symm_twoshot", "multimem"):
            return 0
        return ctas_for(num_tokens, hidden, dtype, self.world_size, path == "symm_oneshot", self.config.max_ctas)

    # -- buffers --

    def reserve(self, num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
        """Grow the symmetric buffer for calls up to num_tokens x hidden (collective: all ranks call
        it with the same values). Call before capturing a CUDA graph."""
        if self._ws is None or self._ws.fits(num_tokens, hidden, dtype):
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fused_allreduce_rmsnorm: {num_tokens} x {hidden} {dtype} does not fit the symmetric buffer and it "
                "cannot grow during CUDA graph capture; call handle.reserve(...) before capturing"
            )
        need = 3 * _Workspace.region_bytes(num_tokens, hidden, dtype)
        slot = max(need, 2 * self._ws.slot_bytes)
        self._agree_on_growth(num_tokens, hidden, dtype, slot)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # in-flight kernels still use the old buffer
        self._old_ws.append(self._ws)  # views handed out earlier stay valid
        self._ws = _Workspace(self.group, self.device, slot, self.config.symm_backend)

    def _agree_on_growth(self, num_tokens: int, hidden: int, dtype: torch.dtype, slot_bytes: int) -> None:
        """Before the collectives that grow the buffer: every rank must be growing, to the same size.
        A call (not reserve()) grows implicitly when it does not fit, so ranks that disagree on the
        token count can leave one rank growing alone: it would block in the allocation's collectives
        until the process-group timeout (30 min on gloo) while its peers' kernels time out. One small
        all_gather on the host, polled: a rank left alone raises after RINGATTN_SYNC_TIMEOUT_S, and
        ranks growing to different sizes all raise the same ValueError."""
        if self.world_size == 1:
            return
        from ringattn.comm import ControlGroupTimeout, control_group
        from ringattn.sequence_parallel import _wait_or_raise, sync_timeout_s

        what = f"{num_tokens} x {hidden} {str(dtype).replace('torch.', '')}"
        try:
            cgroup, cdev = control_group(self.group, self.device)
            mine = torch.tensor([slot_bytes], dtype=torch.int64, device=cdev)
            table = [torch.empty_like(mine) for _ in range(self.world_size)]
            work = dist.all_gather(table, mine, group=cgroup, async_op=True)
            ranks = dist.get_process_group_ranks(self.group) if self.group is not None else list(range(self.world_size))
            _wait_or_raise(work, fn="fused_allreduce_rmsnorm", global_ranks=ranks, call=0, timeout_s=sync_timeout_s())
        except (RuntimeError, ControlGroupTimeout) as e:
            self._poisoned = (f"rank {self.rank} had to grow the symmetric buffer for a {what} call and not every "
                              "rank of the group did: the ranks called with different token counts / hidden sizes "
                              f"/ dtypes, or a rank skipped the call ({e})")
            raise TokenWeaveError(self._poisoned) from e
        sizes = [int(t) for t in table]
        if len(set(sizes)) != 1:
            raise ValueError(f"fused_allreduce_rmsnorm: the ranks grow the symmetric buffer to different sizes "
                             f"({sizes} bytes per slot; this rank for a {what} call): they called with different "
                             "token counts, hidden sizes or dtypes")

    def input_buffer(self, num_tokens: int, hidden: int, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        """Where producers write their partial sums (T x H): the symmetric in-region when the call
        will take a symm/multimem path (no copy on the call), else a fresh tensor."""
        path = self.path_for(num_tokens, hidden, dtype)
        if path in ("symm_oneshot", "symm_twoshot", "multimem"):
            self.reserve(num_tokens, hidden, dtype)
            return self._ws.regions(num_tokens, hidden, dtype, slot)[0][0]
        return torch.empty(num_tokens, hidden, dtype=dtype, device=self.device)

    def signal_pads_zero(self) -> bool:
        """True when every word of this rank's signal pad is 0 (test helper; synchronises)."""
        if self._ws is None:
            return True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for ws in [self._ws, *self._old_ws]:
            h = ws.handle
            if isinstance(h, HostSimSymmetricMemory):
                pad = h.get_signal_pad(h.rank)
            else:
                pad = h.get_signal_pad(h.rank, (h.signal_pad_size // 4,), torch.int32, 0)
            if bool((pad != 0).any()):
                return False
        return True

    # -- the call --

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float = 1e-6,
        *,
        shard_residual_in: bool = False,
        shard_residual_out: bool | None = None,
        slot: int = 0,
        copy_out: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y = rmsnorm(all_reduce(x) + residual) * weight; returns (y, new residual).

        x: (..., H), this rank's partial sum. residual: x's shape (replicated) or, with
        shard_residual_in, (shard_rows, H). The new residual is returned full (x's shape) or as
        the shard (shard_rows, H) per shard_residual_out (default: like the input). y has x's shape.
        copy_out=False returns views of the symmetric buffer on the fused paths, valid until the
        next call on the same slot (the TokenWeave layer uses this; the default copies).
        """
        if self._poisoned:
            raise TokenWeaveError(f"fused_allreduce_rmsnorm: group unusable after an earlier failure: {self._poisoned}")
        if shard_residual_out is None:
            shard_residual_out = shard_residual_in
        if not 0 <= slot < NUM_SLOTS:
            raise ValueError(f"slot must be in [0, {NUM_SLOTS}), got {slot}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"x must be (..., hidden) with hidden >= 1, got {tuple(x.shape)}")
        H = x.shape[-1]
        T = x.numel() // H
        bad = self._input_error(x, residual, weight, T, H, shard_residual_in)
        self._check_status()
        path = self.path_for(T, H, x.dtype, shard_residual_in)
        if self.config.debug:
            log.warning("tokenweave rank %d: %d x %d %s -> %s", self.rank, T, H, x.dtype, path)
        if path in ("symm_oneshot", "symm_twoshot", "multimem"):
            if bad:  # peers' kernels time out and report this rank missing
                raise ValueError(bad)
        else:  # collective paths: every rank raises together, naming the bad ranks
            self._validate(T, H, x.dtype, shard_residual_in, shard_residual_out, bad)
        x2 = x.reshape(T, H)
        res2 = residual.reshape(-1, H)
        if path in ("symm_oneshot", "symm_twoshot", "multimem"):
            y, new_res = self._fused(path, x2, res2, weight, eps, shard_residual_in, shard_residual_out, slot, copy_out)
        else:
            y, new_res = self._collective(path, x2, res2, weight, eps, shard_residual_in, shard_residual_out)
        y = y.view(x.shape)
        if not shard_residual_out:
            new_res = new_res.view(x.shape)
        return y, new_res

    def _input_error(self, x, residual, weight, T, H, shard_residual_in) -> str | None:
        b, e = shard_bounds(T, self.world_size, self.rank)
        if shard_residual_in:
            if tuple(residual.shape) != (e - b, H):
                return f"residual must be this rank's token shard ({e - b}, {H}) (rows {b}:{e} of {T}), got {tuple(residual.shape)}"
        elif residual.shape != x.shape:
            return f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
        if residual.dtype != x.dtype:
            return f"residual must have the dtype of x ({x.dtype}), got {residual.dtype}"
        if weight.dim() != 1 or weight.shape[0] != H:
            return f"weight must have shape ({H},), got {tuple(weight.shape)}"
        if x.device != residual.device or x.device != weight.device:
            return f"x, residual and weight must be on one device, got {x.device}, {residual.device}, {weight.device}"
        if x.device != self.device and not (x.device.type == self.device.type == "cpu"):
            return f"this handle serves {self.device}, x is on {x.device}"
        return None

    def _fused(self, path, x, residual, weight, eps, res_in_shard, res_out_shard, slot, copy_out):
        T, H = x.shape
        self.reserve(T, H, x.dtype)
        ws = self._ws
        (in_v, out_v, res_v), (in_off, out_off, res_off) = ws.regions(T, H, x.dtype, slot)
        if x.data_ptr() != in_v.data_ptr():
            in_v.copy_(x)
        if weight.dtype not in (x.dtype, torch.float32):
            weight = weight.float()
        weight = weight.contiguous()
        residual = residual.contiguous()
        if residual.data_ptr() % 16:  # the vectorised kernel needs 16-byte aligned rows
            residual = residual.clone()
        b, e = shard_bounds(T, self.world_size, self.rank)
        mode = 0 if res_in_shard else _MODE_RES_IN_FULL
        if not res_out_shard:
            mode |= _MODE_RES_OUT_GATHER
        if path == "symm_oneshot":
            mode |= _MODE_ONE_SHOT
            y_out = torch.empty_like(in_v) if copy_out else out_v
            if res_out_shard:
                res_out = torch.empty(e - b, H, dtype=x.dtype, device=x.device)
            else:
                res_out = torch.empty_like(in_v) if copy_out else res_v
        else:
            if path == "multimem":
                mode |= _MODE_MULTIMEM
            y_out = out_v
            res_out = torch.empty(e - b, H, dtype=x.dtype, device=x.device) if res_out_shard else res_v
        timeout_ns = int(self.config.timeout_s * 1e9)
        torch.ops.ringattn.tw_fused_allreduce_rmsnorm_.default(
            in_v, y_out, residual, res_out, weight,
            ws.buffer_ptrs_dev, ws.signal_pad_ptrs_dev, ws.multicast_ptr if path == "multimem" else 0,
            self.rank, self.world_size, in_off, out_off, res_off, slot,
            self.num_blocks(T, path), mode, float(eps), timeout_ns, self._status.data_ptr(),
        )  # fmt: skip
        if self.device.type == "cpu" or (self.config.debug and not torch.cuda.is_current_stream_capturing()):
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self._check_status()
        if path != "symm_oneshot" and copy_out:
            y_out = y_out.clone()
            if not res_out_shard:
                res_out = res_out.clone()
        return y_out, res_out

    def _check_status(self):
        if self._status is None:
            return
        code = int(self._status[0])
        if code == 0:
            return
        w = self._status.tolist()
        msg = (
            f"fused_allreduce_rmsnorm kernel on rank {w[1]} (of {self.world_size}): {_STATUS_NAMES.get(code, code)} "
            f"at block {w[2]} waiting on peer {w[3]} (phase {w[6]}: 0/1 start put/wait, 2/3 end put/wait; "
            f"seen signature {w[4] & 0xffffffff:#x}, ours {w[5] & 0xffffffff:#x}). "
        )
        if code == 2:
            msg += "The ranks called with different token counts, hidden sizes, dtypes or residual layouts."
        elif code == 1:
            msg += f"A peer did not arrive within {self.config.timeout_s} s (a rank skipped the call, or no MPS?)."
        self._poisoned = msg
        raise TokenWeaveError(msg)

    # -- collective paths --

    def _validate(self, T, H, dtype, res_in_shard, res_out_shard, bad: str | None = None):
        """Collective paths: all ranks must call with equal (T, H, dtype, layout) and valid inputs,
        else gloo/NCCL would hang or mix rows. One 3-int all-reduce (MAX of v, -v, bad) checks it,
        so a bad input on one rank makes every rank raise instead of leaving peers waiting."""
        if (not self.config.validate and bad is None) or self.world_size == 1:
            if bad:
                raise ValueError(bad)
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            if bad:
                raise ValueError(bad)
            return
        sig = zlib.crc32(repr((T, H, str(dtype), res_in_shard, res_out_shard)).encode())
        mine = torch.tensor([sig, 1 if bad else 0], dtype=torch.int64)
        if self.backend == "nccl":
            everyone = torch.empty(self.world_size, 2, dtype=torch.int64, device=self.device)
            dist.all_gather_into_tensor(everyone, mine.to(self.device), group=self.group)
            everyone = everyone.cpu()
        else:
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(parts, mine, group=self.group)
            everyone = torch.stack(parts)
        if bad:
            raise ValueError(bad)
        bad_ranks = [r for r in range(self.world_size) if int(everyone[r, 1])]
        if bad_ranks:
            raise ValueError(f"fused_allreduce_rmsnorm: bad input on rank(s) {bad_ranks} (see their errors)")
        if not bool((everyone[:, 0] == sig).all()):
            raise ValueError(
                f"fused_allreduce_rmsnorm: ranks disagree on the call (rank {self.rank}: tokens={T}, hidden={H}, "
                f"dtype={dtype}, shard_residual_in={res_in_shard}, shard_residual_out={res_out_shard}; "
                f"ranks with another call: {[r for r in range(self.world_size) if int(everyone[r, 0]) != sig]})"
            )

    def _coll(self, fn, *tensors):
        """Run a collective; gloo on CUDA tensors goes through CPU copies (gloo's CUDA support is partial)."""
        staged = self.backend == "gloo" and any(t.is_cuda for t in tensors)
        if not staged:
            fn(*tensors)
            return tensors
        cpu = [t.cpu() for t in tensors]
        fn(*cpu)
        for t, c in zip(tensors, cpu):
            t.copy_(c)
        return tensors

    def _reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [b, e) of the sum over ranks (x padded to W * chunk rows)."""
        T, H = x.shape
        W = self.world_size
        chunk = -(-T // W)
        b, e = shard_bounds(T, W, self.rank)
        if chunk == 0:
            return x[:0].clone()
        padded = x if chunk * W == T else torch.cat([x, x.new_zeros(chunk * W - T, H)])
        out = x.new_empty(chunk, H)
        if self.backend == "nccl":
            dist.reduce_scatter_tensor(out, padded.contiguous(), group=self.group)
        else:
            # gloo: reduce_scatter_tensor where this torch/gloo has it, else all_reduce + slice
            # (test-only emulation: it moves W times the bytes).
            try:
                self._coll(lambda o, i: dist.reduce_scatter_tensor(o, i, group=self.group), out, padded.contiguous())
            except (RuntimeError, NotImplementedError, ValueError):
                full = padded.clone()
                self._coll(lambda u: dist.all_reduce(u, group=self.group), full)
                out.copy_(full[self.rank * chunk : (self.rank + 1) * chunk])
        return out[: e - b]

    def _all_gather_rows(self, shard: torch.Tensor, T: int) -> torch.Tensor:
        """Concatenate every rank's shard rows (shard_bounds layout) into T rows."""
        W = self.world_size
        chunk = -(-T // W)
        H = shard.shape[1]
        if chunk == 0:
            return shard.new_empty(0, H)
        padded = shard if shard.shape[0] == chunk else torch.cat([shard, shard.new_zeros(chunk - shard.shape[0], H)])
        out = shard.new_empty(chunk * W, H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's rename in new torch
            if self.backend == "nccl":
                dist.all_gather_into_tensor(out, padded.contiguous(), group=self.group)
            else:
                try:
                    self._coll(lambda o, i: dist.all_gather_into_tensor(o, i, group=self.group), out, padded.contiguous())
                except (RuntimeError, NotImplementedError, ValueError):
                    parts = [torch.empty_like(padded, device="cpu") for _ in range(W)]
                    dist.all_gather(parts, padded.cpu().contiguous(), group=self.group)
                    out.copy_(torch.cat(parts))
        return out[:T]

    def _collective(self, path, x, residual, weight, eps, res_in_shard, res_out_shard):
        T, H = x.shape
        b, e = shard_bounds(T, self.world_size, self.rank)
        if path == "local":
            y, new_res = _add_rmsnorm(x, residual, weight, eps)
            return y, new_res  # one rank: shard == full
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if path == "allreduce":
                xs = x.clone()
                self._coll(lambda u: dist.all_reduce(u, group=self.group), xs)
                if not res_in_shard:
                    y, new_res = _add_rmsnorm(xs, residual, weight, eps)
                    return y, (new_res[b:e] if res_out_shard else new_res)
                xs = xs[b:e]
            else:  # rs_ag
                xs = self._reduce_scatter_rows(x.contiguous())
        res_shard = residual if res_in_shard else residual[b:e]
        y_s, new_res_s = _add_rmsnorm(xs, res_shard, weight, eps)
        if res_out_shard:
            return self._all_gather_rows(y_s, T), new_res_s
        both = self._all_gather_rows(torch.cat([y_s, new_res_s], dim=1), T)  # one collective for y and residual
        return both[:, :H].contiguous(), both[:, H:].contiguous()


# ---- module-level API ------------------------------------------------------------------------

_handles: "weakref.WeakKeyDictionary | dict" = {}


def get_allreduce_rmsnorm(group=None, device=None, config: TokenWeaveConfig | None = None) -> AllReduceRMSNorm:
    """The cached handle of (group, device); the first call on a group is a collective."""
    if group is None and dist.is_initialized():
        group = dist.group.WORLD
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    key = (id(group), str(device), config)
    h = _handles.get(key)
    if h is None or h.group is not group:
        h = AllReduceRMSNorm(group, device, config)
        _handles[key] = h
    return h


def fused_allreduce_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    group=None,
    *,
    shard_residual_in: bool = False,
    shard_residual_out: bool | None = None,
    config: TokenWeaveConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_new = all_reduce_sum(x over group) + residual; y = rmsnorm(residual_new) * weight.

    Returns (y, residual_new), fresh tensors. x: (..., H) this rank's partial sum; residual: x's
    shape (or its token shard with shard_residual_in); weight: (H,). A collective: every rank of
    the group calls it with the same shapes and dtype. See the module docstring for the paths.
    Under torch.compile (config=None): one opaque op, ringattn::fused_allreduce_rmsnorm
    (ringattn.compiled), so the surrounding code compiles without a graph break.
    """
    if torch.compiler.is_compiling():
        from ringattn.compiled import traced_fused_allreduce_rmsnorm
        return traced_fused_allreduce_rmsnorm(x, residual, weight, eps, group, shard_residual_in,
                                              shard_residual_out, config)
    return _eager_fused_allreduce_rmsnorm(x, residual, weight, eps, group, shard_residual_in=shard_residual_in,
                                          shard_residual_out=shard_residual_out, config=config)


def _eager_fused_allreduce_rmsnorm(x, residual, weight, eps, group, *, shard_residual_in, shard_residual_out,
                                   config):
    if group is None and not dist.is_initialized():
        return _add_rmsnorm(x, residual, weight, eps)
    device = x.device if x.device.type != "cuda" or x.device.index is not None else None
    h = get_allreduce_rmsnorm(group, device, config)
    return h(x, residual, weight, eps, shard_residual_in=shard_residual_in, shard_residual_out=shard_residual_out)


def fused_allreduce_rmsnorm_path(
    num_tokens: int,
    hidden: int,
    dtype: torch.dtype = torch.bfloat16,
    group=None,
    device=None,
    *,
    shard_residual_in: bool = False,
    config: TokenWeaveConfig | None = None,
) -> str:
    """Which path fused_allreduce_rmsnorm takes for these values on this group (one of CALL_PATHS).
    Builds the group's handle on first use (a collective: call it on every rank)."""
    if group is None and not dist.is_initialized():
        return "local"
    return get_allreduce_rmsnorm(group, device, config).path_for(num_tokens, hidden, dtype, shard_residual_in)
