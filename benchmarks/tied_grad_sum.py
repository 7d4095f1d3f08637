"""How autograd sums a tied embedding's two gradients (the input embedding's and the LM head's): in place into
one of them (``aten::add_``) or into a fresh ``vocab x hidden`` tensor (``aten::add``), for the runtime's two
loss paths, recorded by torch.profiler.

    python benchmarks/tied_grad_sum.py [--vocab 4096] [--hidden 256] [--tokens 512]

``fused``: the chunked linear + cross-entropy (kernels/cross_entropy.py ChunkedLinearCrossEntropy, whose head
gradient is a tensor of its own); ``reference``: ``F.linear`` then ``F.cross_entropy`` (model.TiedHead), whose
weight gradient is a transposed view. One step on CPU, in fp32.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

from meshplan.launcher.runtime.kernels.cross_entropy import ChunkedLinearCrossEntropy


def vocab_sized_adds(loss_path: str, vocab: int, hidden: int, tokens: int) -> list[str]:
    """The add ops on ``[vocab, hidden]`` tensors of one forward + backward through ``loss_path``."""
    embedding, projection = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, hidden)
    ids, targets = torch.randint(0, vocab, (tokens,)), torch.randint(0, vocab, (tokens,))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        hidden_states = projection(embedding(ids))
        if loss_path == "fused":
            loss = ChunkedLinearCrossEntropy.apply(hidden_states, embedding.weight, targets, None, 128, -100, True,
                                                   True, "torch", None)
        else:
            loss = F.cross_entropy(F.linear(hidden_states, embedding.weight), targets)
        loss.backward()
    return [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_") and e.input_shapes
            and e.input_shapes[0] == [vocab, hidden]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    rows = []
    for path in ("fused", "reference"):
        adds = vocab_sized_adds(path, args.vocab, args.hidden, args.tokens)
        rows.append([path, ", ".join(adds) or "-",
                     "in place" if adds == ["aten::add_"] else "fresh tensor" if "aten::add" in adds else "-"])
    print(tabulate(rows, headers=["loss path", "ops on [vocab, hidden]", "the two gradients summed"]))


if __name__ == "__main__":
    main()
