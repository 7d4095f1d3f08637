"""What a run reports while it trains: the progress line, TensorBoard scalars (launcher/runtime/metrics.py)."""

from __future__ import annotations

from meshplan.launcher.runtime.metrics import ProgressLine, RunLog, format_duration


def _record(step: int, **extra) -> dict:
    return {"step": step, "loss": 2.5, "step_time_s": 0.5, "tokens_per_s": 8192.0, "lr": 3e-4, "grad_norm": 0.91,
            **extra}


def test_progress_line_every_n_steps_with_eta():
    progress = ProgressLine(total_steps=100, every=10)
    lines = {s: progress.line(_record(s)) for s in range(1, 101)}
    assert [s for s, line in lines.items() if line] == [1, *range(10, 101, 10)]
    assert lines[10] == ("step  10/100  loss 2.5000  lr 3.00e-04  grad norm 0.91  8,192 tok/s  0.5 s/step  "
                         "ETA 45s")
    assert lines[100].endswith("ETA 0s")
    line = ProgressLine(10, 1).line(_record(1, eval_loss=2.75, mfu=0.412))
    assert "loss 2.5000  eval 2.7500" in line and "MFU 41.2%" in line


def test_durations():
    assert [format_duration(s) for s in (7, 2530, 11100)] == ["7s", "42m10s", "3h05m"]


def test_tensorboard_gets_every_metric(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(str(tmp_path / "m.jsonl"), str(tmp_path / "tb"), 0, 2, 1, reporter=True)
    log.write(_record(1))
    log.write(_record(2, eval_loss=2.7))
    log.close()
    assert "step 2/2" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/loss")] == [2]
