"""The learning-rate schedule's formula, its one-line errors, and the global gradient norm and clipping in one
process (the parity tests compare the norm of every layout with one process: tests/test_runtime_parity.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from meshplan.errors import InputError
from meshplan.launcher.runtime.grad_norm import clip_grads, copies, global_grad_norm
from meshplan.launcher.runtime.schedule import LRSchedule
from runtime_helpers import make_plan


def test_warmup_then_cosine_and_linear_reach_the_floor_at_the_last_step():
    cosine = LRSchedule(base_lr=1e-3, total_steps=10, warmup_steps=2, decay="cosine", min_lr=1e-4)
    assert [cosine.lr_at(s) for s in (1, 2)] == pytest.approx([5e-4, 1e-3])
    assert cosine.lr_at(6) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine.lr_at(10) == pytest.approx(1e-4)
    linear = LRSchedule(base_lr=1e-3, total_steps=10, warmup_steps=0, decay="linear", min_lr=0.0)
    assert [linear.lr_at(s) for s in (1, 5, 10)] == pytest.approx([0.9e-3, 0.5e-3, 0.0])
    assert LRSchedule(base_lr=3e-4, total_steps=5).lr_at(5) == 3e-4


@pytest.mark.parametrize("fields, option", [
    (dict(decay="step"), "--schedule"), (dict(warmup_steps=10), "--warmup"), (dict(warmup_steps=-1), "--warmup"),
    (dict(min_lr=2e-3), "--min-lr"), (dict(base_lr=0.0), "--lr"),
])
def test_bad_schedule_options_are_one_line_naming_the_option(fields, option):
    with pytest.raises(InputError) as error:
        LRSchedule(**{"base_lr": 1e-3, "total_steps": 10, **fields}).validate()
    assert error.value.field == option and "\n" not in str(error.value)


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_process_norm_and_clipping_are_torchs(one_process_group):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    plan = make_plan()
    norm = global_grad_norm([(0, model)], plan, tied=False, device=torch.device("cpu"))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    reference = [p.grad.clone() for p in model.parameters()]
    clip_grads([(0, model)], norm, max_norm=0.5 * norm.item())
    for grad, before in zip((p.grad for p in model.parameters()), reference):
        assert torch.allclose(grad, before * 0.5 * norm / (norm + 1e-6))


def test_a_plain_parameter_is_held_by_every_data_and_tensor_rank():
    assert copies(torch.zeros(3), make_plan(dp=2, tp=2, pp=2)) == 4
    assert copies(torch.zeros(3), make_plan(cp=2, pp=2)) == 2
