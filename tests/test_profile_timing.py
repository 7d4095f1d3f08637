"""The profiler's sampling rule (``profiler/phases/timing.py: time_reps``): warm-up calls, a trial call that
sizes the samples, and in the quick profile a long trial that is its own sample (pure, one process, fast: a
fake clock that each call advances, so no figure depends on this machine's load)."""

from __future__ import annotations

import types

import pytest
import torch

from meshplan.profiler.phases import timing

CPU = torch.device("cpu")


@pytest.fixture
def clock(monkeypatch):
    """``clock(seconds)``: a call that advances the timing module's clock by ``seconds``; ``clock.calls`` counts
    the calls."""
    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def make(seconds: float):
        def fn():
            make.calls += 1
            now[0] += seconds
        return fn
    make.calls = 0
    return make


def test_samples_follow_the_warm_up_and_the_trial(clock):
    times = timing.time_reps(clock(0.002), CPU, reps=3, warmup=1, sample_seconds=0.0)
    assert times == pytest.approx([0.002] * 3)
    assert clock.calls == 1 + 1 + 3          # warm-up, trial, one call a sample (the trial outlasts the sample)


def test_a_short_call_is_repeated_to_fill_a_sample(clock):
    times = timing.time_reps(clock(0.001), CPU, reps=2, warmup=0, sample_seconds=0.02)
    assert times == pytest.approx([0.001] * 2)
    assert clock.calls == 1 + 2 * 20         # trial, then 20 calls a sample
    assert timing.calls_per_sample(0.001, 0.02) == 20


def test_a_trial_at_least_single_call_s_long_is_the_only_sample(clock):
    times = timing.time_reps(clock(0.03), CPU, reps=3, warmup=0, sample_seconds=0.025, single_call_s=0.02)
    assert clock.calls == 1 and times == pytest.approx([0.03])


def test_a_trial_shorter_than_single_call_s_is_sampled_as_usual(clock):
    times = timing.time_reps(clock(0.002), CPU, reps=2, warmup=0, sample_seconds=0.0, single_call_s=1.0)
    assert len(times) == 2 and clock.calls == 1 + 2


def test_the_kept_figure_is_the_lower_quartile():
    assert timing.lower_quartile([4.0, 1.0, 3.0, 2.0, 5.0]) == 2.0
    assert timing.lower_quartile([7.0]) == pytest.approx(7.0)
