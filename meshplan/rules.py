"""Rules more than one layer needs, decided here once (DESIGN.md: one place decides each thing).

Torch-free and importing nothing above the nouns: the planner prices plans with these rules, the profiler
fits its measurements with them and the runtime's kernels run with them.
"""

from __future__ import annotations

import math

# Bytes per element of a precision's compute dtype (``TrainSpec.precision``); fp8 matmul operands are 1 byte.
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# Bytes per element of the activations a block keeps for its backward: fp8 training keeps bf16 inputs.
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}

MIN_LOSS_CHUNK_TOKENS = 256


def loss_chunk_tokens(tokens: int, hidden: int, vocab_local: int) -> int:
    """Tokens per chunk of the fused (chunked) linear + cross-entropy, at most T:
    ``max(next_pow2(ceil(T / ceil(V_local / h))), 256)``.

    The first term is Liger-Kernel's rule: one chunk's logits about as large as the hidden states
    (``chunk * V_local ~ T * h``). The floor keeps each chunk's weight-gradient accumulation worth its memory
    traffic: a chunk reads and writes the ``[V_local, h]`` gradient (2·b·V_local·h bytes) for 2·c·V_local·h
    FLOPs, c/b FLOP per byte, 64 at c = 256 in fp32, above a CPU's ridge point; Liger's rule alone gives 8-token
    chunks at h = 256, V_local = 32k, T = 512 and runs 3.8x slower than 512-token chunks on a CPU
    (docs/vocab-parallel.md). At LLM shapes (h >= 4096, T >= 8192) Liger's rule is already >= 256.
    The runtime's kernel (``launcher/runtime/kernels/cross_entropy.default_chunk_tokens``) runs this chunk and
    the planner's memory and time terms (``planner/memory.py``, ``planner/vocab.py``) count it."""
    if tokens <= 0:
        return 1
    factor = max(1, math.ceil(vocab_local / max(hidden, 1)))
    chunk = max(1, math.ceil(tokens / factor))
    return int(min(tokens, max(1 << (chunk - 1).bit_length(), MIN_LOSS_CHUNK_TOKENS)))
