"""fused_allreduce_rmsnorm: every path against an fp64 reference, the agreed fallback ladder, and
bad inputs (clear errors, never a hang).

Two tiers (style rule 10):
- always (CPU, real gloo processes, world sizes 1-4): local, allreduce and rs_ag (gloo: torch's
  reduce_scatter_tensor where this gloo has it, else all_reduce + slice, a test-only emulation),
  and the fused kernel's protocol itself (two-shot, one-shot, residual layouts, signatures,
  timeouts, self-resetting signal pads) through the CPU host-simulation kernel on shared memory
  (needs a ringattn._C that has the tw op; skipped with a reason otherwise).
- gpu (`pytest -m gpu tests/test_fused_allreduce_rmsnorm.py`, run by scripts/gpu_check.sh under
  MPS): 2 and 4 processes sharing cuda:0 with TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1, every path
  that can run there (symm one-shot and two-shot, rs_ag/allreduce over gloo, multimem only when
  multicast exists), CUDA graph capture + replay, back-to-back calls on both slots, signal pads
  zero after; integer-valued inputs so the all-reduce is exact.

Tolerance ("2x PyTorch's own error" rule): the error of our y against the fp64 reference must be
at most 2x the error of the same-dtype eager composition (all_reduce in dtype, add, RMSNorm) plus a
floor of a few ulps of |y| (the composition can be exact by luck on small cases).
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist

from conftest import get_pool
import importlib

from ringattn.tokenweave import AllReduceRMSNorm, TokenWeaveConfig, TokenWeaveError

# the module (the package re-exports a function of the same name)
far = importlib.import_module("ringattn.tokenweave.fused_allreduce_rmsnorm")

HAS_CUDA = torch.cuda.is_available()
_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _has_tw_op(device_type="cpu") -> bool:
    return far._op_has_kernel(device_type)


needs_tw_op = pytest.mark.skipif(not _has_tw_op("cpu"), reason="ringattn._C predates the tw op (rebuild the extension)")


# ---- inputs and reference (run inside the workers) ---------------------------------------------


def make_inputs(seed, world, T, H, dtype, integer=False, device="cpu"):
    """Every rank's partial x_r, the residual and the weight (identical on all ranks for a seed)."""
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: sums are exact in every dtype
        xs = [torch.randint(-4, 5, (T, H), generator=g).to(dtype) for _ in range(world)]
        res = torch.randint(-4, 5, (T, H), generator=g).to(dtype)
        w = torch.randint(1, 4, (H,), generator=g).to(dtype)
    else:
        xs = [torch.randn(T, H, generator=g).to(dtype) for _ in range(world)]
        res = torch.randn(T, H, generator=g).to(dtype)
        w = (1 + 0.5 * torch.randn(H, generator=g)).to(dtype)
    return [t.to(device) for t in xs], res.to(device), w.to(device)


def reference(xs, res, w, eps):
    """fp64: r = sum(x_r) + residual; y = r / sqrt(mean(r^2) + eps) * w."""
    r = sum(x.double() for x in xs) + res.double()
    y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return y, r


def eager_same_dtype(xs, res, w, eps):
    """What an unfused same-dtype composition computes (the error yardstick)."""
    acc = xs[0].clone()
    for x in xs[1:]:
        acc = acc + x
    r = acc + res
    f = r.float()
    y = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype) * w
    return y, r


def check_close(name, got, ref64, eager, dtype):
    got64 = got.double().cpu()
    ref64 = ref64.cpu()
    err = (got64 - ref64).abs().max().item() if got64.numel() else 0.0
    base = (eager.double().cpu() - ref64).abs().max().item() if got64.numel() else 0.0
    # floor: a few ulps of |y|, plus the sum of squares over H in one fp32 accumulator (the C++
    # add_rmsnorm sums sequentially, torch's mean pairwise: ~sqrt(H) ulps apart, seen at H=16385)
    hidden = ref64.shape[-1] if ref64.dim() else 1
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = (4 * _ULP[dtype] + 2.0**-23 * hidden**0.5) * scale + 1e-12
    assert err <= 2 * base + floor, f"{name}: max err {err:.3e} > 2 x eager err {base:.3e} + floor {floor:.3e}"


def run_case(h: AllReduceRMSNorm, seed, T, H, dtype, shard_in, shard_out, eps=1e-6, integer=False, device="cpu"):
    """One call on this rank, checked against the fp64 reference. Returns the path taken."""
    W, r = h.world_size, h.rank
    xs, res, w = make_inputs(seed, W, T, H, dtype, integer, device)
    b, e = far.shard_bounds(T, W, r)
    res_in = res[b:e].clone() if shard_in else res
    path = h.path_for(T, H, dtype, shard_in)
    y, new_res = h(xs[r], res_in, w, eps, shard_residual_in=shard_in, shard_residual_out=shard_out)
    y_ref, r_ref = reference(xs, res, w, eps)
    y_eager, r_eager = eager_same_dtype(xs, res, w, eps)
    tag = f"rank {r}/{W} path {path} T={T} H={H} {dtype} shard_in={shard_in} shard_out={shard_out}"
    assert y.shape == (T, H) and y.dtype == dtype, f"{tag}: y {tuple(y.shape)} {y.dtype}"
    check_close(f"{tag}: y", y, y_ref, y_eager, dtype)
    if shard_out:
        assert new_res.shape == (e - b, H), f"{tag}: residual shard {tuple(new_res.shape)} != {(e - b, H)}"
        r_ref, r_eager = r_ref[b:e], r_eager[b:e]
    else:
        assert new_res.shape == (T, H), f"{tag}: residual {tuple(new_res.shape)}"
    check_close(f"{tag}: residual", new_res, r_ref, r_eager, dtype)
    if integer:
        assert torch.equal(new_res.double().cpu(), r_ref.cpu()), f"{tag}: integer residual not exact"
    return path


# ---- CPU tier workers ----------------------------------------------------------------------------

_LAYOUTS = [(False, False), (False, True), (True, True), (True, False)]
_SHAPES = [(1, 8), (5, 33), (7, 96), (16, 64)]  # odd token counts and hidden sizes (33: scalar kernel path)


def _w_paths(path, dtypes, symm_backend="cuda", one_shot_max_tokens=4):
    """Every (shape, dtype, layout) on one forced path; returns the set of call paths taken."""
    cfg = TokenWeaveConfig(path=path, symm_backend=symm_backend, one_shot_max_tokens=one_shot_max_tokens, timeout_s=20)
    h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
    taken = set()
    for i, (T, H) in enumerate(_SHAPES):
        for dtype in dtypes:
            for shard_in, shard_out in _LAYOUTS:
                taken.add(run_case(h, 1000 + i, T, H, dtype, shard_in, shard_out))
    if path == "symm":
        assert h.signal_pads_zero(), f"rank {h.rank}: signal pad not zero after the calls"
    return sorted(taken), h.base_path, h.reason


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_collective_paths(world):
    pool = get_pool(world)
    if world == 1:
        out = pool.run(_w_paths, None, [torch.float32, torch.bfloat16])
        assert out[0][0] == ["local"] and out[0][1] == "local"
        return
    for path in ("allreduce", "rs_ag"):
        out = pool.run(_w_paths, path, [torch.float32, torch.bfloat16], timeout=120)
        assert all(o[0] == [path] for o in out), out
    # no forced path on CPU tensors: the ladder falls to the gloo all-reduce and says why
    out = pool.run(_w_paths, None, [torch.float32])
    assert all(o[1] == "allreduce" and ("not on CUDA" in o[2] or "no fused kernel for this device" in o[2]) for o in out), out


@needs_tw_op
@pytest.mark.parametrize("world", [2, 3, 4])
def test_fused_kernel_protocol_host_sim(world):
    """The fused kernel's protocol (CPU host-simulation kernel over shared memory)."""
    out = get_pool(world).run(_w_paths, "symm", [torch.float32, torch.bfloat16, torch.float16], "host-sim", timeout=180)
    for taken, base, _ in out:
        assert base == "symm"
        assert taken == ["symm_oneshot", "symm_twoshot"], taken


def _w_back_to_back_slots():
    """Back-to-back calls alternating slots, growing the buffer on the way (host-sim)."""
    cfg = TokenWeaveConfig(path="symm", symm_backend="host-sim", one_shot_max_tokens=2, timeout_s=20)
    h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
    for i, (T, H) in enumerate([(3, 16), (9, 40), (300, 1024), (2, 16), (33, 8)]):
        xs, res, w = make_inputs(7 + i, h.world_size, T, H, torch.float32)
        buf = h.input_buffer(T, H, torch.float32, slot=i % 2)
        buf.copy_(xs[h.rank])  # the producer writes straight into the symmetric buffer
        y, nr = h(buf, res, w, 1e-5, slot=i % 2, copy_out=False)
        y_ref, r_ref = reference(xs, res, w, 1e-5)
        assert torch.allclose(y.double(), y_ref, rtol=1e-5, atol=1e-5), f"call {i}"
        assert torch.allclose(nr.double(), r_ref, rtol=1e-6, atol=1e-6), f"call {i}"
    assert h.signal_pads_zero()
    return len(h._old_ws)


@needs_tw_op
def test_back_to_back_slots_and_growth_host_sim():
    grown = get_pool(3).run(_w_back_to_back_slots)
    assert all(g >= 1 for g in grown), grown


# ---- bad inputs ------------------------------------------------------------------------------------


def _w_bad(kind, path, symm_backend="cuda"):
    cfg = TokenWeaveConfig(path=path, symm_backend=symm_backend, timeout_s=3, one_shot_max_tokens=0)
    h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
    r = h.rank
    T, H = 6, 16
    xs, res, w = make_inputs(3, h.world_size, T, H, torch.float32)
    x = xs[r]
    if kind == "tokens" and r == 1:
        x, res = x[:5], res[:5]
    elif kind == "dtype" and r == 1:
        x, res, w = x.double(), res.double(), w.double()
    elif kind == "weight" and r == 0:
        w = w[:-1]
    elif kind == "skip" and r == 1:
        return "skipped"
    try:
        h(x, res, w)
    except (ValueError, TokenWeaveError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("kind", ["tokens", "dtype", "weight"])
def test_bad_input_collective_path_raises_on_every_rank(kind):
    out = get_pool(2).run(_w_bad, kind, "allreduce", timeout=60)
    assert all(o.startswith("ValueError") for o in out), out
    if kind == "weight":
        assert "weight must have shape (16,)" in out[0] and "rank(s) [0]" in out[1], out
    else:
        assert any("disagree" in o or "dtype" in o for o in out), out


@needs_tw_op
@pytest.mark.parametrize("kind", ["tokens", "skip"])
def test_bad_input_fused_path_reports_not_hangs(kind):
    """A mismatched call is caught by the signatures in the signal pads; a missing rank by the
    barrier timeout (3 s here). Either way an error naming the peer, never a hang."""
    out = get_pool(2).run(_w_bad, kind, "symm", "host-sim", timeout=60)
    if kind == "tokens":
        assert all("call mismatch across ranks" in o for o in out), out
    else:
        assert out[1] == "skipped" and "barrier timeout" in out[0] and "peer 1" in out[0], out


def _w_fail_stop():
    """After a recorded failure (here: rank 0's status word set by hand, as a barrier timeout would
    leave it) the kernel touches neither pads nor buffers: rank 0's call returns at once with its
    output region untouched, and rank 1, whose peer never arrived, times out naming it -- instead
    of the two pairing up (with stale signals after a real failure: mixed rows)."""
    import time

    cfg = TokenWeaveConfig(path="symm", symm_backend="host-sim", one_shot_max_tokens=0, timeout_s=2)
    h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
    r = h.rank
    T, H = 8, 32
    xs, res, w = make_inputs(11, h.world_size, T, H, torch.float32)
    h(xs[r], res, w)  # a good call first: the workspace exists, the pads are zero
    assert h.signal_pads_zero()
    dist.barrier()  # (before a peer's next kernel puts its start signal into our pad)
    (_, out_v, _), _ = h._ws.regions(T, H, torch.float32, 0)
    out_v.fill_(-7.0)
    if r == 0:
        h._status[0] = 1  # kTimeout, recorded by an earlier call
    t0 = time.monotonic()
    try:
        h._fused("symm_twoshot", xs[r].clone(), res, w, 1e-6, False, False, 0, False)
        got = "no error"
    except TokenWeaveError as e:
        got = str(e)
    return got, time.monotonic() - t0, bool((out_v == -7.0).all())


@needs_tw_op
def test_kernel_fail_stop_after_a_recorded_failure_host_sim():
    (got0, took0, untouched0), (got1, took1, untouched1) = get_pool(2).run(_w_fail_stop, timeout=60)
    assert took0 < 1.0 and untouched0, (got0, took0)      # returned at once, wrote nothing
    assert "barrier timeout" in got1 and "peer 0" in got1, got1
    assert took1 >= 1.5, took1                           # rank 1 really waited for it


def _w_growth_alone():
    """Ranks disagree on the token count and only rank 1's call needs a bigger buffer: rank 1 must
    not block alone in the growth's collectives (30 min on gloo) -- it raises after
    RINGATTN_SYNC_TIMEOUT_S, and rank 0's kernel reports rank 1 missing."""
    import time

    os.environ["RINGATTN_SYNC_TIMEOUT_S"] = "3"
    try:
        cfg = TokenWeaveConfig(path="symm", symm_backend="host-sim", one_shot_max_tokens=0, timeout_s=3)
        h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
        T = 8 if h.rank == 0 else 256                    # 256 x 1024 fp32 x 3 regions > the first 1 MiB slot
        xs, res, w = make_inputs(5, h.world_size, T, 1024, torch.float32)
        t0 = time.monotonic()
        try:
            h(xs[h.rank], res, w)
            got = "no error"
        except (TokenWeaveError, ValueError) as e:
            got = f"{type(e).__name__}: {e}"
        return got, time.monotonic() - t0
    finally:
        del os.environ["RINGATTN_SYNC_TIMEOUT_S"]


@needs_tw_op
def test_growth_needed_by_one_rank_raises_instead_of_hanging():
    try:
        (got0, t0), (got1, t1) = get_pool(2).run(_w_growth_alone, timeout=60)
    finally:
        get_pool(2).close(kill=True)  # an abandoned collective stays posted: start a fresh world
    assert "barrier timeout" in got0 and "peer 1" in got0, got0
    assert got1.startswith("TokenWeaveError") and "had to grow the symmetric buffer for a 256 x 1024 float32" in got1, got1
    assert "different token counts" in got1 and t1 < 30, (got1, t1)


def test_ranks_sharing_a_gpu_need_every_cta_resident():
    """Each CTA spins in its barriers and takes a whole SM: ranks sharing a GPU fall back when all
    their CTAs of both slots cannot be resident at once (an agreed decision, from gathered facts)."""
    h100 = [dict(uuid="GPU-0", sms=132)] * 4
    assert far.co_resident_ctas(h100, 8) is None                     # 4 x 8 x 2 = 64 <= 132
    why = far.co_resident_ctas(h100, 32)                              # 4 x 32 x 2 = 256 > 132
    assert why is not None and "256 spinning CTAs" in why and "132 SMs" in why and "RINGATTN_TW_MAX_CTAS" in why
    assert far.co_resident_ctas([dict(uuid=f"GPU-{i}", sms=132) for i in range(8)], 32) is None  # one rank per GPU
    assert far.co_resident_ctas([dict(uuid="GPU-0", sms=132)] * 2 + [dict(uuid="GPU-1", sms=132)] * 6, 16) is not None


def _w_fake_symm_workspace(kind):
    """_Workspace over a fake torch symmetric-memory module (CPU tensors stand in for the device
    allocation): what every rank raises or sees, never one rank blocked in a collective.
      alloc:   rank 1's allocation fails (out of memory): every rank raises before the rendezvous
               (in torch the rendezvous is a collective: rank 0 would block there).
      offsets: the buffers sit at different offsets inside their allocations: every rank raises
               (the kernel adds this rank's offsets to every peer's base pointer).
      pooled:  the same nonzero offset on every rank, multicast available: no multimem (torch's
               multicast_ptr already includes the handle's offset, buffer_ptrs do not)."""
    r, world = dist.get_rank(), dist.get_world_size()
    keep = []

    class FakeSymmetricMemory:
        signal_pad_size = 1 << 16

        @staticmethod
        def empty_strided_p2p(size, stride, dtype, device):
            if kind == "alloc" and r == 1:
                raise RuntimeError("CUDA out of memory (fake)")
            off = 64 * (r + 1) if kind == "offsets" else (64 if kind == "pooled" else 0)
            alloc = torch.zeros(size[0] + off, dtype=dtype)
            keep.append(alloc)
            return alloc[off:]

    class FakeHandle:
        def __init__(self):
            self.rank, self.world_size = r, world
            self.buffer_ptrs = [keep[-1].data_ptr()] * world  # only this rank's entry is read here
            self.buffer_ptrs_dev = self.signal_pad_ptrs_dev = 1
            self.multicast_ptr = 0xDEAD0000

    class FakeSymm:
        _SymmetricMemory = FakeSymmetricMemory

        @staticmethod
        def rendezvous(tensor, group):
            if kind == "alloc":
                raise AssertionError(f"rank {r} entered the rendezvous although rank 1's allocation failed")
            return FakeHandle()

    real = far._symm_module
    far._symm_module = lambda: FakeSymm
    try:
        ws = far._Workspace(dist.group.WORLD, torch.device("cpu"), 1 << 12, "cuda")
        return f"ok multicast_ptr={ws.multicast_ptr:#x} base_offset={ws.base_offset}"
    except Exception as e:  # noqa: BLE001 - the test compares every rank's outcome
        return f"{type(e).__name__}: {e}"
    finally:
        far._symm_module = real


def test_workspace_rendezvous_agreement_fake_symm():
    out = get_pool(2).run(_w_fake_symm_workspace, "alloc")
    assert all("allocation of 8192 bytes failed: rank 1: RuntimeError: CUDA out of memory" in o for o in out), out
    out = get_pool(2).run(_w_fake_symm_workspace, "offsets")
    assert all("offsets inside their allocations differ across ranks" in o for o in out), out
    out = get_pool(2).run(_w_fake_symm_workspace, "pooled")
    assert all(o == "ok multicast_ptr=0x0 base_offset=64" for o in out), out


def _w_config_mismatch():
    cfg = TokenWeaveConfig(path="allreduce", max_ctas=2 + dist.get_rank())
    try:
        AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
    except ValueError as e:
        return str(e)
    return "no error"


def test_config_mismatch_raises_on_every_rank():
    out = get_pool(2).run(_w_config_mismatch)
    assert all("config differs across ranks" in o for o in out), out


def _w_hidden_too_large():
    cfg = TokenWeaveConfig(path="symm", symm_backend="host-sim")
    h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cpu"), cfg)
    p = h.path_for(2, far.MAX_HIDDEN + 1, torch.float32)
    run_case(h, 5, 2, far.MAX_HIDDEN + 1, torch.float32, False, False)
    p64 = h.path_for(2, 64, torch.float64)
    info = h.describe()
    assert info["base_path"] == "symm" and info["symm_backend"] == "host-sim" and info["workspace_bytes"] > 0, info
    assert h.ctas(100, 64, torch.float32) >= 1 and h.ctas(2, far.MAX_HIDDEN + 1, torch.float32) == 0
    return p, p64, h.path_for(2, 64, torch.float32), h.path_for(100, 64, torch.float32)


@needs_tw_op
def test_kernel_limits_fall_back_and_say_so():
    out = get_pool(2).run(_w_hidden_too_large)
    assert all(o == ("allreduce", "allreduce", "symm_oneshot", "symm_twoshot") for o in out), out


def test_module_function_world_size_one_without_dist():
    xs, res, w = make_inputs(0, 1, 5, 12, torch.float32)
    y, r = far.fused_allreduce_rmsnorm(xs[0], res, w, 1e-6)
    y_ref, r_ref = reference(xs, res, w, 1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.double(), r_ref, rtol=1e-6, atol=1e-6)
    assert far.fused_allreduce_rmsnorm_path(5, 12) == "local"


def test_shard_bounds_and_launch_config():
    for T in range(0, 20):
        for W in range(1, 9):
            bounds = [far.shard_bounds(T, W, r) for r in range(W)]
            assert bounds[0][0] == 0 and bounds[-1][1] == T
            assert all(b[1] == n[0] for b, n in zip(bounds, bounds[1:]))
            assert max(e - b for b, e in bounds) == -(-T // W)
    assert far.num_blocks_for(1, 4, False, 4) == 1
    assert far.num_blocks_for(1024, 4, False, 4) == 4
    assert far.num_blocks_for(3, 2, True, 8) == 3


# ---- GPU tier ----------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _gpu_worker(rank, world, init_file, fn_name, args, result_q):
    """fn_name: a function of this module, or "module:function" (a test module on sys.path)."""
    """One rank on cuda:0 (ranks share the GPU: symmetric memory with overlapping devices, MPS)."""
    os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    try:
        torch.cuda.set_device(0)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
        )
        if ":" in fn_name:
            mod, _, name = fn_name.partition(":")
            fn = getattr(importlib.import_module(mod), name)
        else:
            fn = globals()[fn_name]
        result_q.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001
        result_q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gpu_world(world: int, fn_name: str, *args, timeout: float = 240.0):
    """Spawn `world` processes on cuda:0, run fn on each; a hang or a crash fails naming the rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = tempfile.mktemp(prefix="ringattn_tw_gpu_")
    procs = [ctx.Process(target=_gpu_worker, args=(r, world, init_file, fn_name, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import queue as _queue
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world and time.monotonic() < deadline:
        try:
            r, ok, v = q.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        except _queue.Empty:
            if errors and all(not p.is_alive() for i, p in enumerate(procs) if i not in results and i not in errors):
                break
            continue
        (results if ok else errors)[r] = v
    for i, p in enumerate(procs):
        p.join(timeout=5 if i in results or i in errors else 1)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    missing = sorted(set(range(world)) - set(results) - set(errors))
    if errors or missing:
        msg = [f"{fn_name}{args} failed with {world} ranks on one GPU:"]
        msg += [f"--- rank {r} raised:\n{errors[r]}" for r in sorted(errors)]
        if missing:
            msg.append(f"--- ranks {missing} did not finish within {timeout:.0f} s (hang or crash; exit codes "
                       f"{[procs[r].exitcode for r in missing]})")
        pytest.fail("\n".join(msg))
    return [results[r] for r in range(world)]


def _gpu_paths(path):
    """Every shape/dtype/layout on `path` with integer inputs (exact all-reduce) + random inputs."""
    dev = torch.device("cuda", 0)
    cfg = TokenWeaveConfig(path=path, one_shot_max_tokens=8, timeout_s=30, max_ctas=4)
    h = AllReduceRMSNorm(dist.group.WORLD, dev, cfg)
    taken = set()
    shapes = [(1, 8), (5, 33), (7, 4096), (64, 8192), (257, 4096), (1030, 1024), (3, 16384)]
    for i, (T, H) in enumerate(shapes):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for shard_in, shard_out in _LAYOUTS:
                taken.add(run_case(h, 100 + i, T, H, dtype, shard_in, shard_out, integer=True, device=dev))
                taken.add(run_case(h, 200 + i, T, H, dtype, shard_in, shard_out, integer=False, device=dev))
    torch.cuda.synchronize()
    pads = h.signal_pads_zero()
    assert pads, f"rank {h.rank}: signal pads not zero after the calls"
    return sorted(taken), h.describe()


@gpu
@needs_cuda
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("path", [None, "symm", "allreduce", "rs_ag"])
def test_gpu_paths(world, path):
    out = run_gpu_world(world, "_gpu_paths", path)
    taken, info = out[0]
    print(f"world {world} path {path}: took {taken}; {info}")
    if path in (None, "symm"):
        assert info["base_path"] in ("symm", "multimem"), info
        assert "symm_oneshot" in taken and ("symm_twoshot" in taken or "multimem" in taken), taken
    else:
        assert taken == [path], taken


def _gpu_graph_and_back_to_back():
    """Capture two fused calls (both slots) in a CUDA graph, replay with new inputs; then 200
    back-to-back eager calls alternating slots and token counts; pads zero after."""
    dev = torch.device("cuda", 0)
    cfg = TokenWeaveConfig(path="symm", one_shot_max_tokens=16, timeout_s=30)
    h = AllReduceRMSNorm(dist.group.WORLD, dev, cfg)
    W, r = h.world_size, h.rank
    dtype = torch.bfloat16
    T, H = 96, 4096
    h.reserve(T, H, dtype)
    x0, x1 = h.input_buffer(T, H, dtype, 0), h.input_buffer(8, H, dtype, 1)
    res0 = torch.zeros(T, H, dtype=dtype, device=dev)
    res1 = torch.zeros(8, H, dtype=dtype, device=dev)
    w = torch.ones(H, dtype=dtype, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        h(x0, res0, w, 1e-6, slot=0, copy_out=False)
        h(x1, res1, w, 1e-6, slot=1, copy_out=False)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y0, nr0 = h(x0, res0, w, 1e-6, slot=0)
        y1, nr1 = h(x1, res1, w, 1e-6, slot=1)
    for it in range(5):
        xs, res, ww = make_inputs(50 + it, W, T, H, dtype, integer=True, device=dev)
        x0.copy_(xs[r])
        res0.copy_(res)
        w.copy_(ww)
        xs1, res_1, _ = make_inputs(80 + it, W, 8, H, dtype, integer=True, device=dev)
        x1.copy_(xs1[r])
        res1.copy_(res_1)
        torch.cuda.synchronize()
        dist.barrier()  # every rank's inputs are in place before any replay reads them
        g.replay()
        torch.cuda.synchronize()
        y_ref, r_ref = reference(xs, res, ww, 1e-6)
        assert torch.equal(nr0.double(), r_ref), f"replay {it}: residual (slot 0) not exact"
        check_close(f"replay {it} y0", y0, y_ref, eager_same_dtype(xs, res, ww, 1e-6)[0], dtype)
        y1_ref, r1_ref = reference(xs1, res_1, ww, 1e-6)
        assert torch.equal(nr1.double(), r1_ref), f"replay {it}: residual (slot 1) not exact"
        check_close(f"replay {it} y1", y1, y1_ref, eager_same_dtype(xs1, res_1, ww, 1e-6)[0], dtype)
        dist.barrier()
    zero = h.signal_pads_zero()
    dist.barrier()  # before any rank's next call writes into a peer's pad
    assert zero, "pads not zero after graph replays"
    # back-to-back eager calls, no host sync in between
    outs = []
    for i in range(200):
        Ti = (3, 64, 513)[i % 3]
        xs, res, ww = make_inputs(i % 7, W, Ti, 1024, dtype, integer=True, device=dev)
        outs.append((Ti, i % 7, h(xs[r], res, ww, 1e-6, slot=i % 2)))
    torch.cuda.synchronize()
    for Ti, seed, (y, nr) in outs:
        xs, res, ww = make_inputs(seed, W, Ti, 1024, dtype, integer=True, device=dev)
        assert torch.equal(nr.double(), reference(xs, res, ww, 1e-6)[1]), f"back-to-back T={Ti} seed={seed}"
    assert h.signal_pads_zero(), "pads not zero after back-to-back calls"
    return "ok"


@gpu
@needs_cuda
@pytest.mark.parametrize("world", [2, 4])
def test_gpu_graph_capture_and_back_to_back(world):
    assert run_gpu_world(world, "_gpu_graph_and_back_to_back") == ["ok"] * world


def _gpu_fallback_reasons(allow_overlap):
    if not allow_overlap:
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "0"
    h = AllReduceRMSNorm(dist.group.WORLD, torch.device("cuda", 0), TokenWeaveConfig())
    return h.describe()


@gpu
@needs_cuda
def test_gpu_ranks_that_cannot_share_memory_fall_back_and_say_why():
    info = run_gpu_world(2, "_gpu_fallback_reasons", False)[0]
    assert info["base_path"] == "allreduce" and "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES" in info["reason"], info
    info = run_gpu_world(2, "_gpu_fallback_reasons", True)[0]
    print("tokenweave environment:", info)  # torch, symm backend, multicast, pad and workspace sizes
    assert info["base_path"] in ("symm", "multimem"), info
    if not info["multicast"]:
        print("multimem path: NOT exercised (multicast_ptr == 0 on this machine)")


def _gpu_bad(kind):
    dev = torch.device("cuda", 0)
    h = AllReduceRMSNorm(dist.group.WORLD, dev, TokenWeaveConfig(path="symm", timeout_s=3, one_shot_max_tokens=0))
    T = 64 if not (kind == "tokens" and h.rank == 1) else 63
    x = torch.ones(T, 1024, dtype=torch.bfloat16, device=dev)
    w = torch.ones(1024, dtype=torch.bfloat16, device=dev)
    if kind == "skip" and h.rank == 1:
        return "skipped"
    try:
        h(x, x.clone(), w)
        torch.cuda.synchronize()
        h(x, x.clone(), w)  # the status of the previous call is checked here
    except TokenWeaveError as e:
        return str(e)
    return "no error"


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["tokens", "skip"])
def test_gpu_bad_input_reports_not_hangs(kind):
    out = run_gpu_world(2, "_gpu_bad", kind, timeout=120)
    if kind == "tokens":
        assert all("call mismatch across ranks" in o for o in out), out
    else:
        assert "barrier timeout" in out[0] and "peer 1" in out[0], out


@needs_tw_op
@pytest.mark.parametrize("one_shot", [False, True])
def test_opcheck_single_rank(one_shot):
    """torch.library.opcheck on the op (schema mutations, fake kernel, AOT dispatch), one rank on
    host memory: with world size 1 the kernel writes only what the schema declares (y_out, residual_out)."""
    T, H = 5, 24
    reg = 256
    buf = torch.zeros(3 * reg * 4, dtype=torch.uint8)  # in | out | res regions (fp32 5 x 24 = 480 B each)
    pad = torch.zeros(4096, dtype=torch.uint8)
    ptrs = torch.tensor([buf.data_ptr()], dtype=torch.int64)
    pads = torch.tensor([pad.data_ptr()], dtype=torch.int64)
    status = torch.zeros(8, dtype=torch.int32)
    region = 2 * reg  # bytes per region, >= 480 and 16-aligned

    def view(i):
        return buf[i * region : i * region + T * H * 4].view(torch.float32).view(T, H)

    local_in, y_out, res_out = view(0), view(1), view(2)
    local_in.copy_(torch.randn(T, H))
    residual = torch.randn(T, H)
    weight = torch.rand(H) + 0.5
    mode = far._MODE_RES_IN_FULL | far._MODE_RES_OUT_GATHER | (far._MODE_ONE_SHOT if one_shot else 0)
    args = (local_in, y_out, residual, res_out, weight, ptrs.data_ptr(), pads.data_ptr(), 0, 0, 1,
            0, region, 2 * region, 0, 4, mode, 1e-6, 10**9, status.data_ptr())  # fmt: skip
    torch.library.opcheck(torch.ops.ringattn.tw_fused_allreduce_rmsnorm_.default, args)
    torch.ops.ringattn.tw_fused_allreduce_rmsnorm_.default(*args)
    y_ref, r_ref = reference([local_in], residual, weight, 1e-6)
    torch.testing.assert_close(res_out.double(), r_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_out.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert int(status[0]) == 0 and bool((pad == 0).all()), "status set or signal pad not reset"
