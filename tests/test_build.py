"""The extension: schemas always present; CUDA kernels present when the build was asked for them."""
import os

import pytest
import torch

import ringattn  # noqa: F401

OPS = ["merge_attn_states", "merge_attn_states_", "add_rmsnorm"]


@pytest.mark.parametrize("op", OPS)
def test_schema_and_cpu_kernel_registered(op):
    name = f"ringattn::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"


@pytest.mark.skipif(os.environ.get("RINGATTN_EXPECT_CUDA_OPS") != "1", reason="CUDA build not requested")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    # CI builds with RINGATTN_CUDA=1 on a GPU-less machine: this proves the .cu files compiled
    # and registered their CUDA impls.
    name = f"ringattn::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
