"""Distributed bootstrap shared by every launcher (torchrun, mpirun, DeepSpeed, plain python).

    from ringattn.distributed import init_distributed
    info = init_distributed()          # picks the launcher from the environment
    # info.rank, info.world_size, info.local_rank, info.device, info.backend, info.launcher

Launchers:
- torchrun / torch.distributed.launch / DeepSpeed's launcher: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT in the environment -> init_method="env://".
- mpirun / srun with MPI: rank and size from mpi4py's COMM_WORLD, local rank from a
  shared-memory split of it; rank 0 picks its address and a free port and broadcasts them
  over MPI, then every rank joins a tcp:// rendezvous.
- none of those: a single-process world (rank 0 of 1) on a free local port.
Backend: NCCL when CUDA GPUs are visible, else gloo (override with backend= or
RINGATTN_DIST_BACKEND).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun" | "mpi" | "single"


def detect_launcher(environ=None) -> str:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if any(v in env for v in _MPI_RANK_VARS):
        return "mpi"
    return "single"


def default_backend() -> str:
    forced = os.environ.get("RINGATTN_DIST_BACKEND")
    if forced:
        return forced
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "ringattn: launched under MPI (found an MPI rank variable) but mpi4py is not installed: "
            "pip install 'ringattn[mpi]' (needs an MPI library, e.g. apt-get install libopenmpi-dev)"
        ) from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(os.environ.get("MASTER_PORT") or _free_port())
    else:
        addr, port = None, None
    addr, port = comm.bcast((addr, port), root=0)
    return rank, size, local_rank, f"tcp://{addr}:{port}"


def _uses_nccl(backend) -> bool:
    """"nccl", or a per-device string such as "cpu:gloo,cuda:nccl"."""
    return "nccl" in str(backend).lower()


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group (idempotent) and return who we are.

    backend="cpu:gloo,cuda:nccl" (or RINGATTN_DIST_BACKEND) gives every group a CPU backend too,
    so ringattn's per-call metadata exchanges run on the host on any group; with plain "nccl" they
    do so on the default group and the 2-D ring groups through gloo twins, and on other groups
    through a twin registered with ringattn.comm.register_control_group (docs/sequence_parallel.md,
    "Validation")."""
    launcher = detect_launcher()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = dist.get_backend()
    else:
        if launcher == "torchrun":
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            init_method = "env://"
        elif launcher == "mpi":
            rank, world, local_rank, init_method = _mpi_rendezvous()
        else:
            rank, world, local_rank = 0, 1, 0
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = backend or default_backend()
        if _uses_nccl(backend):
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if _uses_nccl(backend):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, backend, launcher)


def cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
