"""Test-session setup.

`meshplan plan --cluster localhost:N` measures this machine on first use and caches it in the user's cache
directory. The suite plans against the documented defaults (``MESHPLAN_NO_PROFILE=1``) and keeps any cache in a
folder of its own, so no test reads or writes the developer's cache; the tests of the measurement itself
(tests/test_host_cache.py, tests/test_readme_quickstart.py) set their own.

Triton decides between compiling and interpreting when its kernels are first imported and jitted; the suite
runs on CPU, so the interpreter is chosen for the whole session before anything imports ``triton`` (``meshplan
check`` imports the fused kernels' autograd Functions to trace them on fake tensors, before the kernel tests
run them under the interpreter).

Plain ``pytest`` runs the fast tests; tests marked ``slow`` (torchrun jobs, several processes, anything over a few
seconds) run when a ``-m`` expression selects them (``pytest -m slow``, ``pytest -m "slow or not slow"``) or when
a test file or test id is named (``pytest tests/test_runtime_parity.py`` runs all of that file).
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ["MESHPLAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="meshplan-test-cache-")
os.environ["MESHPLAN_NO_PROFILE"] = "1"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _names_tests(config: pytest.Config) -> bool:
    """Whether the command line names a test file or a test id (not just folders and options)."""
    return any(not arg.startswith("-") and (arg.split("::")[0].endswith(".py") or "::" in arg)
               for arg in config.invocation_params.args)


@pytest.hookimpl(tryfirst=True)     # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Deselect the slow tests unless a ``-m`` expression or a named test file asks for them; keep the tests
    that share a session's or a module's torchrun job on one pytest-xdist worker (:func:`_share_jobs`)."""
    _share_jobs(items)
    if config.option.markexpr or _names_tests(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


# session-scoped fixtures below whose readers span several modules
SESSION_JOBS = ("layout_run", "fidelity_table")


def _shares_a_job(item) -> bool:
    """Whether ``item`` reads a module- or session-scoped fixture of this suite (a job its neighbours share)."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(d[-1].scope in ("module", "session") and _in_this_suite(d[-1].func) for d in defs.values() if d)


def _in_this_suite(function) -> bool:
    """Whether ``function`` is defined in a file of this folder (not by pytest or a plugin)."""
    import inspect

    try:
        return Path(inspect.getsourcefile(function) or "").resolve().parent == Path(__file__).resolve().parent
    except TypeError:
        return False


def _share_jobs(items: list) -> None:
    """Under ``pytest -n N --dist loadgroup`` (scripts/test.sh), send every test that reads one of
    ``SESSION_JOBS`` to one worker, and a module's tests that read a module- or session-scoped fixture to one
    worker: the jobs they share then run once, not once per worker."""
    for item in items:
        shared = [name for name in SESSION_JOBS if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
        elif _shares_a_job(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def layout_run(tmp_path_factory):
    """``layout_run(name)``: the ``runtime_helpers.PARITY_LAYOUTS`` layout's real memory per rank and training
    metrics (``runtime_helpers.run_layouts``). The layouts of one world size run in one torchrun job, started
    once per session for every test that reads them (tests/test_check.py's memory comparison,
    tests/test_runtime_parity.py's loss comparison, tests/test_runtime_faults.py's uninterrupted run)."""
    from runtime_helpers import PARITY_LAYOUTS, make_plan, run_layouts

    runs = {}

    def get(name: str):
        if name not in runs:
            plans = {n: make_plan(**kw) for n, kw in PARITY_LAYOUTS.items()}
            world = plans[name].world_size
            group = {n: p for n, p in plans.items() if p.world_size == world}
            runs.update(run_layouts(group, tmp_path_factory.mktemp(f"layouts-world{world}")))
        return runs[name]

    return get


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``trained(name, plan)``: the metrics of ``plan`` trained for ``runtime_helpers.STEPS`` steps with
    ``runtime_helpers.train`` (``meshplan launch``; a 1-rank plan in one process), once per session: the
    one-process baselines that tests/test_runtime_parity.py, tests/test_runtime_loss.py and
    tests/test_runtime_vocab_parallel.py compare with."""
    from runtime_helpers import train

    runs = {}
    workdir = tmp_path_factory.mktemp("trained")

    def get(name: str, plan):
        key = plan.to_yaml()
        if key not in runs:
            runs[key] = train(plan, workdir / name, name)
        return runs[key]

    return get


@pytest.fixture(scope="session")
def fidelity_table():
    """``fidelity_table(path)``: benchmarks/fidelity.py's result over the published runs in ``path``, computed
    once per session for each file content: tests/test_fidelity.py reads ../shared's runs and the golden file's
    fidelity section its committed copy of them (tests/golden/public-runs.yaml)."""
    import contextlib
    import io
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity

    results: dict[bytes, dict] = {}

    def get(path: Path) -> dict:
        key = path.read_bytes()
        if key not in results:
            with contextlib.redirect_stdout(io.StringIO()):
                results[key] = fidelity.run(path)
        return results[key]

    return get
