"""perf/ tooling: the all-gather-KV baseline (perf/baselines.py), the sweep (perf/sweep.py) and the
plots (perf/plot.py), on CPU.

- baselines.allgather_attention on real gloo processes (W = 2, 3) against a single-process
  float64 reference: out and dq/dk/dv with a random upstream gradient, contiguous and zigzag,
  causal and not, MHA and GQA, even and uneven lengths, in all three exchange modes (gloo
  collectives, P2P over torch.distributed, P2P over CudaIpcTransport's host simulation), and its
  byte counters against allgather_comm_bytes.
- `sweep.py --preset cpu-smoke` as a subprocess (deadline): the CSV's rows and columns, bytes of
  ring/token_ring equal to ringattn.predict_comm_bytes, small errors, ratio_vs_single filled,
  resume (a second run adds no rows), and plot.py writing non-empty PNGs.
- a tiny `--transport ipc` sweep (host simulation on CPU): the IPC plumbing of the sweep runs.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF = os.path.join(ROOT, "perf")
if PERF not in sys.path:
    sys.path.insert(0, PERF)

import baselines  # noqa: E402
import ringattn  # noqa: E402
from ringattn.layout import SequenceLayout  # noqa: E402
from test_sequence_parallel import reference  # noqa: E402  (tests/ is on sys.path)

# fp32 against float64 on the same inputs: the blocks merge in another order than one softmax and
# the math kernel computes in fp32, so rounding only (the ring tests measure <= 1.5e-6); 2e-5 as
# tests/test_sequence_parallel.py uses for fp32.
ATOL = RTOL = 2e-5


def _reference(q, k, v, causal, scale):
    """Plain softmax attention over the full sequence in float64: (B, L, Hq, D)."""
    return reference(q, k, v, causal, scale)[0]


def _baseline_cases(world):
    cases, i = [], 0
    for mode in ("collective", "p2p", "ipc-sim"):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                for hq, hkv in ((4, 4), (4, 2)):
                    seq_len = 7 * world - 1 if i % 3 == 0 else 6 * world  # uneven every third case
                    cases.append(dict(mode=mode, layout=layout, causal=causal, hq=hq, hkv=hkv,
                                      seq_len=seq_len, batch=1 + i % 2, head_dim=8, seed=i))
                    i += 1
    return cases


def _baseline_worker():
    """Every case on this rank; returns a list of failure strings (empty = all passed) and a count."""
    from ringattn.transport import CudaIpcTransport

    rank, world = dist.get_rank(), dist.get_world_size()
    ipc = CudaIpcTransport(slots=1, _backend="host-sim", timeout_s=60)
    failures, n = [], 0
    for c in _baseline_cases(world):
        B, L, Hq, Hkv, D = c["batch"], c["seq_len"], c["hq"], c["hkv"], c["head_dim"]
        gen = torch.Generator().manual_seed(500 + c["seed"])
        q, dout = (torch.randn(B, L, Hq, D, generator=gen) for _ in range(2))
        k, v = (torch.randn(B, L, Hkv, D, generator=gen) for _ in range(2))
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        _reference(*ref, c["causal"], D ** -0.5).backward(dout.double())
        ref_out = _reference(*[t.detach() for t in ref], c["causal"], D ** -0.5)
        lay = SequenceLayout.build(L, world, c["layout"])
        pos = lay.positions(rank)
        loc = [t[:, pos].clone().requires_grad_() for t in (q, k, v)]
        transport = {"collective": None, "p2p": baselines.TorchP2P(), "ipc-sim": ipc}[c["mode"]]
        with ringattn.comm_stats() as st:
            out = baselines.allgather_attention(*loc, causal=c["causal"], layout=c["layout"], transport=transport)
            out.backward(dout[:, pos])
        for name, got, want in [("out", out, ref_out[:, pos])] + [
                (f"d{x}", t.grad, r.grad[:, pos]) for x, t, r in zip("qkv", loc, ref)]:
            err = (got.detach().double() - want).abs()
            ratio = (err / (ATOL + RTOL * want.abs())).max().item()
            if not (got.dtype == torch.float32 and got.shape == want.shape and ratio <= 1.0):
                failures.append(f"{c} {name}: {got.dtype} {tuple(got.shape)} max err {err.max().item():.3g}")
        want_bytes = baselines.allgather_comm_bytes(lay, rank, batch=B, heads_kv=Hkv, head_dim=D, elem_size=4,
                                                    backward=True)
        got_bytes = {ch: (st.sent_by_channel[ch], st.recv_by_channel[ch]) for ch in baselines.CHANNELS
                     if st.sent_by_channel[ch] or st.recv_by_channel[ch]}
        if got_bytes != want_bytes:
            failures.append(f"{c} bytes {got_bytes} != {want_bytes}")
        n += 1
    ipc.close()
    return failures, n


@pytest.mark.parametrize("world", (2, 3))
def test_allgather_baseline_matches_float64_reference(dist_pool, world):
    results = dist_pool(world).run(_baseline_worker, timeout=240)
    failures = [f for fails, _ in results for f in fails]
    assert not failures, "\n".join(failures[:20])
    assert results[0][1] == len(_baseline_cases(world)) == 24


# --- the sweep, as a subprocess ----------------------------------------------------------------

import sweep  # noqa: E402  (perf/sweep.py; importing it runs nothing)

SWEEP = os.path.join(PERF, "sweep.py")
PLOT = os.path.join(PERF, "plot.py")


def _run_sweep(*args, timeout=150):
    r = subprocess.run([sys.executable, SWEEP, "--no-progress", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"sweep.py {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "smoke.csv"
    r = _run_sweep("--preset", "cpu-smoke", "--out", str(out))
    return out, r


def _predicted_max(row):
    """(max sent, max received) over ranks of the byte formula of the row's (resolved) algorithm."""
    W, L, B = int(row["world"]), int(row["seq_len"]), int(row["batch"])
    hq, hkv, D = int(row["heads_q"]), int(row["heads_kv"]), int(row["head_dim"])
    causal, bwd = row["causal"] == "True", row["pass"] == "fwd_bwd"
    dtype = getattr(torch, row["dtype"])
    if row["resolved_algorithm"] == "allgather":
        lay = SequenceLayout.build(L, W, row["layout"])
        per_rank = [baselines.allgather_comm_bytes(lay, r, batch=B, heads_kv=hkv, head_dim=D,
                                                   elem_size=dtype.itemsize, backward=bwd) for r in range(W)]
    else:
        per_rank = ringattn.predict_comm_bytes(row["resolved_algorithm"], seq_len=L, world_size=W, layout=row["layout"],
                                               causal=causal, batch=B, heads_q=hq, heads_kv=hkv, head_dim=D,
                                               dtype=dtype, backward=bwd,
                                               sliding_window=int(row["window"]) if row.get("window") else None)
    return (max(sum(s for s, _ in ch.values()) for ch in per_rank),
            max(sum(v for _, v in ch.values()) for ch in per_rank))


def test_smoke_sweep_rows_and_columns(smoke):
    path, _ = smoke
    fields, rows = _rows(path)
    assert fields == sweep.COLUMNS
    assert not [r["error"] for r in rows if r["error"]]
    got = sorted((r["algorithm"], r["world"], r["heads_kv"], r["causal"], r["pass"]) for r in rows)
    want = sorted([(a, "2", hkv, c, p) for a in ("ring", "token_ring", "auto", "allgather")
                   for hkv in ("4", "2") for c in ("True", "False") for p in ("fwd", "fwd_bwd")]
                  + [("single", "1", hkv, c, p) for hkv in ("4", "2") for c in ("True", "False") for p in ("fwd", "fwd_bwd")])
    assert got == want
    singles = {(r["heads_kv"], r["causal"], r["pass"]): float(r["ms_median"]) for r in rows if r["algorithm"] == "single"}
    for r in rows:
        ms, ms_min = float(r["ms_median"]), float(r["ms_min"])
        assert 0 < ms_min <= ms, r
        assert r["seq_len"] == "256" and r["dtype"] == "float32" and r["head_dim"] == "32" and r["transport"] in ("gloo", "none")
        assert r["layout"] == ("" if r["algorithm"] == "single" else "zigzag")
        W = int(r["world"])
        flops = sweep.attention_flops(1, 4, 256, 32, r["causal"] == "True", r["pass"])
        assert float(r["tflops_per_rank"]) == pytest.approx(flops / W / (ms * 1e-3) / 1e12, rel=1e-4)
        assert float(r["ratio_vs_single"]) == pytest.approx(ms / singles[(r["heads_kv"], r["causal"], r["pass"])], rel=1e-3)
        # fp32 against the float64 reference over the whole sequence (B*Hq*L*L = 2^18 <= 2^24)
        assert r["err_check"] == ("full64:out,dq,dk,dv" if r["pass"] == "fwd_bwd" else "full64:out"), r
        assert float(r["max_abs_err"]) < 2e-5, r
        assert r["peak_mem_bytes"] == "" and r["command"].endswith("--preset cpu-smoke --out " + str(path))
        if r["algorithm"] == "auto":
            choice = ringattn.choose_algorithm(seq_len=256, world_size=2, layout="zigzag", causal=r["causal"] == "True",
                                               batch=1, heads_q=4, heads_kv=int(r["heads_kv"]), head_dim=32,
                                               dtype=torch.float32, backward=r["pass"] == "fwd_bwd", device="cpu")
            assert r["resolved_algorithm"] == choice.algorithm
        else:
            assert r["resolved_algorithm"] == r["algorithm"]
        if r["algorithm"] in ("ring", "token_ring"):  # the overlap runs were made (values may be noise here)
            assert float(r["compute_only_ms"]) > 0 and r["comm_sched_ms"] != "" and r["sched_only_ms"] != ""
            assert r["overlap_fraction"] == "" or 0.0 <= float(r["overlap_fraction"]) <= 1.0
        if r["algorithm"] in ("allgather", "single"):
            assert r["compute_only_ms"] == r["overlap_fraction"] == ""


def test_smoke_sweep_bytes_equal_the_formulas(smoke):
    _, rows = _rows(smoke[0])
    checked = 0
    for r in rows:
        if r["algorithm"] == "single":
            assert r["sent_bytes_max"] == r["recv_bytes_max"] == "0"
            continue
        assert (int(r["sent_bytes_max"]), int(r["recv_bytes_max"])) == _predicted_max(r), r
        checked += 1
    assert checked == 32


def test_smoke_sweep_json_header(smoke):
    path, _ = smoke
    with open(str(path)[:-4] + ".json") as f:
        data = json.load(f)
    run = data["meta"]["runs"][-1]
    assert "--preset cpu-smoke" in run["command"] and run["torch"] == torch.__version__ and run["device"].startswith("cpu")
    assert len(data["rows"]) == 40 and data["meta"]["columns"] == sweep.COLUMNS


def test_sweep_resumes_and_fresh_restarts(smoke, tmp_path):
    path, _ = smoke
    _, before = _rows(path)
    r = _run_sweep("--preset", "cpu-smoke", "--out", str(path))
    assert "0 configurations to run, 40 already in" in r.stderr
    _, after = _rows(path)
    assert [(x["algorithm"], x["ms_median"]) for x in after] == [(x["algorithm"], x["ms_median"]) for x in before]
    # A run killed half way: keep the first 20 rows; the rerun measures only the other 20.
    part = tmp_path / "part.csv"
    with open(path) as f:
        lines = f.readlines()
    part.write_text("".join(lines[:21]))
    r = _run_sweep("--preset", "cpu-smoke", "--out", str(part))
    assert "20 configurations to run, 20 already in" in r.stderr
    _, resumed = _rows(part)
    assert len(resumed) == 40 and [x["ms_median"] for x in resumed[:20]] == [x["ms_median"] for x in before[:20]]
    assert sorted(sweep._key(x) for x in resumed) == sorted(sweep._key(x) for x in before)
    r = _run_sweep("--preset", "cpu-smoke", "--out", str(part), "--fresh", "--no-single", "--algorithms", "ring",
                   "--heads", "4/2", "--causal", "1", "--pass", "fwd")
    _, fresh = _rows(part)
    assert [(x["algorithm"], x["heads_kv"], x["pass"]) for x in fresh] == [("ring", "2", "fwd")]


def test_plot_writes_pngs(smoke, tmp_path):
    r = subprocess.run([sys.executable, PLOT, str(smoke[0]), "--out", str(tmp_path), "--prefix", "smoke"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for metric in ("time", "tflops", "bytes", "overlap", "ratio"):
        png = tmp_path / f"smoke_{metric}.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (metric, len(data))


def test_plot_reads_tokenweave_csv(tmp_path):
    """perf/bench_tokenweave.py's fused CSV (columns as it writes them) gives one PNG, and a sweep
    CSV is not mistaken for one."""
    import plot

    cols = ["tokens", "hidden", "max_ctas", "world", "fused_us", "fused_shard_us", "unfused_us", "speedup",
            "speedup_shard"]
    path = tmp_path / "bench_tokenweave_fused.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for hidden in (4096, 8192):
            for t in (1, 64, 1024, 8192):
                fused, unfused = 10.0 + t * hidden / 4e5, 15.0 + t * hidden / 2.5e5
                w.writerow([t, hidden, 8, 2, fused, fused * 0.9, unfused, unfused / fused, unfused / fused / 0.9])
    assert plot.is_tokenweave_csv(str(path))
    written = plot.main([str(path), "--out", str(tmp_path)])
    data = (tmp_path / "bench_tokenweave_fused.png").read_bytes()
    assert written and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
    sweep_csv = tmp_path / "sweep.csv"
    sweep_csv.write_text("date,algorithm,ms_median\n")
    assert not plot.is_tokenweave_csv(str(sweep_csv))


def test_ipc_transport_host_simulation_sweep(tmp_path):
    """--transport ipc without CUDA: CudaIpcTransport's host simulation carries every algorithm."""
    out = tmp_path / "ipc.csv"
    _run_sweep("--transport", "ipc", "--worlds", "2", "--seqs", "64", "--heads", "4/2", "--head-dim", "16",
               "--causal", "1", "--pass", "fwd_bwd", "--warmup", "1", "--iters", "1", "--overlap-iters", "1",
               "--no-single", "--out", str(out))
    _, rows = _rows(out)
    assert sorted(r["algorithm"] for r in rows) == ["allgather", "auto", "ring", "token_ring"]
    for r in rows:
        assert r["error"] == "" and r["transport"] == "ipc" and r["device"].endswith("ipc-host-sim"), r
        assert float(r["max_abs_err"]) < 2e-5, r
        assert (int(r["sent_bytes_max"]), int(r["recv_bytes_max"])) == _predicted_max(r), r


def test_sliding_window_sweep(tmp_path):
    """--windows 0,8: windowed rows for the algorithms that take a window (the all-gather baseline
    is skipped for them), checked against a windowed float64 reference, bytes equal the formula
    (KV rotation stops after one step at W = 3, contiguous), FLOPs of the band."""
    out = tmp_path / "win.csv"
    _run_sweep("--transport", "gloo", "--worlds", "3", "--seqs", "96", "--heads", "4/2", "--head-dim", "16",
               "--causal", "1", "--windows", "0,8", "--layout", "contiguous", "--pass", "fwd_bwd", "--warmup", "1",
               "--iters", "1", "--overlap-iters", "0", "--out", str(out))
    fields, rows = _rows(out)
    assert "window" in fields
    got = sorted((r["algorithm"], r["window"]) for r in rows)
    assert got == sorted([(a, w) for a in ("single", "ring", "token_ring", "auto") for w in ("", "8")]
                         + [("allgather", "")]), got
    by = {(r["algorithm"], r["window"]): r for r in rows}
    for r in rows:
        assert r["error"] == "" and float(r["max_abs_err"]) < 2e-5, r
        assert r["err_check"] == "full64:out,dq,dk,dv", r
        flops = sweep.attention_flops(1, 4, 96, 16, True, "fwd_bwd", r["window"] or None)
        assert float(r["tflops_per_rank"]) == pytest.approx(flops / int(r["world"]) / (float(r["ms_median"]) * 1e-3)
                                                            / 1e12, rel=1e-4)
        if r["algorithm"] != "single":
            assert (int(r["sent_bytes_max"]), int(r["recv_bytes_max"])) == _predicted_max(r), r
    assert int(by[("ring", "8")]["sent_bytes_max"]) < int(by[("ring", "")]["sent_bytes_max"])
    assert int(by[("token_ring", "8")]["sent_bytes_max"]) < int(by[("token_ring", "")]["sent_bytes_max"])
    want = ringattn.choose_algorithm(seq_len=96, world_size=3, layout="contiguous", causal=True, batch=1, heads_q=4,
                                     heads_kv=2, head_dim=16, dtype=torch.float32, backward=True, sliding_window=8,
                                     device="cpu")
    assert by[("auto", "8")]["resolved_algorithm"] == want.algorithm, want
    # GQA: the ring's 7 travelling K/V rows (2 heads) are fewer bytes than TokenRing's 7 Q rows (4 heads)
    assert want.algorithm == "ring" and "sliding window 8" in want.reason, want
    assert sweep.attention_flops(1, 1, 10, 1, True, "fwd", 3) == 4 * (3 * 4 // 2 + 7 * 3)  # 27 visible pairs


def test_overlap_fraction_rule():
    """1 - (T - C) / M, clamped; None where noise (the call's spread, at least 2%) would decide."""
    # T = 100, C = 90, M = 40: 10 of 40 ms of messages exposed -> 0.75
    assert sweep.overlap_fraction(100.0, 99.0, 90.0, 40.0) == pytest.approx(0.75)
    assert sweep.overlap_fraction(100.0, 99.0, 100.0, 40.0) == pytest.approx(1.0)   # all hidden
    assert sweep.overlap_fraction(100.0, 99.0, 60.0, 40.0) == pytest.approx(0.0)    # all exposed
    assert sweep.overlap_fraction(100.0, 99.0, 101.5, 40.0) == pytest.approx(1.0)   # within noise: clamped
    assert sweep.overlap_fraction(100.0, 99.0, 110.0, 40.0) is None  # compute-only slower than the call
    assert sweep.overlap_fraction(100.0, 99.0, 50.0, 40.0) is None   # call slower than compute + messages
    assert sweep.overlap_fraction(100.0, 99.0, 99.0, 3.0) is None    # messages below 2 x 2% of the call
    assert sweep.overlap_fraction(100.0, 80.0, 90.0, 30.0) is None   # messages below 2 x the spread (20)
    assert sweep.overlap_fraction(100.0, 99.0, None, 40.0) is None


# --- perf/model.py measure: rounds of this sweep, merged ----------------------------------------

import model as perf_model  # noqa: E402  (perf/model.py, on sys.path like sweep.py)


def test_merge_rounds_takes_min_of_mins_and_median_of_medians():
    base = dict(device="d", transport="gloo", algorithm="ring", world="2", seq_len="64", batch="1", heads_q="2",
                heads_kv="1", head_dim="16", dtype="float32", causal="True", layout="zigzag", error="", iters="2")
    rounds = [[dict(base, ms_min="5.0", ms_median="6.0"), dict(base, algorithm="token_ring", error="boom")],
              [dict(base, ms_min="4.0", ms_median="9.0"), dict(base, algorithm="token_ring", error="boom2")],
              [dict(base, ms_min="7.0", ms_median="7.5"), dict(base, algorithm="token_ring", ms_min="3.0",
                                                              ms_median="3.5")]]
    for r in rounds:
        for row in r:
            row["pass"] = "fwd"
    got = {r["algorithm"]: r for r in perf_model.merge_rounds(rounds, sweep._key)}
    assert got["ring"]["ms_min"] == 4.0 and got["ring"]["ms_median"] == 7.5 and got["ring"]["iters"] == 6
    assert got["token_ring"]["ms_min"] == 3.0 and not got["token_ring"]["error"]  # one good round is enough
    only_err = perf_model.merge_rounds([[dict(base, error="x", **{"pass": "fwd"})]], sweep._key)
    assert only_err[0]["error"] == "x"


def test_model_measure_drives_the_sweep(tmp_path):
    """`perf/model.py measure` is perf/sweep.py run --rounds times: the merged CSV has sweep's
    columns, one row per (algorithm, pass), ms_min the min over the kept round CSVs, and
    `validate` reads it."""
    out = tmp_path / "runs.csv"
    cmd = [sys.executable, os.path.join(PERF, "model.py"), "measure", "--out", str(out), "--rounds", "2",
           "--reps", "1", "--worlds", "2", "--seqs", "96", "--heads", "2/1", "--head-dim", "16",
           "--masks", "zigzag", "--passes", "fwd", "fwd_bwd", "--timeout", "120"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    fields, rows = _rows(out)
    assert fields == sweep.COLUMNS
    assert sorted((x["algorithm"], x["pass"]) for x in rows) == sorted(
        (a, p) for a in ("ring", "token_ring") for p in ("fwd", "fwd_bwd"))
    assert not [x["error"] for x in rows if x["error"]]
    rounds = [_rows(tmp_path / f"runs.round{k}.zigzag.csv")[1] for k in range(2)]
    for x in rows:
        assert x["causal"] == "True" and x["layout"] == "zigzag" and x["world"] == "2"
        mins = [float(y["ms_min"]) for rr in rounds for y in rr if sweep._key(y) == sweep._key(x)]
        assert len(mins) == 2 and float(x["ms_min"]) == pytest.approx(min(mins), rel=1e-4)
    v = subprocess.run([sys.executable, os.path.join(PERF, "model.py"), "validate", "--sweep", str(out), "--profile",
                        os.path.join(ROOT, "perf/results/2026-12-01_cost_model_cpu_profile.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert v.returncode == 0 and "rows 4" in v.stdout, v.stdout[-2000:] + v.stderr[-2000:]


def test_bench_documents_window_table_times_both_tile_modes():
    """perf/bench_documents.py's window table: the same windowed call with the band's tiles run
    batched and tile by tile, against full causal, in one process; TILE_MODE is left as it was."""
    import argparse

    import bench_documents

    import ringattn.documents as rdoc

    args = argparse.Namespace(seq=256, heads_q=2, heads_kv=1, head_dim=16, windows=[16, 64], warmup=0, reps=1)
    before = rdoc.TILE_MODE
    rows = bench_documents.window_rows(args, torch.device("cpu"), torch.float32)
    assert rdoc.TILE_MODE == before
    assert [(r["window"], r["pass_"]) for r in rows] == [(16, "fwd"), (16, "fwd_bwd"), (64, "fwd"), (64, "fwd_bwd")]
    for r in rows:
        assert r["calls_batched"] < r["calls_per_tile"], r  # the band's squares tiled
        assert r["ms_batched"] > 0 and r["ms_per_tile"] > 0 and r["ms_full_causal"] > 0, r
        assert r["batched_vs_per_tile"] == pytest.approx(r["ms_batched"] / r["ms_per_tile"], rel=1e-2)


def test_bench_overhead_measures_the_exchange_against_a_cached_table(tmp_path):
    """perf/bench_overhead.py: real gloo ranks, each call timed as shipped and with the signature
    exchange answered from a table (the baseline, same processes), and the exchange alone."""
    out = tmp_path / "bo"
    p = subprocess.run([sys.executable, os.path.join(PERF, "bench_overhead.py"), "--out", str(out), "--worlds", "2",
                        "--seqs", "64", "--algorithms", "ring,token_ring", "--warmup", "1", "--reps", "3",
                        "--rounds", "1", "--timeout", "120"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "bench_overhead.csv")))
    assert [(r["world"], r["seq_len"], r["algorithm"]) for r in rows] == [("2", "64", "ring"), ("2", "64", "token_ring")]
    for r in rows:
        call, cached, ex = float(r["ms_call"]), float(r["ms_call_cached"]), float(r["ms_exchange"])
        assert call > 0 and cached > 0 and ex > 0, r
        assert float(r["overhead_ms"]) == pytest.approx(call - cached, abs=2e-4), r
    meta = json.load(open(out / "bench_overhead.json"))
    assert meta["command"].startswith("python ") and "baseline ms_call_cached" in meta["shape"]
    assert "[overhead]" in p.stdout
