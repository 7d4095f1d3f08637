"""torchrun job for tests/test_ring_attention.py: ring attention over the context ranks against the causal
attention of the whole sequence in one process, forward and backward, for each case in turn on the first ``cp``
ranks of the job (a process group of their own). Writes ``<case>/result<rank>.json``.

    python -m torch.distributed.run --nproc-per-node N tests/ring_attention_job.py OUT CASE [CASE ...]

with CASE = ``name:cp:heads:kv_heads:seq:dtype`` and cp <= N.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshplan.launcher.runtime.context_parallel import RingAttention, sequence_positions


def run_case(out: Path, group, rank: int, n: int, heads: int, kv_heads: int, seq: int, dtype: str) -> None:
    torch.manual_seed(0)
    b, d = 2, 16
    compute = getattr(torch, dtype)
    q, k, v = (torch.randn(b, h, seq, d) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(b, heads, seq, d)
    # the whole sequence in one process, in fp32
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=kv_heads != heads)
    ref.backward(grad)
    # this rank's zig-zag tokens
    mine = sequence_positions(seq, rank, n, "ring")
    local = [t[:, :, mine].to(compute).detach().requires_grad_() for t in (q, k, v)]
    out_local = RingAttention(group)(*local)
    out_local.backward(grad[:, :, mine].to(compute))

    def error(a, b_):
        return float((a.detach().float() - b_.detach().float()).abs().max() / b_.detach().float().abs().max())

    result = {"out": error(out_local, ref[:, :, mine]),
              **{f"d{name}": error(t.grad, f.grad[:, :, mine]) for name, t, f in zip("qkv", local, full)},
              "dtypes": [str(t.grad.dtype) for t in local] + [str(out_local.dtype)]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result{rank}.json").write_text(json.dumps(result))


def main(out_dir: str, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases:
        name, cp, heads, kv_heads, seq, dtype = case.split(":")
        cp = int(cp)
        group = dist.new_group(list(range(cp)))     # every rank of the job takes part in making it
        if rank < cp:
            run_case(Path(out_dir, name), group, rank, cp, int(heads), int(kv_heads), int(seq), dtype)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
