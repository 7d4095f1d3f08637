"""torchrun job for tests/test_ring_attention.py: ring attention over the context ranks against the causal
attention of the whole sequence in one process, forward and backward. Writes ``result<rank>.json``."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshplan.launcher.runtime.context_parallel import RingAttention, sequence_positions


def main(out_dir: str, heads: int, kv_heads: int, seq: int, dtype: str) -> None:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
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
    out = RingAttention(dist.group.WORLD)(*local)
    out.backward(grad[:, :, mine].to(compute))
    def error(a, b_):
        return float((a.detach().float() - b_.detach().float()).abs().max() / b_.detach().float().abs().max())
    result = {"out": error(out, ref[:, :, mine]),
              **{f"d{name}": error(t.grad, f.grad[:, :, mine]) for name, t, f in zip("qkv", local, full)},
              "dtypes": [str(t.grad.dtype) for t in local] + [str(out.dtype)]}
    Path(out_dir, f"result{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
