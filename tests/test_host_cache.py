"""`plan --cluster localhost:N` measures this machine once and reads the measurement back afterwards; a corrupt
or stale cache entry is measured again, never trusted. The profiling job itself is replaced here by a stub that
returns a measured cluster (the real job runs in tests/test_readme_quickstart.py, marked slow)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from meshplan.errors import InputError
from meshplan.profiler import cli as profiler_cli
from meshplan.profiler import host_cache
from meshplan.spec import ClusterSpec, load_cluster, load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHPLAN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_measure(spec, seq, precision, micro_batches, ranks, **kwargs):
        calls.append((spec.name, seq, precision, ranks, kwargs.get("quick")))
        base = load_cluster(f"localhost:{ranks}")
        measured = {"date": "2026-01-01T00:00:00+00:00", "compute": {"precision": precision, "matmul_tflops": 0.25}}
        return dataclasses.replace(base, name=f"profiled:host:1x{ranks}", measured=measured)

    monkeypatch.setattr(profiler_cli, "measure", fake_measure)
    return tmp_path / "cache", calls


def measure(lines=None, ranks=2, seq=64):
    base = load_cluster(f"localhost:{ranks}")
    return host_cache.measured_localhost(base, load_model("tiny-llama"), seq, "fp32",
                                         echo=(lines.append if lines is not None else lambda _: None))


def test_first_use_measures_then_the_cache_is_read(cache):
    folder, calls = cache
    lines: list[str] = []
    first = measure(lines)
    assert len(calls) == 1 and calls[0][-1] is True                     # the quick profile
    assert first.name == "localhost:2" and first.measured["compute"]["matmul_tflops"] == 0.25
    assert any("measuring this machine once" in line and str(folder) in line for line in lines)
    second = measure(lines)
    assert len(calls) == 1, "the second plan must not measure again"
    assert any("using this machine's measurement cached" in line for line in lines)
    assert second == first


def test_before_measuring_runs_only_when_a_profile_starts(cache):
    """``meshplan plan``'s refusals of what no measurement changes run before a quick profile, not on a
    cache hit (where they cost a search for nothing)."""
    _, calls = cache
    order: list[str] = []

    def before():
        order.append(f"before, {len(calls)} profiles so far")
    base = load_cluster("localhost:2")
    for _ in range(2):
        host_cache.measured_localhost(base, load_model("tiny-llama"), 64, "fp32", echo=lambda _: None,
                                      before_measuring=before)
    assert order == ["before, 0 profiles so far"] and len(calls) == 1


def test_a_different_job_shape_or_rank_count_is_measured_on_its_own(cache):
    _, calls = cache
    measure(seq=64)
    measure(seq=128)
    measure(ranks=4)
    assert [(seq, ranks) for _, seq, _, ranks, _ in calls] == [(64, 2), (128, 2), (64, 4)]


def entry_file(folder):
    files = sorted(folder.glob("localhost-*.yaml"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other torch", "no measurement"])
def test_a_corrupt_or_stale_entry_is_measured_again(cache, damage):
    folder, calls = cache
    measure()
    path = entry_file(folder)
    data = yaml.safe_load(path.read_text())
    if damage == "garbage":
        path.write_text("{{{ not yaml")
    elif damage == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif damage == "other torch":
        data["key"]["torch"] = "0.0.1"
        path.write_text(yaml.safe_dump(data))
    else:
        data["cluster"]["measured"] = None
        path.write_text(yaml.safe_dump(data))
    lines: list[str] = []
    again = measure(lines)
    assert len(calls) == 2, f"a {damage} entry must be measured again"
    assert any("measuring again" in line for line in lines)
    assert again.measured["compute"]["matmul_tflops"] == 0.25
    assert yaml.safe_load(entry_file(folder).read_text())["key"]["torch"] == host_cache.torch_version()


def test_a_failed_measurement_is_one_clear_error(cache, monkeypatch):
    monkeypatch.setattr(profiler_cli, "measure", lambda *a, **k: None)
    with pytest.raises(InputError, match="--no-profile"):
        measure()


def test_the_cache_entry_loads_as_a_cluster_file(cache):
    folder, _ = cache
    measure()
    data = yaml.safe_load(entry_file(folder).read_text())
    assert ClusterSpec.from_dict(data["cluster"]).measured["compute"]["matmul_tflops"] == 0.25
    assert data["key"]["ranks"] == 2 and data["key"]["seq_len"] == 64


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("MESHPLAN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if host_cache.sys.platform.startswith("linux"):
        assert host_cache.cache_dir() == tmp_path / "meshplan"
