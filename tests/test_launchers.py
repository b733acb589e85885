"""Bootstrap and launchers: torchrun and mpirun start real multi-rank jobs of the main module."""
import os
import shutil
import subprocess
import sys

import pytest

from ringattn.distributed import detect_launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s:\n{e.stdout}\n{e.stderr}")
    return p


def test_detect_launcher():
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert detect_launcher({"OMPI_COMM_WORLD_RANK": "1"}) == "mpi"
    assert detect_launcher({"PMI_RANK": "0"}) == "mpi"
    assert detect_launcher({}) == "single"


def _demo_ok(p, nranks, launcher):
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{nranks} ranks ({launcher}, gloo)" in p.stdout, p.stdout
    assert "demo OK" in p.stdout, p.stdout
    assert "tokens/s" in p.stdout and "peak mem" in p.stdout  # the report the main job prints
    if launcher != "deepspeed":  # then generation: sharded prefill + decode == the unsharded generate()
        assert f"prefilled over {nranks} ranks" in p.stdout and "8/8 equal to the unsharded model" in p.stdout, p.stdout
        # and tensor-parallel (TokenWeave layers, transformers' generate()) where the ranks divide the heads
        tp = [l for l in p.stdout.splitlines() if l.startswith("generate (tensor parallel")]
        assert len(tp) == 1 and f"over {nranks} ranks" in tp[0] and "8/8 equal" in tp[0] or \
            "tensor-parallel generate: skipped" in p.stdout, p.stdout


def _bytes_columns(stdout):
    """(measured, predicted) attention bytes per rank from the demo's table."""
    rows = []
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rank"))
    for line in lines[start + 1:]:
        parts = line.split()
        if not parts or not parts[0].isdigit():
            break
        # rank tokens mem unit sent unit predicted unit grad unit
        rows.append((" ".join(parts[4:6]), " ".join(parts[6:8])))
    return rows


def test_torchrun_demo():
    # 3 ranks: uneven shards (the --quick sequence of 256 tokens does not split evenly 6 ways)
    p = _run([os.path.join(ROOT, "launch", "torchrun.sh"), "3", "-m", "ringattn.demo", "--quick"])
    _demo_ok(p, 3, "torchrun")
    rows = _bytes_columns(p.stdout)
    assert len(rows) == 3 and all(sent == predicted for sent, predicted in rows), p.stdout  # counter == byte model


@pytest.mark.parametrize("algorithm", ["token_ring", "ulysses"])
def test_spawned_demo(algorithm):
    # no launcher: the demo starts its own ranks (default 4; 2 here to keep the suite short)
    p = _run([sys.executable, "-m", "ringattn.demo", "--quick", "--ranks", "2", "--algorithm", algorithm])
    _demo_ok(p, 2, "spawn")
    rows = _bytes_columns(p.stdout)
    assert len(rows) == 2 and all(sent == predicted for sent, predicted in rows), p.stdout  # counter == byte model


def test_single_process_demo():
    p = _run([sys.executable, "-m", "ringattn.demo", "--quick", "--ranks", "1"])
    _demo_ok(p, 1, "single")


def test_demo_refuses_too_short_sequence():
    p = _run([sys.executable, "-m", "ringattn.demo", "--quick", "--ranks", "4", "--seq", "5"])
    assert p.returncode != 0
    assert "5 tokens is too short for 4 ranks" in p.stderr and "at least 8 tokens" in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (apt-get install openmpi-bin)")
def test_mpirun_demo():
    pytest.importorskip("mpi4py")
    p = _run([os.path.join(ROOT, "launch", "mpirun.sh"), "4", "-m", "ringattn.demo", "--quick"])
    _demo_ok(p, 4, "mpi")


def test_deepspeed_launcher_demo():
    pytest.importorskip("deepspeed")
    p = _run([os.path.join(ROOT, "launch", "deepspeed.sh"), "2", "--quick", "--deepspeed", "3"])
    _demo_ok(p, 2, "deepspeed")
    assert "DeepSpeed ZeRO-3" in p.stdout


def test_init_distributed_per_device_backend_string(monkeypatch):
    """backend="cpu:gloo,cuda:nccl" is an NCCL setup too: the rank's GPU is selected and returned
    (torch.distributed and CUDA stubbed: this machine has no GPU)."""
    import torch
    import torch.distributed as dist
    import ringattn.distributed as rd

    calls = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls["device"])
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    info = rd.init_distributed(backend="cpu:gloo,cuda:nccl")
    assert calls == {"backend": "cpu:gloo,cuda:nccl", "device": 3}
    assert info.device == torch.device("cuda", 3) and (info.rank, info.world_size) == (3, 4)
