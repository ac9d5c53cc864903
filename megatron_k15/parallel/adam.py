"""The AdamW update of one flat fp32 master shard, three interchangeable implementations.

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    w = w (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

with weight decay only on the shard's ``decay_ranges`` (matrices; not biases and norms).

- ``unfused``: the formula as PyTorch elementwise ops over the whole flat shard (a handful of
  passes over memory; works everywhere, the reference the others are tested against);
- ``fused``: ``torch._fused_adamw_`` (PyTorch's single-kernel AdamW, CUDA and CPU) over views
  of the decayed and the other ranges;
- ``apex``: NVIDIA apex's ``multi_tensor_adam`` (what Megatron-LM's FusedAdam runs), when
  apex with its CUDA extensions is installed.

``auto`` picks apex on CUDA when importable, else fused when this PyTorch has it, else
unfused (``--adam-impl``).
"""

from __future__ import annotations

import importlib.util

import torch

ADAM_IMPLS = ("auto", "apex", "fused", "unfused")


def apex_available() -> bool:
    return importlib.util.find_spec("apex") is not None and importlib.util.find_spec("amp_C") is not None


def resolve_adam_impl(name: str, device: torch.device) -> str:
    if name not in ADAM_IMPLS:
        raise ValueError(f"--adam-impl must be one of {ADAM_IMPLS}, got {name!r}")
    if name == "apex" and not (device.type == "cuda" and apex_available()):
        raise ValueError("--adam-impl apex needs NVIDIA apex built with its CUDA extensions (amp_C) "
                         "and a CUDA device; use --adam-impl fused or auto")
    if name != "auto":
        return name
    if device.type == "cuda" and apex_available():
        return "apex"
    return "fused" if hasattr(torch, "_fused_adamw_") else "unfused"


def _segments(numel: int, decay_ranges: list[tuple[int, int]]):
    """(decayed, not decayed) lists of (start, end) covering [0, numel)."""
    decayed, other, pos = [], [], 0
    for lo, hi in decay_ranges:
        if lo > pos:
            other.append((pos, lo))
        decayed.append((lo, hi))
        pos = hi
    if pos < numel:
        other.append((pos, numel))
    return decayed, other


def adamw_step(impl: str, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *,
               step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               decay_ranges: list[tuple[int, int]]) -> None:
    """One AdamW step in place on the flat fp32 shard ``w`` with moments ``m``, ``v`` and
    gradient ``g`` (already clipped); ``step`` counts from 1."""
    b1, b2 = betas
    if impl == "unfused":
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if weight_decay and decay_ranges:
            # 1 - lr * wd rounded in fp32, as a per-element fp32 product would be
            keep = 1.0 - torch.tensor(lr * weight_decay, dtype=torch.float32, device=w.device)
            for lo, hi in decay_ranges:
                w[lo:hi].mul_(keep)
        w.addcdiv_(m / (1.0 - b1 ** step), (v / (1.0 - b2 ** step)).sqrt_().add_(eps), value=-lr)
        return
    decayed, other = _segments(w.numel(), decay_ranges if weight_decay else [])
    for ranges, wd in ((decayed, weight_decay), (other, 0.0)):
        if not ranges:
            continue
        ws, gs, ms, vs = ([t[lo:hi] for lo, hi in ranges] for t in (w, g, m, v))
        if impl == "fused":
            steps = [torch.tensor(float(step), device=w.device) for _ in ranges]
            torch._fused_adamw_(ws, gs, ms, vs, [], steps, lr=lr, beta1=b1, beta2=b2,
                                weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
        elif impl == "apex":
            import amp_C
            from apex.multi_tensor_apply import multi_tensor_applier

            noop = torch.zeros(1, dtype=torch.int, device=w.device)
            multi_tensor_applier(amp_C.multi_tensor_adam, noop, [gs, ws, ms, vs], lr, b1, b2, eps,
                                 step, 1, 1, wd)  # mode 1 = AdamW (decoupled decay), bias correction
        else:
            raise ValueError(f"unknown Adam implementation {impl!r}")
