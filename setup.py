"""Builds ringattn._C: the C++ ops always, the CUDA ops when asked for and possible.

RINGATTN_CUDA=auto (default): build CUDA ops when torch was built with CUDA and nvcc is
    found. A GPU is NOT needed (CI compiles the kernels on a GPU-less machine).
RINGATTN_CUDA=1: require the CUDA build (error if torch has no CUDA or nvcc is missing).
RINGATTN_CUDA=0: C++ ops only.
TORCH_CUDA_ARCH_LIST overrides the default arch list "8.0;9.0a" (A100 + Hopper).
MAX_JOBS caps parallel compile jobs (default: min(4, cpu count)).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

# torch guesses CUDA_HOME=/usr/local when no CUDA runtime is loaded (no GPU): point it at the
# toolkit that actually holds nvcc and libcudart.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _nvcc() -> str | None:
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _want_cuda() -> bool:
    flag = os.environ.get("RINGATTN_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise ValueError(f"RINGATTN_CUDA must be auto, 0 or 1, got {flag!r}")
    torch_cuda = torch.version.cuda is not None
    nvcc = _nvcc()
    if flag == "0":
        print("ringattn: RINGATTN_CUDA=0 -> building C++ (CPU) ops only; CUDA ops skipped.")
        return False
    if torch_cuda and nvcc:
        return True
    why = "torch was built without CUDA" if not torch_cuda else "nvcc was not found (set CUDA_HOME)"
    if flag == "1":
        raise RuntimeError(f"RINGATTN_CUDA=1 but {why}.")
    print(f"ringattn: CUDA ops SKIPPED ({why}); building C++ (CPU) ops only.")
    return False


def extensions():
    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-DPy_LIMITED_API=0x03090000"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        print(f"ringattn: building CUDA ops for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # pip's CUDA torch ships cuSPARSE/cuBLAS headers in site-packages/nvidia/*/include; a bare
        # nvcc install may lack them while ATen/cuda headers include them.
        nv = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        extra_inc = sorted(glob.glob(os.path.join(nv, "*", "include")))
        return [
            CUDAExtension(
                "ringattn._C",
                cpp + cu,
                define_macros=[("RINGATTN_WITH_CUDA", "1")],
                include_dirs=extra_inc,
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
                },
                py_limited_api=True,
            )
        ]
    return [CppExtension("ringattn._C", cpp, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True)]


setup(
    name="ringattn",
    version="0.1.0",
    description="Distributed long-context attention for PyTorch: TokenRing, Ring Self-Attention, TokenWeave",
    packages=find_packages(include=["ringattn", "ringattn.*"]),
    package_data={"ringattn": ["profiles/*.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "mpi": ["mpi4py"],
        "hf": ["transformers"],
        "deepspeed": ["deepspeed"],
        "perf": ["matplotlib", "tqdm"],
        # the peer libraries perf/sweep.py compares with (perf/peers.py); install with --no-deps
        # where flash-attn cannot be built (their kernel is then perf/flash_attn_shim)
        "peers": ["ring-flash-attn==0.1.8", "yunchang==0.6.4"],
    },
)
