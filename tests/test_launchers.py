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


@pytest.mark.parametrize("nproc", [1, 3])
def test_torchrun_demo(nproc):
    p = _run([os.path.join(ROOT, "launch", "torchrun.sh"), str(nproc), "-m", "ringattn.demo", "--quick"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{nproc} ranks (torchrun, gloo)" in p.stdout
    assert "demo OK" in p.stdout


def test_single_process_demo():
    p = _run([sys.executable, "-m", "ringattn.demo", "--quick"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 ranks (single, gloo)" in p.stdout and "demo OK" in p.stdout


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (apt-get install openmpi-bin)")
def test_mpirun_demo():
    pytest.importorskip("mpi4py")
    p = _run([os.path.join(ROOT, "launch", "mpirun.sh"), "2", "-m", "ringattn.demo", "--quick"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks (mpi, gloo)" in p.stdout and "demo OK" in p.stdout
