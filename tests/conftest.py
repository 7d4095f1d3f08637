"""Test-session setup.

`meshplan plan --cluster localhost:N` measures this machine on first use and caches it in the user's cache
directory. The suite plans against the documented defaults (``MESHPLAN_NO_PROFILE=1``) and keeps any cache in a
folder of its own, so no test reads or writes the developer's cache; the tests of the measurement itself
(tests/test_host_cache.py, tests/test_readme_quickstart.py) set their own.

Triton decides between compiling and interpreting when its kernels are first imported and jitted; the suite
runs on CPU, so the interpreter is chosen for the whole session before anything imports ``triton`` (``meshplan
check`` imports the fused kernels' autograd Functions to trace them on fake tensors, before the kernel tests
run them under the interpreter).
"""

import os
import tempfile

import torch

os.environ["MESHPLAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="meshplan-test-cache-")
os.environ["MESHPLAN_NO_PROFILE"] = "1"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
