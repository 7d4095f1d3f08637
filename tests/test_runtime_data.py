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
    parts = {(d, c): Slice(d, 2, c, 2, "ulysses").take(tokens) for d in range(2) for c in range(2)}
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


def test_short_files_are_refused_by_launch_before_any_rank_starts(tmp_path):
    """--data shorter than one sequence, --eval-data shorter than one global batch: one line each (``meshplan
    launch`` in this process: the refusals come before torchrun)."""
    from contextlib import chdir as _chdir

    from typer.testing import CliRunner

    from meshplan.cli import app

    plan = tmp_path / "dp2.yaml"
    make_plan(dp=2).save(plan)                               # batch 8 x (32 + 1) tokens
    np.zeros(32, dtype=np.uint16).tofile(tmp_path / "short.bin")
    np.zeros(8 * 33 - 1, dtype=np.uint16).tofile(tmp_path / "eval.bin")
    np.zeros(1000, dtype=np.uint16).tofile(tmp_path / "ok.bin")
    cases = [(["--data", "short.bin"], "--data", "32 tokens, fewer than the 33 one batch needs"),
             (["--data", "ok.bin", "--eval-data", "eval.bin"], "--eval-data", "263 tokens, fewer than the 264"),
             (["--eval-data", "nowhere.bin"], "--eval-data", "no such file"),
             (["--eval-every", "-1"], "--eval-every", ">= 0"), (["--log-every", "0"], "--log-every", ">= 1")]
    for args, field, problem in cases:
        with _chdir(tmp_path):
            result = CliRunner().invoke(app, ["launch", str(plan), "--steps", "1", "--no-check", *args])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}") and problem in lines[0], lines


def test_the_runtime_refuses_bad_counts_when_run_directly(tmp_path, capsys):
    """The runtime module checks the evaluation and logging counts itself (it is also run without ``launch``)."""
    from meshplan.launcher.runtime.train import main

    plan = tmp_path / "one.yaml"
    make_plan().save(plan)
    for option, value, bound in (("--eval-batches", "0", ">= 1"), ("--eval-every", "-2", ">= 0"),
                                 ("--log-every", "0", ">= 1")):
        assert main(["--plan", str(plan), "--steps", "1", option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {option}") and bound in err[0], err


def test_eval_windows_are_consecutive_and_the_same_at_every_evaluation(tmp_path):
    from meshplan.launcher.runtime.data import EvalTokens

    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "eval.bin")
    held_out = EvalTokens(tmp_path / "eval.bin", 1000, "uint16", sequences=4, length=33, max_batches=100)
    assert held_out.batches == 1000 // (4 * 33)
    first, second = held_out.eval_batch(0), held_out.eval_batch(1)
    assert torch.equal(first[:, 0], torch.tensor([0, 33, 66, 99])) and second[0, 0] == 132
    assert torch.equal(held_out.eval_batch(1), second)
    assert EvalTokens(tmp_path / "eval.bin", 1000, "uint16", 4, 33, max_batches=2).batches == 2


def test_token_file_batches_depend_on_seed_and_step_only(tmp_path):
    """What a resumed run reads: step s's sequences are the same in any run with the same seed."""
    np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16).tofile(tmp_path / "t.bin")
    a, b = TokenFile(tmp_path / "t.bin", 256, seed=3), TokenFile(tmp_path / "t.bin", 256, seed=3)
    assert torch.equal(a.batch(7, 4, 33), b.batch(7, 4, 33))
    assert not torch.equal(a.batch(7, 4, 33), a.batch(8, 4, 33))
