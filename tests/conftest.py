"""Test-session setup.

Triton decides between compiling and interpreting when its kernels are first imported and jitted; the suite
runs on CPU, so the interpreter is chosen for the whole session before anything imports ``triton`` (``meshplan
check`` imports the fused kernels' autograd Functions to trace them on fake tensors, before the kernel tests
run them under the interpreter).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
