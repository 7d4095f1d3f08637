"""Checkpoints and faults: a killed rank is restarted by torchrun and the job resumes from the last
checkpoint with the same losses as an uninterrupted run; a missing or corrupt checkpoint is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from meshplan.launcher.runtime.schedule import LRSchedule
from runtime_helpers import PARITY_LAYOUTS, STEPS, job_env, losses, make_plan, read_metrics, run_launch, train

pytestmark = pytest.mark.slow


def test_killed_rank_resumes_from_last_checkpoint(tmp_path, layout_run):
    plan = make_plan(tp=2, pp=2)   # pipeline parts and DTensor shards in the checkpoint
    # the uninterrupted run: the parity matrix's tp2-pp2-1f1b job, the same plan (``layout_run`` in conftest.py)
    assert make_plan(**PARITY_LAYOUTS["tp2-pp2-1f1b"]).to_yaml() == plan.to_yaml()
    reference = layout_run("tp2-pp2-1f1b").records
    assert len(reference) == STEPS == 4
    faulty_dir = tmp_path / "faulty"
    records = train(plan, faulty_dir, "faulty", steps=STEPS,
                    extra=["--checkpoint-dir", str(faulty_dir / "ckpt"), "--checkpoint-every", "2",
                           "--max-restarts", "1"],
                    env=job_env(MESHPLAN_FAULT_STEP="3", MESHPLAN_FAULT_RANK="1"))
    # killed before step 3, restarted from step 2's checkpoint: each step once, in order, and the same losses
    # as the run that was never interrupted
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert losses(records) == pytest.approx(losses(reference), rel=1e-6)
    assert (faulty_dir / "ckpt" / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in (faulty_dir / "ckpt").glob("step-*")) == ["step-00000002", "step-00000004"]


def _one_process(tmp_path, *args):
    plan_path = tmp_path / "one.yaml"
    if not plan_path.exists():
        make_plan().save(plan_path)
    return subprocess.run([sys.executable, "-m", "meshplan.launcher.runtime.train", "--plan", str(plan_path), *args],
                          cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)


def test_a_killed_run_resumes_exactly_and_bad_checkpoints_are_refused(tmp_path):
    """Warm-up, cosine decay, clipping, a token file and a held-out one: a run killed before step 3 and
    started again from its step-2 checkpoint reports the uninterrupted run's losses, evaluation losses,
    learning rates and gradient norms and ends with the same weights; then a corrupt or missing checkpoint is
    refused in one line."""
    import numpy as np
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    rng = np.random.default_rng(1)
    rng.integers(0, 256, 20_000).astype(np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 256, 2_000).astype(np.uint16).tofile(tmp_path / "eval.bin")
    options = ["--steps", "4", "--warmup", "1", "--schedule", "cosine", "--min-lr", "1e-4", "--clip", "0.5",
               "--data", "train.bin", "--eval-data", "eval.bin", "--eval-every", "2", "--eval-batches", "2"]
    full = _one_process(tmp_path, *options, "--metrics-out", "full.jsonl", "--save-hf", "full-hf")
    assert full.returncode == 0, full.stderr
    saving = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--metrics-out", "part.jsonl"]
    killed = subprocess.run([sys.executable, "-m", "meshplan.launcher.runtime.train", "--plan",
                             str(tmp_path / "one.yaml"), *options, *saving], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=job_env(MESHPLAN_FAULT_STEP="3", MESHPLAN_FAULT_RANK="0"))
    assert killed.returncode == 13, killed.stderr
    resumed = _one_process(tmp_path, *options, *saving, "--save-hf", "part-hf")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    full_records, part_records = read_metrics(tmp_path / "full.jsonl"), read_metrics(tmp_path / "part.jsonl")
    assert [r["step"] for r in part_records] == [1, 2, 3, 4]
    assert [r["step"] for r in part_records if "eval_loss" in r] == [2, 4]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in part_records] == pytest.approx([r[key] for r in full_records], rel=1e-6), key
    assert [r.get("eval_loss") for r in part_records] == pytest.approx([r.get("eval_loss") for r in full_records],
                                                                       rel=1e-6)
    final = [load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("full-hf", "part-hf")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])                # the same final weights
    schedule = LRSchedule(base_lr=1e-3, total_steps=4, warmup_steps=1, decay="cosine", min_lr=1e-4)
    assert [r["lr"] for r in full_records] == pytest.approx([schedule.lr_at(s) for s in range(1, 5)])
    assert any(r["grad_norm"] > 0.5 for r in full_records)                             # the clip took effect

    plan = str(tmp_path / "one.yaml")
    # a corrupt shard (truncated file): refused by launch before any rank starts, and by the runtime itself
    shard = next((ckpt / "step-00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    for proc in (run_launch([plan, "--steps", "6", "--checkpoint-dir", str(ckpt)], tmp_path),
                 _one_process(tmp_path, "--steps", "6", "--checkpoint-dir", str(ckpt))):
        assert proc.returncode == 2, proc.stderr
        assert "error: --checkpoint-dir: checkpoint" in proc.stderr and "corrupt" in proc.stderr
        assert "Traceback" not in proc.stderr

    # `latest` naming a checkpoint that is gone
    (ckpt / "latest").write_text("step-00000099\n")
    proc = run_launch([plan, "--steps", "6", "--checkpoint-dir", str(ckpt)], tmp_path)
    assert proc.returncode == 2
    assert "step-00000099 is missing" in proc.stderr and "Traceback" not in proc.stderr

