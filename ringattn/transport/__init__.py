"""Transports under ringattn's point-to-point exchanges.

The production path is `torch.distributed` itself (NCCL across GPUs, gloo on CPU). This package
holds what torch.distributed cannot do: `CudaIpcTransport` moves CUDA tensors between processes
that share ONE GPU (NCCL refuses that, gloo cannot send CUDA tensors), with the same
`batch_isend_irecv(P2POp list) -> works; work.wait()` contract as NCCL. Importing it needs no
GPU; using it does.
"""
from ringattn.transport.cuda_ipc import CudaIpcTransport, IpcWork

__all__ = ["CudaIpcTransport", "IpcWork"]
