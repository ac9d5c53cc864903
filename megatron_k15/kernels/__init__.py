"""Our Triton kernels: flash attention, ring attention, paged decode attention, fused log-probs."""

from megatron_k15.kernels.interpreter import drop_dead_overflow_checks, interpreting

if interpreting():
    drop_dead_overflow_checks()
