"""Ring attention and TokenRing on real gloo processes (W = 1, 2, 3, 4) against a single-process
float64 reference: forward (out, lse) and backward (dq, dk, dv with a random upstream gradient),
every algorithm x causal x layout x MHA/GQA/MQA x even/uneven length x batch 1/2 x fp32/bf16,
plus the bytes each rank sent/received against the formula of docs/sequence_parallel.md.

Every rank builds the same seeded full inputs, computes the full reference itself, runs the
distributed op on its shard and compares its rows. All cases of one world size run inside ONE
pool.run (spawning processes costs seconds); the worker returns a list of failures with their
errors, and the test asserts it is empty.
"""
import contextlib
import functools
import math

import pytest
import torch
import torch.distributed as dist

import ringattn.sequence_parallel as sp
from ringattn.accounting import comm_stats

WORLD_SIZES = (1, 2, 3, 4)
ALGORITHMS = ("ring", "token_ring")
LAYOUTS = ("contiguous", "zigzag")
HEADS = ((4, 4), (4, 2), (4, 1))  # (heads_q, heads_kv): MHA, GQA, MQA
DTYPES = (torch.float32, torch.bfloat16)

# Error bound per dtype: |got - ref| <= atol + rtol * |ref| (ref: float64 on the same rounded
# inputs). fp32: the ring merges W partial softmaxes in another order than one softmax and the
# math kernel works in fp32: rounding only (measured <= 1.5e-6 absolute at W = 2 and 4) -> 2e-5.
# bf16: every block's partial out is rounded to bf16 before the fp32 merge and every result is
# rounded to bf16 once more (2^-9 relative each; gradients reach |x| ~ 5, so one rounding alone
# is up to 1.6e-2): measured <= 2.4e-2 absolute at W = 2 and 4. The partial roundings add up
# with the number of blocks, so the bound grows with W: (2e-2 + 2e-2 |ref|) * (1 + W/4).
def tolerance(dtype, world):
    if dtype == torch.float32:
        return 2e-5, 2e-5
    return 2e-2 * (1 + world / 4), 2e-2 * (1 + world / 4)


def positions(seq_len, world, layout, rank):
    """Global positions of rank's tokens, computed here independently of ringattn.layout."""
    parts = world if layout == "contiguous" else 2 * world
    sizes = [seq_len // parts + (i < seq_len % parts) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
    return torch.cat([torch.arange(starts[c], starts[c] + sizes[c]) for c in chunks])


def reference(q, k, v, causal, scale, softcap=None):
    """Plain softmax attention over the full sequence in float64: out (B,L,Hq,D), lse (B,Hq,L).
    softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if causal:
        L = q.shape[1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv), lse


def lengths_for(world):
    # even: divisible by W and 2W; uneven: 7W-1 leaves W-1 extra tokens for both layouts.
    return {"even": 6 * world, "uneven": 7 * world - 1}


def all_cases(world):
    cases = []
    i = 0
    for dtype in DTYPES:
        for alg in ALGORITHMS:
            for causal in (False, True):
                for layout in LAYOUTS:
                    for hq, hkv in HEADS:
                        for kind, seq_len in lengths_for(world).items():
                            for batch in (1, 2):
                                cases.append(dict(alg=alg, causal=causal, layout=layout, hq=hq, hkv=hkv,
                                                  seq_len=seq_len, batch=batch, dtype=dtype,
                                                  head_dim=8 if i % 3 else 16, return_lse=i % 2 == 0, seed=i))
                                i += 1
    return cases


def run_case(c, group=None, check_bytes=True, device="cpu"):
    """One case on this rank (its shard on `device`); returns a failure string or None."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    B, L, Hq, Hkv, D, dtype = c["batch"], c["seq_len"], c["hq"], c["hkv"], c["head_dim"], c["dtype"]
    Dv = c.get("v_head_dim", D)  # v's head dim (MLA: may differ from q/k's)
    gen = torch.Generator().manual_seed(1000 + c["seed"])
    q, dout = (torch.randn(B, L, Hq, d, generator=gen).to(dtype) for d in (D, Dv))
    k, v = (torch.randn(B, L, Hkv, d, generator=gen).to(dtype) for d in (D, Dv))
    scale = 1.0 / math.sqrt(D)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*ref, c["causal"], scale, c.get("softcap"))
    ref_out.backward(dout.double())

    pos = positions(L, world, c["layout"], rank)
    loc = [t[:, pos].to(device).requires_grad_() for t in (q, k, v)]
    fn = {"ring": sp.ring_attention, "token_ring": sp.token_ring_attention, "ulysses": sp.ulysses_attention}[c["alg"]]
    with comm_stats() as st:
        extra = {"softcap": c["softcap"]} if c.get("softcap") is not None else {}
        res = fn(*loc, causal=c["causal"], group=group, layout=c["layout"], return_lse=c["return_lse"], **extra)
        out, lse = res if c["return_lse"] else (res, None)
        out.backward(dout[:, pos].to(device))

    atol, rtol = tolerance(dtype, world)
    errors = []
    pairs = [("out", out, ref_out[:, pos])] + [(f"d{n}", t.grad, r.grad[:, pos]) for n, t, r in zip("qkv", loc, ref)]
    if lse is not None:
        pairs.append(("lse", lse, ref_lse[:, :, pos]))
    for name, got, want in pairs:
        if got is None or got.shape != want.shape:
            errors.append(f"{name}: shape {None if got is None else tuple(got.shape)} != {tuple(want.shape)}")
            continue
        if got.dtype != (torch.float32 if name == "lse" else dtype):
            errors.append(f"{name}: dtype {got.dtype}")
        err = (got.detach().cpu().double() - want).abs()
        ratio = (err / (atol + rtol * want.abs())).max().item()
        if not ratio <= 1.0:
            errors.append(f"{name}: max abs err {err.max().item():.3g} ({ratio:.2f}x the bound)")
    if check_bytes:
        want_bytes = sp.predict_comm_bytes(c["alg"], seq_len=L, world_size=world, layout=c["layout"],
                                           causal=c["causal"], batch=B, heads_q=Hq, heads_kv=Hkv, head_dim=D,
                                           dtype=dtype, backward=True, v_head_dim=Dv)[rank]
        got_bytes = {ch: (st.sent_by_channel[ch], st.recv_by_channel[ch])
                     for ch in set(st.sent_by_channel) | set(st.recv_by_channel)}
        if {ch: b for ch, b in got_bytes.items() if b != (0, 0)} != {ch: b for ch, b in want_bytes.items() if b != (0, 0)}:
            errors.append(f"bytes {got_bytes} != formula {want_bytes}")
    if errors:
        shown = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in c.items()}
        return f"rank {rank} {shown}: " + "; ".join(errors)
    return None


def _run_all(world):
    failures = [f for c in all_cases(world) if (f := run_case(c)) is not None]
    return failures


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_matrix_against_float64_reference(dist_pool, world):
    results = dist_pool(world).run(_run_all, world, timeout=240)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, f"{len(failures)} failing (rank, case)s:\n" + "\n".join(failures[:40])


# --- v's head dim differs from q/k's (MLA: DeepSeek's 192 / 128; ringattn.head_dims) -----------
def _run_mla(world):
    cases, i = [], 0
    for dtype in DTYPES:
        for alg in ALGORITHMS + ("ulysses",):
            for layout in LAYOUTS:
                for d, dv in ((24, 16), (8, 16)):  # v narrower (DeepSeek) and wider
                    hq, hkv = (6, 3) if world == 3 else (4, 2)  # (Ulysses splits heads over the group)
                    cases.append(dict(alg=alg, causal=i % 4 != 3, layout=layout, hq=hq, hkv=hkv,
                                      seq_len=5 * world + 1, batch=1 + i % 2, dtype=dtype, head_dim=d,
                                      v_head_dim=dv, return_lse=i % 2 == 0, seed=900 + i))
                    i += 1
    return [f for c in cases if (f := run_case(c)) is not None]


@pytest.mark.parametrize("world", (2, 3))
def test_v_head_dim_differs_from_qk(dist_pool, world):
    """out (B, n, Hq, Dv), lse, dq, dk, dv against float64 with random upstream gradients, every
    algorithm, both layouts, v narrower and wider than q/k; bytes = the formula on the padded dim."""
    failures = [f for r in dist_pool(world).run(_run_mla, world, timeout=180) for f in r]
    assert not failures, "\n".join(failures)


# --- logit softcapping (Gemma 2): every score s -> c * tanh(s / c) ------------------------------
def _run_softcap(world):
    cases, i = [], 0
    for dtype in DTYPES:
        for alg in ALGORITHMS + ("ulysses",):
            for layout in LAYOUTS:
                for causal in (True, False):
                    hq, hkv = (6, 3) if world == 3 else (4, 2)
                    # c = 1.5: scores ~ N(0, 1) after the scale, so the tanh bends most of them
                    cases.append(dict(alg=alg, causal=causal, layout=layout, hq=hq, hkv=hkv, seq_len=5 * world + 1,
                                      batch=1 + i % 2, dtype=dtype, head_dim=8, return_lse=i % 2 == 0,
                                      softcap=1.5 if i % 3 else 2, seed=700 + i))
                    i += 1
    cases.append(dict(cases[1], head_dim=24, v_head_dim=16, seed=799))  # with MLA's head dims
    return [f for c in cases if (f := run_case(c)) is not None]


@pytest.mark.parametrize("world", (2, 3))
def test_softcap_matches_float64(dist_pool, world):
    """softcap= against float64 softcapped attention with random upstream gradients: out, lse, dq,
    dk, dv, every algorithm and layout, causal or not, fp32 / bf16; bytes unchanged (the formula)."""
    failures = [f for r in dist_pool(world).run(_run_softcap, world, timeout=180) for f in r]
    assert not failures, "\n".join(failures)


def test_softcap_reference_differs_from_plain_attention():
    """At the sizes above the cap matters (so a ring that dropped it would fail them): the capped
    float64 reference is far from the plain one, out and lse."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 11, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    a, la = reference(q, k, v, True, 8 ** -0.5, 1.5)
    b, lb = reference(q, k, v, True, 8 ** -0.5)
    assert (a - b).abs().max() > 0.05 and (la - lb).abs().max() > 0.1


# --- edge lengths: the shortest sequences (chunks of one token), uneven by one ------------------
def _run_edges(world):
    cases, i = [], 0
    for alg in ALGORITHMS:
        for layout in LAYOUTS:
            shortest = world if layout == "contiguous" else 2 * world
            for seq_len in (shortest, shortest + 1):
                for causal in (False, True):
                    cases.append(dict(alg=alg, causal=causal, layout=layout, hq=2, hkv=1, seq_len=seq_len,
                                      batch=2, dtype=torch.float32, head_dim=8, return_lse=True, seed=500 + i))
                    i += 1
    return [f for c in cases if (f := run_case(c)) is not None]


@pytest.mark.parametrize("world", (3, 4))
def test_shortest_sequences(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_edges, world, timeout=120) for f in r]
    assert not failures, "\n".join(failures)


# --- sub-groups: ranks [1, 2] of 4, and [0, 2] / [1, 3] side by side (rings and Ulysses) --------
def _run_subgroups():
    rank = dist.get_rank()
    g12 = dist.new_group([1, 2])           # every rank of the world creates every group
    g02, g13 = dist.new_group([0, 2]), dist.new_group([1, 3])
    failures = []
    case = dict(causal=True, layout="zigzag", hq=4, hkv=2, seq_len=11, batch=2, dtype=torch.float32,
                head_dim=8, return_lse=True)
    for i, alg in enumerate(ALGORITHMS + ("ulysses",)):
        if rank in (1, 2):
            failures.append(run_case(dict(case, alg=alg, seed=700 + i), group=g12))
        pair = g02 if rank in (0, 2) else g13
        # The two pairs run concurrently with different data (different seeds per pair).
        failures.append(run_case(dict(case, alg=alg, causal=False, seed=710 + i + 10 * (rank % 2)), group=pair))
    # A registered second communicator for each pair (made by every rank of the world at setup).
    from ringattn.comm import register_reply_group, reply_group
    r02, r13 = dist.new_group([0, 2]), dist.new_group([1, 3])
    pair, reply = (g02, r02) if rank in (0, 2) else (g13, r13)
    register_reply_group(pair, reply)
    if reply_group(pair, torch.device("cpu")) is not reply:
        failures.append(f"rank {rank}: the registered reply group is not used")
    with comm_stats() as st:
        failures.append(run_case(dict(case, alg="token_ring", seed=720 + rank % 2), group=pair))
    if set(st.sent_by_channel) != {"fwd.q", "fwd.partial", "bwd.q", "bwd.dq"}:
        failures.append(f"rank {rank}: channels {dict(st.sent_by_channel)}")
    return [f for f in failures if f is not None]


def test_sub_groups(dist_pool):
    failures = [f for r in dist_pool(4).run(_run_subgroups, timeout=120) for f in r]
    assert not failures, "\n".join(failures)


# --- algorithm="auto" ----------------------------------------------------------------------------
def test_auto_rule_follows_the_cost_model_and_bytes_inside_its_margin():
    # (auto follows ringattn.cost_model since 2026-12-01; the grid check is tests/test_cost_model.py)
    # Between the two rings (candidates=sp.ALGORITHMS, what auto weighs under torch.compile):
    kw = dict(seq_len=4096, world_size=4, layout="zigzag", causal=True, batch=1, head_dim=128, dtype=torch.bfloat16,
              candidates=sp.ALGORITHMS)
    gqa = sp.choose_algorithm(heads_q=32, heads_kv=8, **kw)
    assert gqa.algorithm == "ring", gqa
    assert gqa.predicted_bytes["ring"] < gqa.predicted_bytes["token_ring"]
    # MHA with a backward: TokenRing moves half the bytes (ring's fp32 dK/dV travel). That wins
    # where the link is the bottleneck (PCIe behind one host bridge: predicted ~2x) ...
    mha = sp.choose_algorithm(heads_q=32, heads_kv=32, topology="pcie", **kw)
    assert mha.algorithm == "token_ring", mha
    # ... while on NVSwitch at 4k tokens the steps are compute-bound and TokenRing's last partial
    # is not hidden: the model predicts ring ~4% faster, inside the 5% margin, so bytes decide.
    nvs = sp.choose_algorithm(heads_q=32, heads_kv=32, **kw)
    assert nvs.algorithm == "token_ring" and nvs.topology == "nvswitch", nvs
    assert "rings within 5%" in nvs.reason and 1.0 < nvs.predicted_s["token_ring"] / nvs.predicted_s["ring"] < 1.05, nvs
    assert nvs.predicted_bytes["token_ring"] < nvs.predicted_bytes["ring"]
    # Forward only, MHA, non-causal: TokenRing's exposed first/last transfers again: ring.
    fwd = sp.choose_algorithm(heads_q=32, heads_kv=32, **dict(kw, causal=False, layout="contiguous"), backward=False)
    assert fwd.algorithm == "ring", fwd
    assert sp.choose_algorithm(heads_q=32, heads_kv=32, **dict(kw, world_size=1)).algorithm == "ring"
    # W = 16 is two 8-GPU nodes; the old rule (ring for any W > 8) is gone: at 4k tokens the model
    # predicts the two within 5%, so bytes decide (TokenRing); at 32k TokenRing is predicted faster.
    w16 = sp.choose_algorithm(heads_q=32, heads_kv=32, **dict(kw, world_size=16))
    assert w16.topology == "inter_node" and w16.algorithm == "token_ring", w16
    assert sp.choose_algorithm(heads_q=32, heads_kv=32, **dict(kw, world_size=16, seq_len=32768)).reason.startswith(
        "cost model (h100_bf16, inter_node): TokenRing predicted")
    # With Ulysses a candidate (the default): it is picked only when predicted faster than both
    # rings by more than the margin -- at 4k tokens its one attention per rank over the whole
    # sequence (Hq/W heads) beats W small ring blocks by the model's account (their per-call
    # intercepts; docs/cost_model.md), and its all-to-alls do not grow with W.
    full = dict(kw, candidates=sp.AUTO_CANDIDATES)
    uly = sp.choose_algorithm(heads_q=32, heads_kv=8, **full)
    assert uly.algorithm == "ulysses" and uly.reason.startswith("cost model (h100_bf16, nvswitch): Ulysses predicted"), uly
    assert uly.predicted_s["ulysses"] * (1 + sp.AUTO_MARGIN) < min(uly.predicted_s["ring"], uly.predicted_s["token_ring"])
    assert {a: uly.predicted_s[a] for a in sp.ALGORITHMS} == gqa.predicted_s
    # heads it cannot split: the rings only (the same choice as without it)
    odd = sp.choose_algorithm(heads_q=30, heads_kv=10, **full)
    assert set(odd.predicted_s) == {"ring", "token_ring"}
    assert odd == sp.choose_algorithm(heads_q=30, heads_kv=10, **kw)
    # a long sequence on one NVSwitch node: the ring steps hide their transfers, Ulysses' are
    # exposed; not 5% faster than the rings, so a ring runs
    long = sp.choose_algorithm(heads_q=32, heads_kv=8, **dict(full, seq_len=1 << 20, world_size=8))
    assert long.algorithm in sp.ALGORITHMS and "Ulysses not 5% faster than both" in long.reason, long
    # predicted_bytes is the bottleneck rank's max(sent, received) of predict_comm_bytes
    per_rank = sp.predict_comm_bytes("token_ring", heads_q=32, heads_kv=32,
                                     **{a: b for a, b in kw.items() if a != "candidates"})
    assert mha.predicted_bytes["token_ring"] == max(max(sum(s for s, _ in c.values()), sum(r for _, r in c.values()))
                                                    for c in per_rank)


def _ran(st) -> str:
    """Which algorithm a call ran, from its comm_stats channels."""
    used = set(st.sent_by_channel) | set(st.recv_by_channel)
    return "ring" if {"fwd.kv", "bwd.kv"} & used else "ulysses" if "fwd.a2a" in used else "token_ring"


def _run_auto():
    import ringattn

    rank, world = dist.get_rank(), dist.get_world_size()
    seen = []
    for hardware in (None, "h100"):  # the CPU default (these are CPU tensors), then the H100 profile
        for hq, hkv in ((4, 4), (4, 1)):
            L = 13
            pos = positions(L, world, "zigzag", rank)
            gen = torch.Generator().manual_seed(3)
            q = torch.randn(1, L, hq, 8, generator=gen)[:, pos].requires_grad_()
            k, v = (torch.randn(1, L, hkv, 8, generator=gen)[:, pos].requires_grad_() for _ in range(2))
            with ringattn.auto_hardware(hardware), comm_stats() as st:
                sp.sequence_parallel_attention(q, k, v, causal=True, layout="zigzag").sum().backward()
            want = sp.choose_algorithm(seq_len=L, world_size=world, layout="zigzag", causal=True, batch=1, heads_q=hq,
                                       heads_kv=hkv, head_dim=8, dtype=torch.float32, backward=True,
                                       hardware=hardware or "cpu").algorithm
            seen.append((hq, hkv, want, _ran(st)))
    return seen


def test_auto_runs_the_predicted_choice(dist_pool):
    ran_any = set()
    for world in (3, 4):
        for per_rank in dist_pool(world).run(_run_auto, timeout=60):
            assert all(want == ran for _, _, want, ran in per_rank), per_rank
            ran_any |= {ran for _, _, _, ran in per_rank}
    assert ran_any == {"ring", "token_ring", "ulysses"}, ran_any  # each occurs (W=3 cannot split 4 heads)


# --- lse without a backward, no grad mode --------------------------------------------------------
def _run_no_grad():
    rank, world = dist.get_rank(), dist.get_world_size()
    L = 10
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, L, 2, 8, generator=gen) for _ in range(3))
    ref_out, ref_lse = reference(q.double(), k.double(), v.double(), True, 8 ** -0.5)
    pos = positions(L, world, "zigzag", rank)
    errs = []
    with torch.no_grad():
        for alg in ALGORITHMS:
            out, lse = sp.sequence_parallel_attention(q[:, pos], k[:, pos], v[:, pos], causal=True, layout="zigzag",
                                                      algorithm=alg, return_lse=True)
            errs.append(max((out.double() - ref_out[:, pos]).abs().max().item(),
                            (lse.double() - ref_lse[:, :, pos]).abs().max().item()))
    return errs


def test_forward_only_under_no_grad(dist_pool):
    for errs in dist_pool(2).run(_run_no_grad, timeout=60):
        assert max(errs) < 2e-5, errs


# --- another transport under the same schedules: CudaIpcTransport ---------------------------------
# CPU tier: its host simulation (the same protocol, host memory). GPU tier (scripts/gpu_check.sh):
# the real thing, W ranks sharing one GPU (NCCL refuses that, gloo cannot send CUDA tensors), with
# the fused block-attention kernels picked by backend="auto".
def _torch_merge_for_cuda_if_missing():
    """Until csrc has a CUDA merge_attn_states_ kernel: the same math in torch ops, registered
    for CUDA in this worker only (what is under test here is the schedule and the transport)."""
    import ringattn.ops  # noqa: F401  (loads the op schemas)

    if torch._C._dispatch_has_kernel_for_dispatch_key("ringattn::merge_attn_states_", "CUDA"):
        return

    def merge_(acc_out, acc_lse, part_out, part_lse):  # (B,S,H,D) fp32, (B,H,S) fp32, part, part
        lse = torch.logaddexp(acc_lse, part_lse.float())
        safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)  # empty rows stay 0
        wa = torch.exp(acc_lse - safe).transpose(1, 2).unsqueeze(-1)
        wb = torch.exp(part_lse.float() - safe).transpose(1, 2).unsqueeze(-1)
        acc_out.copy_(acc_out * wa + part_out.float() * wb)
        acc_lse.copy_(lse)

    torch.library.impl("ringattn::merge_attn_states_", "cuda")(merge_)


@contextlib.contextmanager
def ipc_transports(kind, slots=4):
    """Every P2PComm channel of this worker over CudaIpcTransport: kind "host-sim" (CPU) or "cuda"
    (ranks sharing cuda:0). Yields the device the inputs go on."""
    import ringattn.comm as comm
    from ringattn.transport import CudaIpcTransport

    device = "cpu"
    if kind == "cuda":
        torch.cuda.set_device(0)
        device = "cuda"
        _torch_merge_for_cuda_if_missing()
    transports = {}

    def factory(group, channel):  # one transport (own inboxes) per channel and group
        key = (id(group), channel)
        if key not in transports:
            kw = dict(device=torch.device("cuda", 0)) if kind == "cuda" else dict(_backend="host-sim")
            transports[key] = CudaIpcTransport(group=group, slots=slots, timeout_s=60, **kw)
        return transports[key]

    comm.set_transport_factory(factory)
    try:
        yield device
    finally:
        comm.set_transport_factory(None)
        for t in transports.values():
            t.close()


def _run_over_ipc(kind):
    with ipc_transports(kind) as device:
        cases = all_cases(dist.get_world_size())[:: 3 if kind == "cuda" else 11]
        # + MLA head dims (q/k 24, v 16: the kernels run each block zero-padded, v travels with 16)
        cases += [dict(c, head_dim=24, v_head_dim=16, seed=c["seed"] + 5000) for c in cases[1:3]]
        failures = [f for c in cases if (f := run_case(c, device=device)) is not None]
    return failures, len(cases)


@pytest.mark.parametrize("world", (2, 3))
def test_cuda_ipc_transport_host_simulation_carries_both_algorithms(dist_pool, world):
    results = dist_pool(world).run(_run_over_ipc, "host-sim", timeout=180)
    failures = [f for fails, _ in results for f in fails]
    assert not failures and results[0][1] >= 16, failures


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", (2, 4))
def test_gpu_cuda_ipc_ranks_sharing_one_gpu(world):
    from dist_pool import DistPool

    pool = DistPool(world, pg_timeout_s=120)
    try:
        results = pool.run(_run_over_ipc, "cuda", timeout=150)  # below pytest-timeout (180 s in gpu_check)
    finally:
        pool.close()
    failures = [f for fails, _ in results for f in fails]
    assert not failures, f"{len(failures)} failing:\n" + "\n".join(failures[:30])


# --- lse_grad=True: a differentiable lse (both algorithms; bytes include TokenRing's extra fp32) --
def _run_lse_grad(compiled=False):
    """compiled: each call through torch.compile(fullgraph=True) (tests/test_compile.py): the
    custom ops must run (once forward, once backward) and give the same float64-checked gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failures, i = [], 0
    if compiled:
        import ringattn.compiled as rc
    for dtype in DTYPES:
        for causal in (False, True):
            for layout in LAYOUTS:
                algs = [("ring", sp.ring_attention), ("token_ring", sp.token_ring_attention),
                        ("auto", sp.sequence_parallel_attention)]
                if not compiled and not sp.heads_problem(4, 2, world):  # (compiled, Ulysses breaks the graph)
                    algs.append(("ulysses", sp.ulysses_attention))
                for alg, fn in algs:
                    L = 7 * world - 1
                    gen = torch.Generator().manual_seed(1300 + i)
                    q, go = (torch.randn(2, L, 4, 8, generator=gen).to(dtype) for _ in range(2))
                    k, v = (torch.randn(2, L, 2, 8, generator=gen).to(dtype) for _ in range(2))
                    gl = torch.randn(2, 4, L, generator=gen)
                    go[:, 1] = 0  # a row whose out gradient is 0 while its lse gradient is not
                    only_rank0 = i % 4 == 3  # other ranks' losses do not use lse (their dlse is None)
                    i += 1
                    ref = [t.double().requires_grad_() for t in (q, k, v)]
                    ro, rl = reference(*ref, causal, 8 ** -0.5)
                    pos = positions(L, world, layout, rank)
                    use = [True] * world if not only_rank0 else [r == 0 for r in range(world)]
                    loss = (ro * go.double()).sum() + sum((rl[:, :, positions(L, world, layout, r)]
                                                           * gl[:, :, positions(L, world, layout, r)].double()).sum()
                                                          for r in range(world) if use[r])
                    loss.backward()
                    loc = [t[:, pos].clone().requires_grad_() for t in (q, k, v)]
                    call = functools.partial(fn, causal=causal, layout=layout, return_lse=True, lse_grad=True)
                    if compiled:
                        torch._dynamo.reset()  # a fresh compile per case (else the recompile limit)
                        call = torch.compile(call, fullgraph=True, backend="aot_eager")
                        before = dict(rc.CALLS)
                    with comm_stats() as st:
                        out, lse = call(*loc)
                        mine = (out.float() * go[:, pos]).sum() + ((lse * gl[:, :, pos]).sum() if use[rank] else 0)
                        mine.backward()
                    if compiled:
                        ran_ops = [rc.CALLS[n] - before.get(n, 0) for n in ("sp_attention", "sp_attention_backward")]
                        if ran_ops != [1, 1]:
                            failures.append(f"rank {rank} {alg}: compiled call ran the ops {ran_ops} times (want 1, 1)")
                    atol, rtol = tolerance(dtype, world)
                    for name, got, want in [(f"d{n}", t.grad, r.grad[:, pos]) for n, t, r in zip("qkv", loc, ref)]:
                        err = (got.double() - want).abs()
                        ratio = (err / (atol + rtol * want.abs())).max().item()
                        if not ratio <= 1.0:
                            failures.append(f"rank {rank} {dtype} causal={causal} {layout} {alg} only_rank0={only_rank0} "
                                            f"{name}: err {err.max().item():.3g} ({ratio:.2f}x the bound)")
                    ran = _ran(st)
                    if alg != "auto" and ran != alg and world > 1:
                        failures.append(f"rank {rank} {alg}: ran {ran}")
                    want = sp.predict_comm_bytes(ran, seq_len=L, world_size=world, layout=layout, causal=causal,
                                                 batch=2, heads_q=4, heads_kv=2, head_dim=8, dtype=dtype,
                                                 lse_grad=True)[rank]
                    got = {ch: (st.sent_by_channel[ch], st.recv_by_channel[ch])
                           for ch in set(st.sent_by_channel) | set(st.recv_by_channel)}
                    if {c: b for c, b in got.items() if b != (0, 0)} != {c: b for c, b in want.items() if b != (0, 0)}:
                        failures.append(f"rank {rank} {alg}: bytes {got} != formula {want}")
    return failures


@pytest.mark.parametrize("world", (2, 3))
def test_lse_grad_against_float64(dist_pool, world):
    failures = [f for r in dist_pool(world).run(_run_lse_grad, timeout=180) for f in r]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_gpu_lse_grad_with_the_fused_kernels(causal, alg):
    """The lse-gradient trick (v = 0, out = -g e_0) through the CUDA block kernels backend="auto"
    picks, a world of one, bf16 against float64."""
    gen = torch.Generator().manual_seed(77)
    L = 512
    q, go = (torch.randn(1, L, 8, 128, generator=gen).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, L, 2, 128, generator=gen).bfloat16() for _ in range(2))
    gl = torch.randn(1, 8, L, generator=gen)
    go[:, 5] = 0
    ref = [t.double().requires_grad_() for t in (q, k, v)]  # on the same bf16-rounded inputs
    ro, rl = reference(*ref, causal, 128 ** -0.5)
    ((ro * go.double()).sum() + (rl * gl.double()).sum()).backward()
    loc = [t.cuda().requires_grad_() for t in (q, k, v)]
    fn = sp.ring_attention if alg == "ring" else sp.token_ring_attention
    out, lse = fn(*loc, causal=causal, return_lse=True, lse_grad=True)
    ((out.float() * go.cuda()).sum() + (lse * gl.cuda()).sum()).backward()
    atol, rtol = tolerance(torch.bfloat16, 1)
    for name, t, r in zip("qkv", loc, ref):
        err = (t.grad.double().cpu() - r.grad).abs()
        assert (err <= atol + rtol * r.grad.abs()).all(), (name, err.max().item())


def test_comm_stats_contexts_nest():
    """Nested contexts each record, and leave in any order of equal counts (regression: the inner
    one's exit removed the outer, equal-valued, one and the outer's exit then failed)."""
    from ringattn import accounting

    with comm_stats() as outer:
        with comm_stats() as inner:      # equal (empty) when they exit
            pass
        accounting.record("fwd.kv", 1, 10, True)
    assert outer.sent_bytes == 10 and inner.sent_bytes == 0
    assert not accounting._ACTIVE
