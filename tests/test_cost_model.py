"""ringattn.cost_model: the simulated schedules send exactly the code's bytes, time properties
that follow from the schedules, auto agrees with the model, the H100 calibration reproduces the
measured rows. Pure Python (no tensors, no processes)."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import ringattn.sequence_parallel as sp
from ringattn import cost_model as cm
from ringattn.layout import SequenceLayout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_BLOCK_CSV = os.path.join(ROOT, "perf/results/2026-11-22_h100_bench_block_attention.csv")
H100_OPS_CSV = os.path.join(ROOT, "perf/results/2026-11-22_h100_bench_ops.csv")


def _perf_model():
    spec = importlib.util.spec_from_file_location("perf_model", os.path.join(ROOT, "perf/model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nonzero(per_rank):
    return [{ch: v for ch, v in d.items() if v != (0, 0)} for d in per_rank]


# --- bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", cm.ALGORITHMS)
@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("contiguous", True), ("zigzag", False),
                                           ("zigzag", True)])
def test_simulated_bytes_equal_predict_comm_bytes(alg, layout, causal):
    """Every message the simulated schedule posts, summed per rank and channel, equals the closed
    forms that tests/test_sequence_parallel.py checks against the real counters."""
    n = 0
    for W in range(1, 9):
        for L in sorted({2 * W, 2 * W + 1, 4 * W + 3, 96}):  # minimal, uneven, even
            for hq, hkv in ((4, 4), (6, 2), (4, 1)):
                for backward in (False, True):
                    kw = dict(seq_len=L, world_size=W, layout=layout, causal=causal, batch=2, heads_q=hq,
                              heads_kv=hkv, head_dim=8, dtype=torch.bfloat16, backward=backward)
                    got = _nonzero(cm.predict(alg, **kw).bytes)
                    want = _nonzero(sp.predict_comm_bytes(alg, **kw))
                    assert got == want, kw
                    n += 1
    assert n == 8 * 4 * 3 * 2  # the whole grid ran


# --- time properties -----------------------------------------------------------------------------
FREE_LINKS = cm.Topology("nvswitch", math.inf, 0.0, call_s=0.0)
ZERO_COMPUTE = cm.ComputeProfile("zero", "bfloat16", {(b, op, c): cm.Curve(0.0, math.inf) for b in ("cudnn",)
                                                      for op in ("fwd", "bwd") for c in (False, True)},
                                 cm.Curve(0.0, math.inf), {"auto": "cudnn"})
SHAPE = dict(batch=1, heads_q=32, heads_kv=8, head_dim=128, dtype=torch.bfloat16)


def test_infinite_bandwidth_total_is_the_compute_sum():
    """Free links, non-causal (every rank the same work): the call takes exactly the block
    attentions plus the fp32 passes around them, written out here from the ring loop."""
    W, L = 4, 16384
    prof = cm.H100_BF16
    n = L // W
    att = prof.attn_time("fwd", "auto", B=1, Hq=32, Sq=n, Sk=n, D=128, causal=False)
    el = n * 32 * 128
    want = (W * att + prof.mem_time(el * (2 + 4))                       # init fp32 accumulator
            + (W - 1) * prof.mem_time(n * 32 * (128 * (8 + 2) + 12))     # merges
            + prof.mem_time(el * (4 + 2)))                               # cast out
    for alg in cm.ALGORITHMS:
        p = cm.predict(alg, seq_len=L, world_size=W, backward=False, topology=FREE_LINKS, **SHAPE)
        assert p.total_s == pytest.approx(want, rel=1e-12), alg
        assert p.exposed_comm_s == pytest.approx(0.0, abs=1e-15)
        assert all(t == pytest.approx(want, rel=1e-12) for t in p.rank_total_s)


def test_zero_compute_total_is_the_comm_critical_path():
    """No compute: ring is W-1 hops of (latency + K and V through one port); TokenRing at W=2 is
    one Q transfer, then one partial (out + lse) back."""
    bw, lat = 100e9, 7e-6
    topo = cm.Topology("nvswitch", bw, lat, call_s=0.0)
    W, L = 4, 8192
    n = L // W
    kv = 2 * n * 8 * 128 * 2
    ring = cm.predict("ring", seq_len=L, world_size=W, backward=False, topology=topo, profile=ZERO_COMPUTE, **SHAPE)
    assert ring.total_s == pytest.approx((W - 1) * (lat + kv / bw), rel=1e-12)
    assert ring.compute_s == 0
    n2 = L // 2
    q, part = n2 * 32 * 128 * 2, n2 * 32 * (128 * 2 + 4)
    tr = cm.predict("token_ring", seq_len=L, world_size=2, backward=False, topology=topo, profile=ZERO_COMPUTE,
                    **SHAPE)
    assert tr.total_s == pytest.approx(2 * lat + (q + part) / bw, rel=1e-12)


def test_exposed_communication_is_what_the_schedules_leave_unhidden():
    """Compute-bound steps (H100, 256k tokens, NVSwitch): ring forward hides every transfer;
    ring's backward leaves the last dK/dV hop; TokenRing posts its first Q transfer before the
    diagonal block (hidden by it) and leaves only its last partial (forward) and its last dq
    partial (backward). Plus the metadata all_gather."""
    topo = cm.get_topology("nvswitch")
    W, L = 4, 262144
    n = L // W
    call = topo.call_overhead(W)
    x = lambda nbytes: topo.latency_s + nbytes / topo.link_bps  # noqa: E731  one port, alone in its phase
    kw = dict(seq_len=L, world_size=W, topology=topo, **SHAPE)
    assert cm.predict("ring", backward=False, **kw).exposed_comm_s == pytest.approx(call, rel=1e-9)
    assert cm.predict("ring", backward=True, **kw).exposed_comm_s == pytest.approx(
        call + x(2 * n * 8 * 128 * 4), rel=1e-9)
    t = n * 32
    fwd = x(t * (128 * 2 + 4))   # the last (out, lse) partial
    assert cm.predict("token_ring", backward=False, **kw).exposed_comm_s == pytest.approx(call + fwd, rel=1e-9)
    bwd = x(t * 128 * 4)         # the last fp32 dq partial
    assert cm.predict("token_ring", backward=True, **kw).exposed_comm_s == pytest.approx(
        call + fwd + bwd, rel=1e-9)


# --- Ulysses --------------------------------------------------------------------------------------
ULYSSES_HEADS = ((4, 4), (8, 2), (8, 1), (12, 6), (24, 4))


@pytest.mark.parametrize("layout,causal", [("contiguous", False), ("zigzag", True)])
def test_ulysses_simulated_bytes_equal_its_formula(layout, causal):
    """Ulysses' simulated all-to-alls move exactly ulysses_comm_bytes (what the real counters are
    checked against in tests/test_ulysses.py): KV heads shared by W/Hkv ranks (fp32 dK/dV), uneven
    lengths, batch > 1, masks (which do not change an all-to-all)."""
    n = 0
    for W in range(1, 9):
        for L in sorted({2 * W, 4 * W + 3, 97}):
            for hq, hkv in ULYSSES_HEADS:
                if sp.heads_problem(hq, hkv, W):
                    with pytest.raises(ValueError, match="algorithm='ulysses' splits the heads"):
                        cm.predict("ulysses", seq_len=L, world_size=W, heads_q=hq, heads_kv=hkv, head_dim=8)
                    continue
                for backward in (False, True):
                    for m in (dict(), dict(sliding_window=5), dict(cu_seqlens=[0, L // 2, L])) if causal else (dict(),):
                        kw = dict(seq_len=L, world_size=W, layout=layout, causal=causal, batch=2, heads_q=hq,
                                  heads_kv=hkv, head_dim=8, dtype=torch.bfloat16, backward=backward, **m)
                        got = _nonzero(cm.predict("ulysses", **kw).bytes)
                        assert got == _nonzero(sp.predict_comm_bytes("ulysses", **kw)), kw
                        n += 1
    assert n == (114 if not causal else 342)  # the whole grid ran


def test_ulysses_attention_is_the_world_one_ring_of_its_head_block():
    """Step 1 of each pass is the single-rank ring program over the whole sequence for Hq/W query
    heads and the rank's KV heads: the same blocks (the mask's pieces included) and the same
    compute as predict("ring", world_size=1) of that head block."""
    for W, hq, hkv, m in ((4, 32, 8, dict()), (8, 32, 4, dict(sliding_window=1000)),
                          (2, 16, 16, dict(cu_seqlens=[0, 3000, 8192]))):
        kw = dict(seq_len=8192, causal=True, batch=1, head_dim=128, dtype=torch.bfloat16, topology=FREE_LINKS)
        p = cm.predict("ulysses", world_size=W, layout="zigzag", heads_q=hq, heads_kv=hkv, **kw, **m)
        one = cm.predict("ring", world_size=1, heads_q=hq // W, heads_kv=max(hkv // W, 1), **kw, **m)
        for r, steps in enumerate(p.rank_steps):
            att = {st.pass_: st for st in steps if st.step == 1}
            for ps in ("fwd", "bwd"):
                want = [st for st in one.rank_steps[0] if st.pass_ == ps]
                assert att[ps].blocks == want[0].blocks, (W, r, ps)
                assert att[ps].compute_s == pytest.approx(sum(st.compute_s for st in want), rel=1e-12)
            assert [st.step for st in steps] == [0, 1, 2, 0, 1, 2]


def test_ulysses_hides_nothing():
    """Zero compute: each pass is its two all-to-alls, each latency + (a port's bytes) / bandwidth
    (the W-1 messages of a rank share its port). With compute: total = compute + those transfers
    + the call's metadata all_gather, exactly -- nothing is overlapped (symmetric ranks)."""
    bw, lat, call = 100e9, 7e-6, 30e-6
    W, L, hq_all, hkv_all, D = 4, 8192, 32, 8, 128
    n, hq, kv = L // W, hq_all // W, hkv_all // W
    a2a = (W - 1) * n * (hq + 2 * kv) * D * 2          # q, k, v pieces to the W-1 others
    out = (W - 1) * n * hq * (D * 2 + 4)               # out + fp32 lse back
    dout, dqkv = (W - 1) * n * hq * D * 2, a2a
    comm = {False: 2 * lat + (a2a + out) / bw, True: 4 * lat + (a2a + out + dout + dqkv) / bw}
    topo = cm.Topology("nvswitch", bw, lat, call_s=0.0)
    for backward in (False, True):
        kw = dict(seq_len=L, world_size=W, causal=False, batch=1, heads_q=hq_all, heads_kv=hkv_all, head_dim=D,
                  backward=backward)
        z = cm.predict("ulysses", topology=topo, profile=ZERO_COMPUTE, **kw)
        assert z.total_s == pytest.approx(comm[backward], rel=1e-12) and z.compute_s == 0
        full = cm.predict("ulysses", topology=cm.Topology("nvswitch", bw, lat, call_s=call), **kw)
        assert full.total_s == pytest.approx(full.compute_s + comm[backward] + call, rel=1e-12)
        assert full.exposed_comm_s == pytest.approx(comm[backward] + call, rel=1e-12)
    # a ring at the same shape hides its transfers behind compute: less exposed, more compute (its
    # W small blocks each pay the profile's per-call intercept, the merges between them)
    ring = cm.predict("ring", topology=topo, **kw)
    uly = cm.predict("ulysses", topology=topo, **kw)
    assert ring.exposed_comm_s < uly.exposed_comm_s and ring.compute_s > uly.compute_s


@pytest.mark.parametrize("L", [64, 67])  # even and uneven chunk tables
def test_causal_zigzag_block_shapes_per_step(L):
    """Written from the chunk table, not from layout.attention_block: at step s rank r's block is
    TokenRing: src = r-s's Q against our K/V -- we (the K/V owner) earlier than src: all of src's
    Q x our first chunk; we later: only src's late chunk x all of our K/V (the half-Q trick).
    Ring (K/V travel to r-1 in causal zigzag, RingPlan.direction = -1): our Q against the K/V of
    j = r+s -- j earlier: all our Q x j's first chunk; j later: our late chunk x all of j."""
    W = 4
    lay = SequenceLayout.build(L, W, "zigzag")
    c = lay.chunk_sizes
    n = [c[r] + c[2 * W - 1 - r] for r in range(W)]
    late = [c[2 * W - 1 - r] for r in range(W)]
    for alg in cm.ALGORITHMS:
        p = cm.predict(alg, seq_len=L, world_size=W, layout="zigzag", causal=True, backward=True, **SHAPE)
        for r, steps in enumerate(p.rank_steps):
            for st in steps:
                s = st.step
                if s == 0:
                    assert st.blocks == ((st.pass_, n[r], n[r], True),)
                    continue
                if alg == "token_ring":
                    o = (r - s) % W
                    want = (n[o], c[r]) if r < o else (late[o], n[r])
                else:
                    o = (r + s) % W
                    want = (n[r], c[o]) if o < r else (late[r], n[o])
                assert st.blocks == ((st.pass_,) + want + (False,),), (alg, r, st)


# --- auto follows the model ----------------------------------------------------------------------
def _auto_rule(secs: dict, nbytes: dict) -> str:
    """choose_algorithm's rule, written out: the faster ring beyond AUTO_MARGIN (else the one moving
    fewer bytes, ties ring), replaced by Ulysses only when it beats both rings beyond the margin."""
    tr, tt = secs["ring"], secs["token_ring"]
    if max(tr, tt) > (1 + sp.AUTO_MARGIN) * min(tr, tt):
        pick = "ring" if tr < tt else "token_ring"
    else:
        pick = "token_ring" if nbytes["token_ring"] < nbytes["ring"] else "ring"
    if "ulysses" in secs and min(tr, tt) > (1 + sp.AUTO_MARGIN) * secs["ulysses"]:
        pick = "ulysses"
    return pick


def test_auto_agrees_with_the_model():
    """Over a grid of realistic shapes, algorithm="auto" is _auto_rule applied to the model's
    predictions (Ulysses a candidate exactly where W splits the heads). And the model matters:
    between the rings it overrules the byte rule in some cells and confirms it in others, and each
    of the three algorithms is picked somewhere. With candidates = the rings (torch.compile),
    Ulysses is never picked and the rings' rule is unchanged."""
    overruled = confirmed = 0
    chosen = set()
    for topo in (None, "pcie"):
        for W in (2, 3, 4, 8, 16):
            for L in (8192, 131072):
                for hq, hkv in ((32, 32), (32, 8), (24, 8)):
                    for causal, layout in ((True, "zigzag"), (False, "contiguous")):
                        for backward in (False, True):
                            kw = dict(seq_len=L, world_size=W, layout=layout, causal=causal, batch=1, heads_q=hq,
                                      heads_kv=hkv, head_dim=128, dtype=torch.bfloat16, backward=backward)
                            choice = sp.choose_algorithm(**kw, topology=topo)
                            want_topo = topo or ("nvswitch" if W <= sp.MESH_MAX_WORLD else "inter_node")
                            c = cm.compare(**kw, topology=want_topo)
                            secs = {a: p.total_s for a, p in c.items()}
                            assert ("ulysses" in secs) == (hq % W == 0 and (hkv % W == 0 or W % hkv == 0)), kw
                            assert choice.predicted_s == secs
                            assert set(choice.predicted_bytes) == set(secs)
                            assert choice.algorithm == _auto_rule(secs, choice.predicted_bytes), (kw, topo, choice)
                            rings = sp.choose_algorithm(**kw, topology=topo, candidates=sp.ALGORITHMS)
                            ring_secs = {a: secs[a] for a in sp.ALGORITHMS}
                            assert rings.predicted_s == ring_secs
                            assert rings.algorithm == _auto_rule(ring_secs, rings.predicted_bytes)
                            tr, tt = secs["ring"], secs["token_ring"]
                            if max(tr, tt) > (1 + sp.AUTO_MARGIN) * min(tr, tt):
                                by_bytes = "token_ring" if choice.predicted_bytes["token_ring"] < \
                                    choice.predicted_bytes["ring"] else "ring"
                                overruled += rings.algorithm != by_bytes
                                confirmed += rings.algorithm == by_bytes
                            chosen.add(choice.algorithm)
    assert chosen == {"ring", "token_ring", "ulysses"}
    assert overruled > 0 and confirmed > 0, (overruled, confirmed)


def test_auto_candidates_are_checked():
    kw = dict(seq_len=8192, world_size=4, batch=1, heads_q=32, heads_kv=8, head_dim=128)
    for bad in (("ring",), ("ring", "token_ring", "striped"), ("ulysses",)):
        with pytest.raises(ValueError, match="candidates must hold 'ring' and 'token_ring'"):
            sp.choose_algorithm(**kw, candidates=bad)
    # heads Ulysses cannot split: the rings only, whatever the candidates say
    odd = sp.choose_algorithm(**dict(kw, heads_q=30, heads_kv=10))
    assert set(odd.predicted_s) == set(odd.predicted_bytes) == {"ring", "token_ring"}


def test_auto_rounds_the_length_and_skips_the_model_for_huge_worlds():
    kw = dict(world_size=8, layout="zigzag", causal=True, batch=1, heads_q=32, heads_kv=32, head_dim=128,
              dtype=torch.bfloat16, backward=True)
    assert cm.auto_seq_len(100000, 8, "zigzag") == 92682  # 2^16.5
    assert cm.auto_seq_len(131072, 8, "zigzag") == 131072 and cm.auto_seq_len(13, 8, "zigzag") == 16
    c = sp.choose_algorithm(seq_len=100000, **kw)
    want = cm.compare(seq_len=92682, topology="nvswitch", **kw)
    assert c.predicted_s == {a: p.total_s for a, p in want.items()}
    huge = sp.choose_algorithm(seq_len=1 << 20, **dict(kw, world_size=128))
    assert huge.predicted_s == {} and huge.reason.startswith("world size 128 > 64")
    assert huge.algorithm == ("token_ring" if huge.predicted_bytes["token_ring"] < huge.predicted_bytes["ring"]
                              else "ring")


def test_auto_is_cached_and_world_one_is_ring():
    kw = dict(seq_len=65536, world_size=8, layout="zigzag", causal=True, batch=1, heads_q=32, heads_kv=32,
              head_dim=128, dtype=torch.bfloat16, backward=True)
    first = sp.choose_algorithm(**kw)
    hits = sp._choose_algorithm.cache_info().hits
    assert sp.choose_algorithm(**kw) is first  # the whole choice is cached: it runs on every call
    assert sp._choose_algorithm.cache_info().hits == hits + 1
    # a length in the same quarter octave: a new choice (exact bytes), the model's run reused
    model_hits = cm.predicted_times.cache_info().hits
    other = sp.choose_algorithm(**dict(kw, seq_len=65536 + 64))
    assert cm.predicted_times.cache_info().hits == model_hits + 1
    assert other.predicted_s == first.predicted_s and other.predicted_bytes != first.predicted_bytes
    one = sp.choose_algorithm(**dict(kw, world_size=1))
    assert one.algorithm == "ring" and one.predicted_s == {}


# --- calibration ---------------------------------------------------------------------------------
def test_h100_fit_reproduces_the_measured_rows():
    """t = overhead + FLOPs/rate per (backend, op, causal), pooled over Hkv 32 and 8: every measured
    H100 row within 6% (the worst is cudnn causal fwd at S=16384, 5.0%: the Hkv=32 and Hkv=8 rows
    themselves differ by 10% there). The embedded default profile is that fit (to 0.5%)."""
    model = _perf_model()
    prof, btab, mtab = model.profile_from_csvs(H100_BLOCK_CSV, H100_OPS_CSV)
    assert len(btab) == 48  # 3 backends x 2 ops x 2 masks x 2 S x 2 Hkv
    worst = max(btab, key=lambda r: abs(r["rel_err"]))
    assert abs(worst["rel_err"]) <= 0.06, worst
    assert max(abs(r["rel_err"]) for r in mtab) <= 0.01, mtab
    assert prof.aliases == {"auto": "cudnn"}
    assert set(prof.attention) == set(cm.H100_BF16.attention)
    for key, curve in prof.attention.items():
        emb = cm.H100_BF16.attention[key]
        assert emb.overhead_s == pytest.approx(curve.overhead_s, rel=5e-3), key
        assert emb.rate == pytest.approx(curve.rate, rel=5e-3), key
    assert cm.H100_BF16.memory.rate == pytest.approx(prof.memory.rate, rel=5e-3)
    assert cm.H100_BF16.memory.overhead_s == pytest.approx(prof.memory.overhead_s, rel=5e-3)


def test_interpolating_curve_passes_through_its_points():
    pts = ((1e9, 1e-3), (4e9, 2e-3), (16e9, 10e-3))
    c = cm.Curve(0.5e-3, 2e12, pts)
    for w, t in pts:
        assert c.time(w) == pytest.approx(t, rel=1e-12)
    assert 1e-3 < c.time(2e9) < 2e-3
    assert c.time(32e9) == pytest.approx(10e-3 * c._fit(32e9) / c._fit(16e9), rel=1e-12)
    assert cm.ComputeProfile.from_json(cm.ComputeProfile("x", "f", {("m", "fwd", False): c}, c, {}).to_json()
                                       ).attention[("m", "fwd", False)] == c


def test_validate_predicts_each_row_with_its_own_topology():
    """perf/model.py validate: the measured local topology gets W*threads/cores ranks per core,
    shared_gpu W ranks per GPU, and the row's prediction is cost_model.predict of that row."""
    model = _perf_model()
    prof, topo, meta = model.load_profile(os.path.join(ROOT, "perf/results/2026-12-01_cost_model_cpu_profile.json"))
    assert topo.kind == "local" and meta["cores"] >= 1
    row = dict(algorithm="token_ring", resolved_algorithm="token_ring", world="4", seq_len="1030", batch="1",
               heads_q="4", heads_kv="2", head_dim="16", dtype="float32", causal="True", layout="zigzag",
               **{"pass": "fwd_bwd"}, ms_median="9.0", ms_min="8.0", error="")
    (v,) = model.validate([row], prof, topo, None, cores=2, threads=1)
    assert v["ranks_per_device"] == 2.0
    want = cm.predict("token_ring", seq_len=1030, world_size=4, layout="zigzag", causal=True, batch=1, heads_q=4,
                      heads_kv=2, head_dim=16, dtype=4, backward=True, profile=prof,
                      topology=model.topology_for_row(row, topo, None, 2, 1))
    assert v["predicted_ms"] == pytest.approx(want.total_s * 1e3, abs=1e-4)
    assert v["rel_err"] == pytest.approx(want.total_s * 1e3 / 8.0 - 1, abs=1e-4)  # against ms_min
    assert model.topology_for_row(row, topo, "shared_gpu", 2, 1).ranks_per_device == 4.0
    assert model.validate([dict(row, algorithm="allgather", resolved_algorithm="allgather")], prof, topo, None, 2, 1) == []


# --- masks: sliding windows and packed documents -------------------------------------------------
MASKS = [dict(sliding_window=5), dict(sliding_window=13), dict(cu_seqlens="thirds"),
         dict(cu_seqlens="thirds", sliding_window=7), dict(cu_seqlens="rows")]


def _mask(m, L):
    m = dict(m)
    if m.get("cu_seqlens") == "thirds":
        m["cu_seqlens"] = [0, L // 3, L // 2, L]
    elif m.get("cu_seqlens") == "rows":  # one packing per batch row
        m["cu_seqlens"] = [[0, L // 2, L], [0, 3, L]]
    return m


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_masked_simulated_bytes_equal_predict_comm_bytes(layout):
    """With a sliding window / packed documents the simulated schedules post exactly the bytes of
    the code's formulas: KV rotation's early stop (and the dK/dV sums' hop home), TokenRing's
    skipped pairs and trimmed Q rows."""
    n = 0
    for W in range(1, 7):
        for L in (4 * W + 3, 97):
            for m in MASKS:
                for backward in (False, True):
                    for alg in cm.ALGORITHMS:
                        kw = dict(seq_len=L, world_size=W, layout=layout, causal=True, batch=2, heads_q=4,
                                  heads_kv=2, head_dim=8, dtype=torch.bfloat16, backward=backward, **_mask(m, L))
                        assert _nonzero(cm.predict(alg, **kw).bytes) == _nonzero(sp.predict_comm_bytes(alg, **kw)), kw
                        n += 1
    assert n == 6 * 2 * len(MASKS) * 2 * 2


@pytest.mark.parametrize("alg", cm.ALGORITHMS)
def test_masked_blocks_are_the_codes_pieces(alg):
    """Each step computes the pieces RingPlan.block cuts for that pair (one attention per piece,
    anti-causal pieces as causal squares; per-row packings with their batch rows), and KV
    rotation runs steps 0..ring_steps only."""
    from ringattn.layout import RingPlan, SequenceLayout

    W, L = 4, 67
    for m in MASKS:
        mm = _mask(m, L)
        lay = SequenceLayout.build(L, W, "contiguous")
        docs = sp._documents_arg(mm.get("cu_seqlens"), L, 2)
        plan = RingPlan(None, 0, W, lay, True, 1.0, "auto", docs, mm.get("sliding_window"))
        p = cm.predict(alg, seq_len=L, world_size=W, causal=True, batch=2, heads_q=4, heads_kv=2, head_dim=8,
                       backward=True, **mm)
        for r, steps in enumerate(p.rank_steps):
            if alg == "ring":
                assert sorted({st.step for st in steps}) == list(range(plan.ring_steps + 1)), (m, r)
            for st in steps:
                pair = (r, (r - st.step) % W) if alg == "ring" else ((r - st.step) % W, r)
                blk = plan.block(*pair)
                if blk is None:
                    assert st.blocks == (), (m, r, st)
                    continue
                if not blk.pieces:
                    want = [(st.pass_, blk.q_len, blk.kv_len, blk.causal)]
                else:
                    whole = len(blk.pieces) == 1 and blk.pieces[0][:4] == (0, blk.q_len, 0, blk.kv_len) \
                        and not blk.pieces[0].nb and not blk.pieces[0].flip
                    want = [(st.pass_, pc.q_len, pc.kv_len, pc.causal or pc.flip)
                            + (((pc.nb or 2) * pc.tiles,) if (pc.nb or 2) * pc.tiles != 2 else ())
                            for pc in blk.pieces]
                    if whole:
                        want = [(st.pass_, blk.q_len, blk.kv_len, blk.pieces[0].causal)]
                assert list(st.blocks) == want, (m, r, st)
    assert any(b.pieces for b in plan._blocks.values() if b is not None)


def test_window_ring_stops_early_and_sends_home():
    """Contiguous, a window within one chunk: ring_steps = 1, and only the last w - 1 rows of a
    rank's K/V travel (RingPlan.kv_ranges; the last rank's none: nobody after it sees them). With
    no compute the forward is one hop of those rows (not W - 1 hops of whole chunks); the
    backward's K/V hop runs beside step 0's dK/dV sums (posted at the same instant, in different
    phases), then the sums go home after step 1: two dK/dV hops of w - 1 rows, whatever W."""
    bw, lat = 100e9, 7e-6
    topo = cm.Topology("nvswitch", bw, lat, call_s=0.0)
    L, w = 8192, 512
    for W in (2, 4):
        n = L // W
        kv, dkv = 2 * (w - 1) * 8 * 128 * 2, 2 * (w - 1) * 8 * 128 * 4
        kw = dict(seq_len=L, world_size=W, causal=True, topology=topo, profile=ZERO_COMPUTE, sliding_window=w,
                  **SHAPE)
        fwd = cm.predict("ring", backward=False, **kw)
        assert fwd.total_s == pytest.approx(lat + kv / bw, rel=1e-12)
        assert [b.get("fwd.kv", (0, 0)) for b in fwd.bytes] == [(kv, 0)] + [(kv, kv)] * (W - 2) + [(0, kv)]
        assert cm.predict("ring", backward=True, **kw).total_s == pytest.approx(
            (lat + kv / bw) + 2 * (lat + dkv / bw), rel=1e-12)
        full = cm.predict("ring", backward=False, **dict(kw, sliding_window=None))
        assert full.total_s == pytest.approx((W - 1) * (lat + 2 * n * 8 * 128 * 2 / bw), rel=1e-12)


def test_window_compute_is_its_pieces():
    """W = 1, free links: a windowed call costs the attention of each of its (tiled) pieces plus
    the fp32 passes around them, written out here from documents.block_forward (B = 1: tiles are
    views, only their lse is reordered); far less than the full causal block, and more than the
    band's FLOPs at the full block's rate (every call pays its intercept)."""
    from ringattn.layout import RingPlan, SequenceLayout

    prof, L, w = cm.H100_BF16, 131072, 4096
    B, Hq, D, e = 1, 32, 128, 2
    pieces = RingPlan(None, 0, 1, SequenceLayout.build(L, 1, "contiguous"), True, 1.0, "auto", None, w).block(0, 0).pieces
    assert len(pieces) <= 6 and max(p.tiles for p in pieces) > 1
    att = mem = 0.0
    for p in pieces:
        T = p.tiles
        att += prof.attn_time("fwd", "auto", B=B * T, Hq=Hq, Sq=p.q_len, Sk=p.kv_len, D=D, causal=p.causal or p.flip)
        mem += prof.mem_time(B * p.q_len * T * Hq * (D * (8 + e) + 12))  # merge of the piece
        nb = 0
        if p.flip:  # q, k, v reversed in, out reversed back
            nb += 2 * B * T * (2 * p.q_len * Hq * D * e + 2 * p.kv_len * 8 * D * e)
        if p.flip or T > 1:
            nb += 2 * B * T * p.q_len * Hq * 4
        mem += prof.mem_time(nb)
    el = L * Hq * D
    mem += prof.mem_time(L * Hq * (D + 1) * 4) + prof.mem_time(el * (4 + e))  # zero-fill; cast of the block
    mem += prof.mem_time(el * (e + 4)) + prof.mem_time(el * (4 + e))           # ring's accumulator; cast out
    p = cm.predict("ring", seq_len=L, world_size=1, causal=True, backward=False, topology=FREE_LINKS,
                   sliding_window=w, **SHAPE)
    assert p.total_s == pytest.approx(att + mem, rel=1e-12)
    full = cm.predict("ring", seq_len=L, world_size=1, causal=True, backward=False, topology=FREE_LINKS, **SHAPE)
    assert p.total_s < full.total_s / 4
    band = sum(pc.q_len * pc.kv_len * pc.tiles / (2 if (pc.causal or pc.flip) else 1) for pc in pieces) / (L * L / 2)
    assert p.total_s > band * full.total_s


def test_auto_follows_the_model_under_masks():
    """auto with a window: the model's prediction at the rounded length (like no mask), cached
    with it; with packed documents: at the exact length, up to AUTO_MAX_WORLD_DOCUMENTS ranks,
    bytes above. The reason names the mask either way."""
    kw = dict(layout="contiguous", causal=True, batch=1, heads_q=32, heads_kv=32, head_dim=128,
              dtype=torch.bfloat16, backward=True)
    seen = set()
    for W in (2, 4, 8):
        for hkv in (32, 8):
            c = sp.choose_algorithm(seq_len=100000, world_size=W, sliding_window=4096, **dict(kw, heads_kv=hkv))
            want = cm.compare(seq_len=cm.auto_seq_len(100000, W, "contiguous"), world_size=W, topology="nvswitch",
                              sliding_window=4096, **dict(kw, heads_kv=hkv))
            assert c.predicted_s == {a: p.total_s for a, p in want.items()}, c
            assert "sliding window 4096" in c.reason and "cost model (h100_bf16, nvswitch)" in c.reason, c
            assert c.algorithm == _auto_rule(c.predicted_s, c.predicted_bytes), c
            seen.add(c.algorithm)
            L = 65536
            docs = [0, 1000, 30000, 30001, L]
            d = sp.choose_algorithm(seq_len=L, world_size=W, cu_seqlens=docs, **dict(kw, heads_kv=hkv))
            want = cm.compare(seq_len=L, world_size=W, topology="nvswitch", cu_seqlens=docs, **dict(kw, heads_kv=hkv))
            assert d.predicted_s == {a: p.total_s for a, p in want.items()}, d
            assert d.algorithm == _auto_rule(d.predicted_s, d.predicted_bytes), d
            assert "packed sequence (4 documents)" in d.reason, d
    # a window that reaches every key is no mask
    assert sp.choose_algorithm(seq_len=8192, world_size=4, sliding_window=8192, **kw) == \
        sp.choose_algorithm(seq_len=8192, world_size=4, **kw)
    big = cm.AUTO_MAX_WORLD_DOCUMENTS * 2
    d = sp.choose_algorithm(seq_len=1 << 17, world_size=big, cu_seqlens=[0, 5000, 1 << 17], **kw)
    assert d.predicted_s == {} and f"world size {big} > {cm.AUTO_MAX_WORLD_DOCUMENTS}" in d.reason, d
    assert d.algorithm == ("token_ring" if d.predicted_bytes["token_ring"] < d.predicted_bytes["ring"] else "ring")
    w = sp.choose_algorithm(seq_len=1 << 17, world_size=big, sliding_window=4096, **kw)  # windows: up to 64
    assert set(w.predicted_s) == {"ring", "token_ring", "ulysses"}, w


# --- softcap: the blocks' backend ----------------------------------------------------------------
def test_auto_with_softcap_times_the_blocks_it_runs(monkeypatch):
    """Softcapped blocks never run on SDPA's kernels: on GPUs auto times them with the profile's
    "flash" curve when the flash_attn package takes softcap=, and otherwise (math, which the H100
    profile has not measured) lets bytes decide between the rings; on CPU it changes nothing."""
    import ringattn.block_attention as ba

    kw = dict(seq_len=32768, world_size=4, layout="zigzag", causal=True, batch=1, heads_q=32, heads_kv=8, head_dim=128,
              dtype=torch.bfloat16, backward=True)
    plain = sp.choose_algorithm(**kw)
    monkeypatch.setattr(ba, "_flash_attn_interface", lambda: (None, "not installed"))
    capped = sp.choose_algorithm(**kw, softcap=50.0)
    assert capped.predicted_s == {} and "softcap" in capped.reason and "has not measured" in capped.reason, capped
    assert capped.algorithm == ("token_ring" if capped.predicted_bytes["token_ring"] < capped.predicted_bytes["ring"]
                                else "ring")

    class FakeFlashAttn:  # flash_attn 2.6+'s interface: _flash_attn_forward takes softcap=
        @staticmethod
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, return_softmax):
            raise AssertionError("not called: auto only asks whether it takes softcap")

    monkeypatch.setattr(ba, "_flash_attn_interface", lambda: (FakeFlashAttn, "2.7.4"))
    flash = sp.choose_algorithm(**kw, softcap=50.0)
    want = cm.compare(**dict(kw, seq_len=cm.auto_seq_len(32768, 4, "zigzag")), topology="nvswitch", backend="flash")
    assert flash.predicted_s == {a: p.total_s for a, p in want.items()}, flash
    assert "softcap blocks timed as 'flash'" in flash.reason, flash.reason
    assert all(flash.predicted_s[a] > plain.predicted_s[a] for a in plain.predicted_s)  # FA2 is slower than cuDNN
    cpu = sp.choose_algorithm(**kw, device="cpu")
    assert sp.choose_algorithm(**kw, softcap=50.0, device="cpu") is cpu  # math either way: the same choice


def test_auto_call_passes_its_softcap_to_the_choice(monkeypatch):
    seen = []
    real = sp.choose_algorithm

    def spy(**kw):
        seen.append(kw.get("softcap"))
        return real(**kw)

    monkeypatch.setattr(sp, "choose_algorithm", spy)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    sp.sequence_parallel_attention(q, k, v, causal=True, algorithm="auto", softcap=30.0)
    sp.sequence_parallel_attention(q, k, v, causal=True, algorithm="auto")
    assert seen == [30.0, 0.0], seen


def test_auto_signature_holds_the_softcap_blocks_backend(monkeypatch):
    """Ranks timing softcapped blocks differently (flash_attn installed on some ranks only) would pick
    different algorithms: the hardware field of the signature every rank exchanges covers it, so they
    raise together instead (real processes: test_auto_hardware; the field itself here)."""
    q = k = v = torch.randn(1, 6, 4, 8)

    def sig(softcap, blocks):
        monkeypatch.setattr(sp, "_softcap_blocks", lambda cap, device, hw: blocks)
        return sp._local_signature("t", q, k, v, algorithm="auto", layout="contiguous", causal=True, softmax_scale=None,
                                   backend="auto", world=2, global_ranks=[0, 1], softcap=softcap).sig[sp._IX["hardware"]]

    plain = sig(None, "flash")  # (no softcap: the blocks' backend plays no part)
    assert plain == sig(None, "") and sig(30.0, "flash") != sig(30.0, "") and plain not in (sig(30.0, "flash"),
                                                                                           sig(30.0, ""))
    assert sig(30.0, "flash") == sig(50.0, "flash")  # (the cap's value is a field of its own)
