"""Data sources: a flat token file trains; the global batch is sliced the same way for every plan."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from meshplan.launcher.runtime.data import Slice, SyntheticTokens, TokenFile
from runtime_helpers import job_env, make_plan, read_metrics


def test_slices_tile_the_global_batch():
    tokens = SyntheticTokens(256, seed=3).batch(step=7, sequences=8, length=33)
    assert torch.equal(tokens, SyntheticTokens(256, seed=3).batch(step=7, sequences=8, length=33))
    parts = {(d, c): Slice(d, 2, c, 2).take(tokens) for d in range(2) for c in range(2)}
    inputs = torch.cat([torch.cat([parts[(d, c)][0] for c in range(2)], dim=1) for d in range(2)])
    targets = torch.cat([torch.cat([parts[(d, c)][1] for c in range(2)], dim=1) for d in range(2)])
    assert torch.equal(inputs, tokens[:, :-1]) and torch.equal(targets, tokens[:, 1:])


def test_token_file_trains_and_bad_files_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "tokens.bin"
    rng.integers(0, 256, size=4096, dtype=np.uint16).tofile(good)
    assert TokenFile(good, 256).batch(1, 4, 33).shape == (4, 33)
    plan = tmp_path / "one.yaml"
    make_plan().save(plan)
    run = [sys.executable, "-m", "meshplan.launcher.runtime.train", "--plan", str(plan), "--steps", "2"]
    proc = subprocess.run(run + ["--data", str(good), "--metrics-out", "m.jsonl"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2]
    big = tmp_path / "big.bin"
    np.full(100, 1000, dtype=np.uint16).tofile(big)   # ids beyond the vocabulary (e.g. another tokenizer)
    proc = subprocess.run(run + ["--data", str(big)], cwd=tmp_path, env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "error: --data:" in proc.stderr and "vocabulary is 256" in proc.stderr
