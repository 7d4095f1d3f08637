"""Training data: the same global batch for a step whatever the plan; each rank takes its slice.

A step's global batch is ``train.global_batch`` sequences of ``seq_len + 1`` tokens (inputs and the
next-token targets), drawn from a generator seeded by ``(seed, step)`` — so a resumed run sees exactly the
batches an uninterrupted one would. Data-parallel rank ``d`` takes sequences ``[d*B/dp, (d+1)*B/dp)``;
context-parallel rank ``c`` takes its tokens of every sequence (``context_parallel.sequence_positions``:
a contiguous chunk, or under ring attention its zig-zag pair of chunks).

Sources:
    * :class:`SyntheticTokens`: a learnable synthetic stream (arithmetic progressions modulo the vocabulary
      with a little noise), so the loss visibly falls.
    * :class:`TokenFile`: a flat file of token ids (``uint16`` or ``uint32``, nanoGPT's ``train.bin``, what
      ``meshplan data prepare`` writes); each sequence starts at a random offset.
    * :class:`EvalTokens`: a held-out token file read in order, for the evaluation loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meshplan.launcher.checks import check_token_file, token_file_dtype
from meshplan.plan import Plan


def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + step)
    return g


class SyntheticTokens:
    """Sequences ``t_i = (start + stride * i) mod V``, 5% of tokens replaced by noise."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.seed = vocab, seed

    def batch(self, step: int, sequences: int, length: int) -> torch.Tensor:
        g = _generator(self.seed, step)
        start = torch.randint(0, self.vocab, (sequences, 1), generator=g)
        stride = torch.randint(1, 8, (sequences, 1), generator=g)
        tokens = (start + stride * torch.arange(length)[None, :]) % self.vocab
        noise = torch.rand(sequences, length, generator=g) < 0.05
        return torch.where(noise, torch.randint(0, self.vocab, (sequences, length), generator=g), tokens)


class TokenFile:
    """A flat binary file of token ids, memory-mapped; each sequence starts at a random offset drawn from
    ``(seed, step)``, so a resumed run reads exactly the sequences an uninterrupted one would."""

    def __init__(self, path: str | Path, vocab: int, dtype: str = "uint16", seed: int = 0, length: int = 2,
                 field: str = "--data"):
        check_token_file(path, dtype, vocab, length, field)
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.vocab, self.seed, self.path = vocab, seed, Path(path)

    def batch(self, step: int, sequences: int, length: int) -> torch.Tensor:
        g = _generator(self.seed, step)
        starts = torch.randint(0, len(self.tokens) - length + 1, (sequences,), generator=g).tolist()
        return self._rows(starts, length)

    def _rows(self, starts: list[int], length: int) -> torch.Tensor:
        rows = [torch.from_numpy(np.asarray(self.tokens[s: s + length]).astype(np.int64)) for s in starts]
        return torch.stack(rows)


class EvalTokens(TokenFile):
    """A held-out token file read in order: evaluation batch ``i`` holds the ``sequences`` consecutive,
    non-overlapping windows of ``length`` tokens after the first ``i * sequences``, the same windows at every
    evaluation, so the evaluation losses of a run compare. ``batches``: how many whole batches are read
    (at most ``max_batches``, as many as the file holds)."""

    def __init__(self, path: str | Path, vocab: int, dtype: str, sequences: int, length: int, max_batches: int):
        super().__init__(path, vocab, dtype, 0, sequences * length, field="--eval-data")
        self.sequences, self.length = sequences, length
        self.batches = min(max_batches, len(self.tokens) // (sequences * length))

    def eval_batch(self, i: int) -> torch.Tensor:
        first = i * self.sequences
        return self._rows([(first + j) * self.length for j in range(self.sequences)], self.length)


@dataclass(frozen=True)
class Slice:
    """Which part of the global batch a rank trains on."""

    dp_rank: int
    dp: int
    cp_rank: int
    cp: int
    cp_kind: str     # the plan's: ring attention's ranks hold zig-zag chunks, Ulysses' contiguous ones

    @classmethod
    def of_rank(cls, plan: Plan, coords: dict[str, int]) -> Slice:
        """The slice of the rank at mesh coordinates ``coords`` of ``plan``."""
        return cls(coords["dp"], plan.dp, coords["cp"], plan.cp, plan.cp_kind)

    def take(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of this rank from the global ``(B, S+1)`` token batch."""
        from meshplan.launcher.runtime.context_parallel import sequence_positions

        rows = tokens.shape[0] // self.dp
        mine = tokens[self.dp_rank * rows: (self.dp_rank + 1) * rows]
        inputs, targets = mine[:, :-1], mine[:, 1:]
        if self.cp == 1:
            return inputs.contiguous(), targets.contiguous()
        positions = sequence_positions(inputs.shape[1], self.cp_rank, self.cp, self.cp_kind)
        return inputs[:, positions].contiguous(), targets[:, positions].contiguous()


def make_source(vocab: int, seed: int, path: str | None, dtype: str | None, length: int = 2):
    """The training stream: synthetic, or the token file ``path`` (``length``: the tokens one sequence needs)."""
    if path is None:
        return SyntheticTokens(vocab, seed)
    return TokenFile(path, vocab, token_file_dtype(dtype, vocab, path), seed, length)
