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

# torch._grouped_mm's operands: rows aligned to 16 bytes (its checks: "strides should be multiple of 16 bytes").
GROUPED_GEMM_ALIGN_BYTES = 16


def head_is_whole(tp: int, pp: int, vocab_parallel: bool) -> bool:
    """Whether the rank holding the LM head holds all of its vocabulary rows: no tensor-parallel split
    (tp 1) and no split over pipeline ranks (``vocab_parallel`` with pp > 1). liger-kernel's loss needs it."""
    return tp == 1 and not (vocab_parallel and pp > 1)


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
    return int(min(tokens, max(liger_loss_chunk_tokens(tokens, hidden, vocab_local), MIN_LOSS_CHUNK_TOKENS)))


def liger_loss_chunk_tokens(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk of liger-kernel's fused linear cross-entropy, at most T: ``next_pow2(ceil(T / ceil(V /
    h)))`` (``liger_kernel/ops/fused_linear_cross_entropy.py`` at its default ``chunk_mem_const = 1``)."""
    if tokens <= 0:
        return 1
    factor = max(1, math.ceil(vocab / max(hidden, 1)))
    chunk = max(1, math.ceil(tokens / factor))
    return int(min(tokens, 1 << (chunk - 1).bit_length()))


def grouped_expert_gemms(compute_bytes: int, hidden: int, expert_width: int) -> bool:
    """The routed experts of an MoE block run as three grouped GEMMs (``torch._grouped_mm``: gate, up and down
    of every local expert at once, as torchtitan's ``GroupedExperts``) when the block computes in bf16
    (``compute_bytes`` 2: the op and its meta function take bf16) and rows of ``hidden`` and ``expert_width``
    elements keep the op's 16-byte alignment; otherwise one GEMM per local expert and weight. The runtime
    (``launcher/runtime/moe.py`` GroupedExperts) runs this choice and the planner (``planner/moe.py``
    matmul_sequence) counts its matmuls for selective recompute."""
    return (compute_bytes == 2 and (hidden * compute_bytes) % GROUPED_GEMM_ALIGN_BYTES == 0
            and (expert_width * compute_bytes) % GROUPED_GEMM_ALIGN_BYTES == 0)
