"""ringattn.hardware: what algorithm="auto" assumes (compute profile + topology), per device, set in
the process or the environment; auto's prediction follows it; ranks that assume different hardware
get the same clear error on every rank (never different picks, which would deadlock)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import ringattn
import ringattn.sequence_parallel as sp
from ringattn import cost_model as cm
from ringattn import hardware as hw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_PROFILE_RESULT = os.path.join(ROOT, "perf/results/2026-12-07_cost_model_cpu_profile_v3.json")
# MHA, 4 ranks, 4096 tokens causal zigzag, fwd+bwd: the H100 model predicts Ulysses >2x faster, the
# CPU model a ring (measured on this CPU: Ulysses 2-21% behind the faster ring at 4k, RESULTS.md)
SHAPE = dict(seq_len=4096, world_size=4, layout="zigzag", causal=True, batch=1, heads_q=4, heads_kv=4,
             head_dim=64, dtype=torch.bfloat16, backward=True)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(hw.ENV_PROFILE, raising=False)
    monkeypatch.delenv(hw.ENV_TOPOLOGY, raising=False)
    prev = hw.set_auto_hardware(None)
    yield
    hw._configured = prev


def _calibration(tmp_path, topology=True, name="mine"):
    """A file like the one perf/model.py calibrate writes: H100's profile renamed, a measured topology."""
    doc = dict(compute=dict(cm.H100_BF16.to_json(), name=name),
               topology=cm.PRESETS["pcie"].to_json() if topology else None, meta=dict(device="test"))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


# --- which hardware, per device, set, env ---------------------------------------------------------
def test_device_default_cpu_and_gpu():
    cpu, gpu = hw.current("cpu"), hw.current("cuda")
    assert gpu is hw.H100 and gpu.profile is cm.H100_BF16 and gpu.topology is None
    assert cpu.profile.name == "local_cpu" and cpu.profile.aliases == {"auto": "math"}
    assert isinstance(cpu.topology, cm.Topology) and cpu.topology.kind == "local" and cpu.topology.device_slots == 2
    assert cpu.fingerprint != gpu.fingerprint
    assert hw.H100.topology_for(8) == "nvswitch" and hw.H100.topology_for(9) == "inter_node"
    # the shipped CPU profile is the calibration recorded in perf/results (its provenance)
    rec = json.load(open(CPU_PROFILE_RESULT))
    assert cpu.profile == cm.ComputeProfile.from_json(rec["compute"])
    assert cpu.topology == cm.Topology.from_json(rec["topology"])
    assert hw.resolve_profile(CPU_PROFILE_RESULT) == cpu  # equal by content (fingerprint)


def test_set_and_context_manager_restore():
    with ringattn.auto_hardware("cpu"):
        assert hw.current("cuda") == hw.current("cpu") == hw.builtin("cpu")
        with ringattn.auto_hardware(topology="pcie"):  # profile: still the device default
            assert hw.current("cuda").profile is cm.H100_BF16 and hw.current("cuda").topology == "pcie"
            assert hw.current("cpu").profile == hw.builtin("cpu").profile
        assert hw.current("cuda") == hw.builtin("cpu")
    assert hw.current("cuda") is hw.H100
    prev = ringattn.set_auto_hardware("h100", topology="inter_node")
    assert prev is None and hw.current("cpu").topology == "inter_node"
    ringattn.set_auto_hardware(None)
    assert hw.current("cpu") == hw.builtin("cpu")


def test_environment_and_calibration_files(tmp_path, monkeypatch):
    path = _calibration(tmp_path)
    monkeypatch.setenv(hw.ENV_PROFILE, path)
    got = hw.current("cpu")
    assert got.profile.name == "mine" and got.topology == cm.PRESETS["pcie"]  # the file's own topology
    monkeypatch.setenv(hw.ENV_TOPOLOGY, "inter_node")
    assert hw.current("cpu").topology == "inter_node" and hw.current("cpu").profile.name == "mine"
    monkeypatch.delenv(hw.ENV_PROFILE)
    assert hw.current("cuda") == hw.H100.with_topology("inter_node")  # topology alone: device profile kept
    # a topology JSON: a bare Topology, or a calibration holding one
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps(cm.PRESETS["mesh"].to_json()))
    monkeypatch.setenv(hw.ENV_TOPOLOGY, str(topo))
    assert hw.current("cuda").topology == cm.PRESETS["mesh"]
    assert hw.current("cuda") is hw.current("cuda")  # resolved once per setting (not on every call)
    topo.write_text(json.dumps(cm.PRESETS["ring"].to_json()))  # an edited file is read again
    os.utime(topo, (time.time() + 5, time.time() + 5))
    assert hw.current("cuda").topology == cm.PRESETS["ring"]
    # set_auto_hardware wins over the environment
    with ringattn.auto_hardware("h100"):
        assert hw.current("cuda").topology is None
    # no topology in the file: the default rule
    assert hw.resolve_profile(_calibration(tmp_path, topology=False, name="bare")).topology is None


@pytest.mark.parametrize("env,value,words", [
    (hw.ENV_PROFILE, "a100", ["RINGATTN_AUTO_PROFILE='a100'", "neither a built-in"]),
    (hw.ENV_PROFILE, "/no/such/file.json", ["neither a built-in", "/no/such/file.json"]),
    (hw.ENV_TOPOLOGY, "torus", ["RINGATTN_AUTO_TOPOLOGY='torus'", "neither a cost_model preset", "nvswitch"]),
    (hw.ENV_PROFILE, "NOT_JSON", ["cannot read", "as JSON"]),
    (hw.ENV_PROFILE, "NO_COMPUTE", ["no 'compute' entry"]),
    (hw.ENV_TOPOLOGY, "NO_TOPOLOGY", ["holds no topology"]),
    (hw.ENV_TOPOLOGY, "LIST", ["holds a JSON list, not an object"]),
    (hw.ENV_PROFILE, "LIST", ["no 'compute' entry"]),
])
def test_bad_environment_names_the_variable(tmp_path, monkeypatch, env, value, words):
    files = {"NOT_JSON": "not json {", "NO_COMPUTE": json.dumps({"meta": {}}), "NO_TOPOLOGY": json.dumps({"meta": {}}),
             "LIST": "[1, 2]"}
    if value in files:
        p = tmp_path / "bad.json"
        p.write_text(files[value])
        value = str(p)
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError) as e:
        hw.current("cuda")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_gpu_calibration_from_the_benchmark_csvs_drives_auto(tmp_path, monkeypatch):
    """The documented route for another GPU: perf/model.py calibrate on the two benchmark CSVs (here
    the recorded H100 ones) -> JSON -> RINGATTN_AUTO_PROFILE: auto then predicts with that fit."""
    import subprocess
    import sys

    out = tmp_path / "mine.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "perf/model.py"), "calibrate", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    monkeypatch.setenv(hw.ENV_PROFILE, str(out))
    mine = hw.current("cuda")
    assert mine.name == "h100_bf16 (mine.json)" and mine.topology is None and mine != hw.H100
    kw = dict(SHAPE, seq_len=32768, world_size=8, heads_q=32, heads_kv=8, head_dim=128)
    got, ref = sp.choose_algorithm(**kw), sp.choose_algorithm(**kw, hardware="h100")
    assert got.hardware == mine.name and set(got.predicted_s) == set(ref.predicted_s)
    for alg, t in got.predicted_s.items():  # the shipped constants are this fit rounded (to 0.5%)
        assert t == pytest.approx(ref.predicted_s[alg], rel=0.01), alg


def test_bad_arguments():
    with pytest.raises(ValueError, match="neither a built-in"):
        ringattn.set_auto_hardware("a100")
    with pytest.raises(ValueError, match="neither a cost_model preset"):
        ringattn.set_auto_hardware("h100", topology="torus")
    with pytest.raises(TypeError, match="profile must be"):
        ringattn.set_auto_hardware(3.5)
    with pytest.raises(TypeError, match="topology must be"):
        ringattn.set_auto_hardware("h100", topology=8)
    assert hw._configured is None  # a failed set changes nothing


def test_warns_once_on_a_gpu_the_default_profile_was_not_fitted_on(monkeypatch):
    monkeypatch.setattr(hw, "_warned", set())
    monkeypatch.setattr(hw, "_gpu_name", lambda device: "NVIDIA A100-SXM4-80GB")
    gpu = torch.device("cuda", 0)  # (no CUDA needed: the name is what is looked up)
    with pytest.warns(RuntimeWarning, match="this GPU is 'NVIDIA A100-SXM4-80GB'.*RINGATTN_AUTO_PROFILE=mine.json"):
        assert hw.current("cuda", gpu) is hw.H100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hw.current("cuda", gpu) is hw.H100            # once per GPU name
        with ringattn.auto_hardware("cpu"):
            hw.current("cuda", gpu)                          # another profile: nothing to warn about
        assert not hw.warn_if_unfitted("NVIDIA H100 80GB HBM3")  # the GPU the fit is from
    monkeypatch.setattr(hw, "_warned", set())
    with pytest.warns(RuntimeWarning, match="H100 cost profile"):
        with ringattn.auto_hardware(topology="pcie"):        # the H100 profile on another topology: still
            hw.current("cuda", gpu)


# --- auto follows it -----------------------------------------------------------------------------
def test_choose_algorithm_follows_the_hardware():
    gpu = sp.choose_algorithm(**SHAPE)  # device="cuda" by default
    cpu = sp.choose_algorithm(**SHAPE, device="cpu")
    assert gpu.algorithm == "ulysses" and cpu.algorithm in ("ring", "token_ring"), (gpu, cpu)
    assert gpu.hardware == hw.H100.name and cpu.hardware == hw.builtin("cpu").name
    assert "h100_bf16" in gpu.reason and "local_cpu" in cpu.reason
    # the seconds are cost_model.predict's with that profile and topology (at the rounded length)
    cpu_hw = hw.builtin("cpu")
    kw = dict(SHAPE, seq_len=cm.auto_seq_len(4096, 4, "zigzag"), dtype=2)
    for alg, secs in cpu.predicted_s.items():
        want = cm.predict(alg, **kw, profile=cpu_hw.profile, topology=cpu_hw.topology).total_s
        assert secs == pytest.approx(want, rel=1e-12), alg
    # explicit hardware / topology arguments; set_auto_hardware changes the default
    assert sp.choose_algorithm(**SHAPE, hardware="cpu") == cpu
    pcie = sp.choose_algorithm(**SHAPE, topology="pcie")
    assert pcie.topology == "pcie" and pcie.predicted_s["ring"] == pytest.approx(
        cm.predict("ring", **kw, topology="pcie").total_s, rel=1e-12)
    with ringattn.auto_hardware("cpu"):
        assert sp.choose_algorithm(**SHAPE) == cpu
    assert sp.choose_algorithm(**dict(SHAPE, world_size=1), device="cpu").algorithm == "ring"


def test_auto_cache_is_keyed_by_the_hardware(tmp_path):
    first = sp.choose_algorithm(**SHAPE, hardware="cpu")
    hits = sp._choose_algorithm.cache_info().hits
    again = sp.choose_algorithm(**SHAPE, hardware=hw.resolve_profile(CPU_PROFILE_RESULT))  # same content
    assert again is first and sp._choose_algorithm.cache_info().hits == hits + 1
    other = sp.choose_algorithm(**SHAPE, hardware=_calibration(tmp_path))
    assert other is not first and other.topology == "pcie"


def test_shared_gpu_preset_shares_the_device_among_ranks():
    t = cm.PRESETS["shared_gpu"]
    assert [t.ranks_sharing(w) for w in (1, 2, 4)] == [1.0, 2.0, 4.0]
    assert cm.PRESETS["nvswitch"].ranks_sharing(4) == 1.0
    assert dataclasses.replace(cm.PRESETS["nvswitch"], device_slots=2.0).ranks_sharing(6) == 3.0
    kw = dict(seq_len=32768, world_size=4, layout="zigzag", causal=True, heads_q=32, heads_kv=8, head_dim=128)
    shared = cm.predict("ring", topology="shared_gpu", **kw)
    alone = cm.predict("ring", topology=dataclasses.replace(t, device_slots=0.0), **kw)
    assert shared.compute_s == pytest.approx(4 * alone.compute_s, rel=1e-9)


# --- ranks must agree (real processes) -----------------------------------------------------------
def _inputs(rank, n=None):
    n = n if n is not None else 5 + (rank == 0)  # contiguous over 2 ranks of 11 tokens
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(1, n, 4, 8, generator=g) for _ in range(3)]


def _attempt(case):
    rank = dist.get_rank()
    q, k, v = _inputs(rank)
    algorithm = "ring" if case == "explicit" else "auto"
    t0 = time.monotonic()
    try:
        if case == "bad_env" and rank == 1:
            os.environ[hw.ENV_PROFILE] = "a100"
        with ringattn.auto_hardware("h100" if rank == 0 and case != "bad_env" else None):
            out = sp.sequence_parallel_attention(q, k, v, causal=True, algorithm=algorithm)
        outcome = ("no error", tuple(out.shape))
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        outcome = (type(e).__name__, str(e))
    finally:
        os.environ.pop(hw.ENV_PROFILE, None)
    elapsed = time.monotonic() - t0
    after = sp.sequence_parallel_attention(q, k, v, causal=True)  # the group still works
    return outcome + (elapsed, tuple(after.shape))


def test_ranks_assuming_different_hardware_raise_on_every_rank(dist_pool):
    res = dist_pool(2).run(_attempt, "differ", timeout=60)
    for rank, (kind, msg, elapsed, after) in enumerate(res):
        assert kind == "ValueError", (rank, kind, msg)
        assert "the hardware algorithm='auto' assumes" in msg and "set_auto_hardware" in msg, msg
        assert elapsed < 10 and after == (1, 6 - rank, 4, 8)
    assert res[0][1] == res[1][1]  # the same message on every rank
    # what each rank assumed: the built-ins by name
    assert f"rank 0: {hw.H100.fingerprint:#010x} (built-in 'h100'), rank 1: " \
           f"{hw.builtin('cpu').fingerprint:#010x} (built-in 'cpu')" in res[0][1], res[0][1]


def test_a_bad_setting_on_one_rank_is_reported_on_every_rank(dist_pool):
    res = dist_pool(2).run(_attempt, "bad_env", timeout=60)
    for rank, (kind, msg, elapsed, after) in enumerate(res):
        assert kind == "ValueError", (rank, kind, msg)
        assert "rank 1: algorithm='auto' cannot use the hardware description set by RINGATTN_AUTO_PROFILE" in msg
        assert elapsed < 10 and after == (1, 6 - rank, 4, 8)


def test_explicit_algorithms_ignore_the_hardware(dist_pool):
    for kind, shape, _, _ in dist_pool(2).run(_attempt, "explicit", timeout=60):
        assert kind == "no error" and shape[1] in (5, 6)
