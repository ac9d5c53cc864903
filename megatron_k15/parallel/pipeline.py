"""Pipeline parallelism: stage-to-stage P2P and the 1F1B schedule (device-neutral).

Each rank runs one stage (``models.gpt.GPTModel`` with its ``pp_rank``). Activations flow
forward and their gradients backward as point-to-point messages inside the pp group; paired
sends/receives go through ``batch_isend_irecv`` so neighbouring stages never deadlock.

1F1B with m microbatches and p stages, stage r:
    warm-up:   min(p - r - 1, m) forwards
    steady:    one forward, then one backward, until every forward was issued
    cool-down: the remaining backwards
which bounds the activations a stage keeps alive to p - r microbatches (instead of m).

Every stage knows each microbatch (ids, labels, lengths), so the shape of the tensor it will
receive is computed locally (``shape_fn``) and no shape message is needed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_k15.profiling import phase


class StageComm:
    """Point-to-point links of one pipeline stage to its neighbours."""

    def __init__(self, pp_group: Optional[dist.ProcessGroup], device: torch.device, dtype: torch.dtype):
        self.group = pp_group
        self.size = 1 if pp_group is None else dist.get_world_size(pp_group)
        self.rank = 0 if pp_group is None else dist.get_rank(pp_group)
        self.device, self.dtype = device, dtype
        self.is_first = self.rank == 0
        self.is_last = self.rank == self.size - 1
        if self.size > 1:
            self.prev = dist.get_global_rank(pp_group, (self.rank - 1) % self.size)
            self.next = dist.get_global_rank(pp_group, (self.rank + 1) % self.size)

    def _exchange(self, send: list[tuple[torch.Tensor, int]], recv: list[tuple[Sequence[int], int]]):
        ops, buffers = [], []
        for shape, peer in recv:
            buf = torch.empty(tuple(shape), device=self.device, dtype=self.dtype, requires_grad=False)
            buffers.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
        for tensor, peer in send:
            ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), peer, self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return buffers

    def recv_forward(self, shape) -> Optional[torch.Tensor]:
        if self.is_first:
            return None
        x = self._exchange([], [(shape, self.prev)])[0]
        return x.requires_grad_()

    def send_forward(self, y: Optional[torch.Tensor]) -> None:
        if not self.is_last:
            self._exchange([(y, self.next)], [])

    def recv_backward(self, shape) -> Optional[torch.Tensor]:
        if self.is_last:
            return None
        return self._exchange([], [(shape, self.next)])[0]

    def send_backward(self, grad: Optional[torch.Tensor]) -> None:
        if not self.is_first:
            self._exchange([(grad, self.prev)], [])

    def send_forward_recv_backward(self, y, shape) -> Optional[torch.Tensor]:
        if self.is_last:
            return None
        return self._exchange([(y, self.next)], [(shape, self.next)])[0]

    def send_backward_recv_forward(self, grad, shape) -> Optional[torch.Tensor]:
        if self.is_first:
            return None
        x = self._exchange([(grad, self.prev)], [(shape, self.prev)])[0]
        return x.requires_grad_()


def _backward(input_tensor, output, grad_output, i: int):
    """Backprop microbatch ``i`` through this stage; return the grad of its input activation."""
    with phase(f"backward microbatch {i}"):
        if grad_output is None:  # last stage: ``output`` is the scalar loss
            torch.autograd.backward(output)
        else:
            torch.autograd.backward(output, grad_tensors=grad_output)
    return None if input_tensor is None else input_tensor.grad


def forward_backward(
    forward_step: Callable[[Any, Optional[torch.Tensor]], Any],
    microbatches: Sequence[Any],
    comm: StageComm,
    shape_fn: Callable[[Any], Sequence[int]],
    forward_only: bool = False,
    before_backward: Optional[Callable[[int], None]] = None,
    loss_scale: float = 1.0,
) -> list:
    """Run the 1F1B schedule (or forward-only).

    ``forward_step(mb, input_tensor)`` returns the stage's output activation, or on the last
    stage ``(loss, result)`` where ``loss`` is the scalar to backprop (already normalised by
    the caller) and ``result`` is anything to hand back. Returns the last stage's results in
    microbatch order (empty on other stages). ``before_backward(i)`` runs before microbatch
    i's backward (the data-parallel optimizer starts reducing grads on the last one).
    ``loss_scale``: the last stage backprops ``loss * loss_scale`` (fp16 loss scaling; the
    gradients other stages receive carry the factor with them).
    """
    hook = before_backward or (lambda i: None)
    m = len(microbatches)
    results: list = []

    def run_forward(i, x):
        with phase(f"forward microbatch {i}"):
            out = forward_step(microbatches[i], x)
        if comm.is_last:
            loss, res = out
            results.append(res)
            return (loss * loss_scale if loss_scale != 1.0 else loss), None
        return out, out

    if forward_only:
        with torch.no_grad():
            for i in range(m):
                x = comm.recv_forward(shape_fn(microbatches[i]))
                _, y = run_forward(i, x)
                comm.send_forward(y)
        return results

    warmup = min(comm.size - comm.rank - 1, m)
    steady = m - warmup
    pending: list[tuple[Optional[torch.Tensor], torch.Tensor]] = []

    # Locals are dropped as soon as a message is sent: a reference left to the previous
    # microbatch's input (with its .grad), output or received grad would keep those
    # activation-sized tensors alive through the next forward.
    for i in range(warmup):
        x = comm.recv_forward(shape_fn(microbatches[i]))
        loss_or_act, y = run_forward(i, x)
        comm.send_forward(y)
        pending.append((x, loss_or_act))
        del x, loss_or_act, y

    x = comm.recv_forward(shape_fn(microbatches[warmup])) if steady > 0 else None
    for j in range(steady):
        i = warmup + j
        loss_or_act, y = run_forward(i, x)
        back_mb = i - warmup  # the oldest microbatch still waiting for its backward
        grad_y = comm.send_forward_recv_backward(y, shape_fn(microbatches[back_mb]))
        pending.append((x, loss_or_act))
        x = loss_or_act = y = None
        x_in, out = pending.pop(0)
        hook(back_mb)
        grad_x = _backward(x_in, out, grad_y, back_mb)
        del x_in, out, grad_y
        if j == steady - 1:
            comm.send_backward(grad_x)
        else:
            x = comm.send_backward_recv_forward(grad_x, shape_fn(microbatches[i + 1]))
        del grad_x

    for k in range(warmup):
        back_mb = steady + k
        grad_y = comm.recv_backward(shape_fn(microbatches[back_mb]))
        x_in, out = pending.pop(0)
        hook(back_mb)
        grad_x = _backward(x_in, out, grad_y, back_mb)
        del x_in, out, grad_y
        comm.send_backward(grad_x)
        del grad_x
    return results
