"""The profiler's sampling rule (``profiler/phases/timing.py: time_reps``): warm-up calls, a trial call that
sizes the samples, and in the quick profile a long trial that is its own sample (pure, one process, fast)."""

from __future__ import annotations

import time

import pytest
import torch

from meshplan.profiler.phases.timing import calls_per_sample, lower_quartile, time_reps

CPU = torch.device("cpu")


def _sleeper(seconds: float, calls: list):
    def fn():
        calls.append(1)
        time.sleep(seconds)
    return fn


def test_samples_follow_the_warm_up_and_the_trial():
    calls = []
    times = time_reps(_sleeper(0.002, calls), CPU, reps=3, warmup=1, sample_seconds=0.0)
    assert len(times) == 3
    assert len(calls) == 1 + 1 + 3          # warm-up, trial, one call a sample (the trial outlasts the sample)
    assert all(t >= 0.002 for t in times)


def test_a_short_call_is_repeated_to_fill_a_sample():
    calls = []
    times = time_reps(_sleeper(0.001, calls), CPU, reps=2, warmup=0, sample_seconds=0.02)
    assert len(times) == 2
    assert len(calls) > 1 + 2 * 2           # several calls a sample
    assert calls_per_sample(0.001, 0.02) == 20


def test_a_trial_at_least_single_call_s_long_is_the_only_sample():
    calls = []
    times = time_reps(_sleeper(0.03, calls), CPU, reps=3, warmup=0, sample_seconds=0.025, single_call_s=0.02)
    assert len(calls) == 1 and len(times) == 1 and times[0] >= 0.03


def test_a_trial_shorter_than_single_call_s_is_sampled_as_usual():
    calls = []
    times = time_reps(_sleeper(0.002, calls), CPU, reps=2, warmup=0, sample_seconds=0.0, single_call_s=1.0)
    assert len(times) == 2 and len(calls) == 1 + 2


def test_the_kept_figure_is_the_lower_quartile():
    assert lower_quartile([4.0, 1.0, 3.0, 2.0, 5.0]) == 2.0
    assert lower_quartile([7.0]) == pytest.approx(7.0)
