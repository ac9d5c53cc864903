"""The interpreter speed-up (megatron_k15/kernels/interpreter.py) rests on one fact: without
debug mode the interpreter computes its int32 overflow checks and discards them. If a Triton
release starts acting on them, this test fails and the speed-up must go."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_k15.kernels.interpreter import drop_dead_overflow_checks, interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")


def _overflowing_product(x: torch.Tensor) -> torch.Tensor:
    import triton
    import triton.language as tl

    @triton.jit
    def square(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        v = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, v * v)

    out = torch.empty_like(x)
    square[(1,)](x, out, N=x.numel())
    return out


def test_overflow_checks_are_dead_without_debug_and_dropping_them_changes_nothing():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    assert drop_dead_overflow_checks()
    assert not builder.options.sanitize_overflow and not builder.options.debug
    x = torch.tensor([3, 46341, 2**31 - 1, -(2**31)], dtype=torch.int32)  # 46341^2 > 2^31
    expected = (x.to(torch.int64) ** 2).to(torch.int32)  # two's-complement wrap
    fast = _overflowing_product(x)
    saved = builder.options
    builder.options = dataclasses.replace(saved, sanitize_overflow=True)
    try:
        checked = _overflowing_product(x)  # the check runs; its assert is never emitted
    finally:
        builder.options = saved
    assert torch.equal(fast, expected) and torch.equal(checked, expected)
