"""``meshplan plan --cluster localhost:N`` measures this machine: a quick profile, cached per machine.

On first use for a job shape, ``plan`` runs the profiler in its quick form (about 30 s: the runtime's blocks at
the plan's model and sequence length, the links, and on CPU processes the host phases shortened) and stores the
cluster file in the user's cache directory. Later plans with the same key read it back without measuring.

The key names what the figures depend on: the host, the device (GPU name, or the CPU model and core count),
the torch version, the rank count, the precision, and the shapes timed (the model's layer shape and the
sequence length). An entry whose key does not match, that does not parse, or whose cluster does not load is
re-measured and replaced, never trusted. ``MESHPLAN_CACHE_DIR`` moves the cache; ``--no-profile`` skips it.

Torch-free: the profile runs as a torchrun job (``cli.measure``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from meshplan.spec import ClusterSpec, ModelSpec

# What a cached measurement holds; a file of another format is measured again. 2: a CPU's peak is at least its
# fastest measured GEMM (cluster_file.measured_cpu_peak). 3: the embedding timed on a tp rank's vocabulary rows
# (``embedding_rows``), which the planner reads.
CACHE_FORMAT = 3
# The job's own budget; torchrun's start and the fit add a few seconds (4 CPU ranks on 2 cores: 32 s in all).
QUICK_BUDGET_S = 30.0
QUICK_REPS = 3
# The quick profile times micro-batches up to this size; the planner reads larger ones off the fitted line.
QUICK_MICRO_BATCHES = (1, 2, 4)


def cache_dir() -> Path:
    """``$MESHPLAN_CACHE_DIR``, else the platform's user cache directory (``$XDG_CACHE_HOME/meshplan`` or
    ``~/.cache/meshplan`` on Linux, ``~/Library/Caches/meshplan`` on macOS, ``%LOCALAPPDATA%\\meshplan`` on
    Windows)."""
    explicit = os.environ.get("MESHPLAN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "meshplan"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "meshplan"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshplan"


def torch_version() -> str:
    """The installed torch's version, read from its metadata (importing torch takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def device_description(cluster: ClusterSpec) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if cluster.gpu.kind != "cpu":
        return cluster.gpu.name
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count() or 1}"


def shapes_of(model: ModelSpec) -> dict:
    """What the profile's block timings depend on: the layer's shape, not the model's name or depth."""
    return {"hidden": model.hidden, "heads": model.heads, "kv_heads": model.kv_heads,
            "ffn_hidden": model.ffn_hidden, "vocab": model.vocab, "mlp": model.mlp, "norm": model.norm,
            "position": model.position, "bias": model.bias, "tied_embeddings": model.tied_embeddings}


def cache_key(base: ClusterSpec, model: ModelSpec, seq_len: int, precision: str) -> dict:
    return {"format": CACHE_FORMAT, "host": socket.gethostname(), "device": device_description(base),
            "torch": torch_version(), "ranks": base.world_size, "precision": precision, "seq_len": seq_len,
            "shapes": shapes_of(model)}


def entry_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    host = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key["host"])[:40]
    return cache_dir() / f"localhost-{host}-{key['ranks']}ranks-{digest}.yaml"


def read_entry(path: Path, key: dict) -> tuple[ClusterSpec | None, str]:
    """The cached cluster at ``path`` if its key matches ``key`` and it loads, else ``None`` and why not."""
    if not path.exists():
        return None, "no cached measurement"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return None, f"the cached file {path} is unreadable ({type(exc).__name__})"
    if not isinstance(data, dict) or data.get("key") != key:
        return None, f"the cached file {path} was made for another machine, torch or job shape"
    try:
        cluster = ClusterSpec.from_dict(data["cluster"], where=str(path))
    except Exception as exc:  # any malformed content: re-measure rather than trust it
        return None, f"the cached file {path} does not load ({exc})"
    if cluster.profile.empty:
        return None, f"the cached file {path} holds no measurement"
    return cluster, "cached"


def write_entry(path: Path, key: dict, cluster: ClusterSpec) -> None:
    """Write atomically (a temporary file renamed into place), so an interrupted write leaves no entry."""
    from meshplan.profiler.cluster_file import plain

    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# meshplan's measurement of this machine, made by `meshplan plan --cluster localhost:N`.\n"
            "# Delete it to measure again; `meshplan profile` makes a longer one.\n")
    text += yaml.safe_dump({"key": key, "cluster": plain(cluster.to_dict())}, sort_keys=False, width=120)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def measured_localhost(base: ClusterSpec, model: ModelSpec, seq_len: int, precision: str,
                       echo: Callable[[str], None],
                       before_measuring: Callable[[], None] = lambda: None) -> ClusterSpec:
    """``base`` (``localhost:N`` with documented defaults) replaced by this machine's measurement: the cached
    one when its key matches, else a quick profile, cached for the next plan. The returned cluster keeps
    ``base``'s name (``localhost:N``), so a plan made from it launches here. ``before_measuring`` runs only
    when a quick profile is about to start (``meshplan plan`` refuses there what no measurement can change)."""
    precision = "bf16" if precision == "fp8" else precision   # fp8 runs its matmuls only; the rest is bf16
    key = cache_key(base, model, seq_len, precision)
    path = entry_path(key)
    cluster, why = read_entry(path, key)
    if cluster is not None:
        echo(f"meshplan: using this machine's measurement cached in {path} "
             f"(measured {cluster.measured.get('date', '?')}; delete it to measure again)")
        return _named(cluster, base.name)
    before_measuring()
    if why != "no cached measurement":
        echo(f"meshplan: {why}; measuring again")
    cpu = base.gpu.kind == "cpu"
    echo(f"meshplan: measuring this machine once for {base.name} (a quick profile, about half a minute"
         + (", more for a large model" if cpu else "") + f": {model.name}'s blocks at seq {seq_len}, the links "
         "between ranks" + (", how the processes share the cores" if cpu else "")
         + f"); it is cached in {path.parent}. --no-profile uses the documented defaults instead; "
         "`meshplan profile` measures longer")
    from meshplan.errors import InputError
    from meshplan.profiler import cli as profiler_cli

    start = time.time()
    micro_batches = list(QUICK_MICRO_BATCHES)
    profiled = profiler_cli.measure(model, seq_len, precision, micro_batches, base.world_size,
                                    budget_s=QUICK_BUDGET_S, start=start, reps=QUICK_REPS, quick=True)
    if profiled is None or profiled is profiler_cli.NOT_RANK_ZERO:
        raise InputError("--cluster", f"measuring {base.name} failed (the profiler's output is above)",
                         "fix what it says, or pass --no-profile to plan with the documented defaults")
    write_entry(path, key, profiled)
    cluster, why = read_entry(path, key)   # what later plans read: the file's rounding, the same predictions
    if cluster is None:
        raise InputError("--cluster", f"the measurement of {base.name} could not be cached: {why}",
                         "set MESHPLAN_CACHE_DIR to a writable folder, or pass --no-profile")
    echo(f"meshplan: measured in {time.time() - start:.0f} s, cached in {path}")
    return _named(cluster, base.name)


def _named(cluster: ClusterSpec, name: str) -> ClusterSpec:
    import dataclasses

    return dataclasses.replace(cluster, name=name)
