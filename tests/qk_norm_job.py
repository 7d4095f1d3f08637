"""torchrun job for tests/test_qk_norm.py: the gradients of a one-block model with per-head q/k norms
(``qk_norm``) under tensor parallelism (parallelize.apply_tp) against the same model in one process, for each case
in turn. Writes ``<case>/result<rank>.json``: per parameter, the largest difference from the one-process gradient
relative to its largest entry, and the one-process gradient's norm.

    python -m torch.distributed.run --nproc-per-node 4 tests/qk_norm_job.py OUT CASE [CASE ...]

with CASE = ``name:tp:sequence_parallel:norm:impl`` (sequence_parallel 0 or 1; norm rmsnorm or layernorm; impl
reference or fused). A case of tp < 4 runs on every tensor-parallel group of the job alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from meshplan.launcher.runtime.model import InitConfig, build_model, init_weights, replicated_kv_params
from meshplan.launcher.runtime.parallelize import apply_tp
from meshplan.spec import ModelSpec

BATCH, SEQ = 2, 8
# 4 query heads of 16 over 2 key/value heads (q 64 wide on a hidden of 32): tp 4 holds a copy of one KV head
LLAMA = dict(layers=1, hidden=32, heads=4, kv_heads=2, head_dim=16, qk_norm=True, ffn_hidden=64, vocab=64)
# GPT-NeoX-like: LayerNorm with biases, GELU, tied embeddings; rotary positions, without which the key norm's
# bias would shift every score of a query alike and get no gradient
NEOX = dict(mlp="gelu", norm="layernorm", position="rope", bias=True, tied_embeddings=True)


def spec_of(norm: str) -> ModelSpec:
    return ModelSpec(name=f"qk-{norm}", **LLAMA, **(NEOX if norm == "layernorm" else {}))


def head_norm_values(model: torch.nn.Module) -> None:
    """The q/k norms' weights (and biases) drawn away from their ones (zeros), the same in every process, so
    that a norm applied with another head's or block's weight would show."""
    for name, param in model.named_parameters():
        if "q_norm" in name or "k_norm" in name:
            generator = torch.Generator().manual_seed(len(name) * 7 + param.numel())
            value = 1 + 0.5 * torch.randn(param.shape, generator=generator)
            target = param.to_local() if isinstance(param, DTensor) else param
            with torch.no_grad():
                target.copy_(value)


def loss_of(model: torch.nn.Module, spec: ModelSpec) -> torch.Tensor:
    """A loss every logit contributes to with its own weight."""
    tokens = torch.randint(0, spec.vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    return (logits.float() * probe).sum()


def built(spec: ModelSpec, impl: str, tp_mesh=None, sequence_parallel: bool = False) -> torch.nn.Module:
    model = build_model(spec, SEQ, "meta")
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = impl
    if tp_mesh is not None:
        apply_tp(model, tp_mesh, sequence_parallel)
    model.to_empty(device="cpu")
    init_weights(model, spec, InitConfig(), torch.device("cpu"))
    head_norm_values(model)
    model.set_positions(torch.arange(SEQ))
    return model


def run_case(out: Path, tp: int, sequence_parallel: bool, norm: str, impl: str) -> None:
    spec = spec_of(norm)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    sharded = built(spec, impl, mesh["tp"], sequence_parallel)
    loss_of(sharded, spec).backward()
    whole = built(spec, "reference")
    loss_of(whole, spec).backward()
    expected = dict(whole.named_parameters())
    replicated = replicated_kv_params(sharded)      # their copies' gradients are summed by the training step
    result = {}
    for name, param in sharded.named_parameters():
        if name in replicated:
            continue
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        want = expected[name].grad
        result[name] = {"error": float((grad - want).abs().max() / want.abs().max()), "norm": float(want.norm())}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result{dist.get_rank()}.json").write_text(json.dumps(result))


def main(out_dir: str, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    for case in cases:
        name, tp, sequence_parallel, norm, impl = case.split(":")
        run_case(Path(out_dir, name), int(tp), sequence_parallel == "1", norm, impl)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
