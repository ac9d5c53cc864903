"""Grouped GEMM for mixture-of-experts layers: every expert's GEMM in one launch.

``grouped_linear(x, weight, group_ends)``

* x (N, K): rows sorted by group (expert), group g holding rows ``[ends[g-1], ends[g])``;
* weight (G, M, K): one ``nn.Linear`` weight (out M, in K) per group;
* group_ends (G,) int64 on x's device: the cumulative row counts (``counts.cumsum(0)``).

Returns y (N, M) with y[rows of g] = x[rows of g] @ weight[g]^T; differentiable in x and
weight. The row counts stay on the device: no host synchronisation, unlike a Python loop of
one GEMM pair per expert (which also pays a launch per expert and idles the GPU on the
experts that got few rows; 128 experts x 48 layers is 6K small GEMMs per forward).

Kernels (Triton, fp32 accumulation, read top to bottom):

* ``_grouped_gemm_kernel``: one program per (row tile, column tile). Row tiles are numbered
  group after group (group g has ceil(n_g / BLOCK_M) of them), so a tile never straddles two
  groups; a program finds its group by scanning the G group ends (G scalar loads, negligible
  next to the K loop). The grid is sized for the most tiles any routing can give,
  ceil(N / BLOCK_M) + G, and programs past the real count exit at once. The backward's
  dX = dY[rows of g] @ weight[g] is the same kernel on the transposed weight (strides only).
* ``_grouped_wgrad_kernel``: dW[g] = dY[rows of g]^T @ X[rows of g], one program per (group,
  M tile, K tile) looping over the group's rows, the busiest groups dispatched first; a group
  with no rows writes zeros.

Outputs are rounded to the input dtype once, from the fp32 accumulator, as a 16-bit
``F.linear`` does. fp32 inputs use IEEE fp32 dots (like torch's default matmul precision).
On CUDA the kernels autotune over a few Hopper configs keyed on the shapes and the mean rows
per group (routing changes N every step; the mean decides whether 64- or 128-row tiles win);
under ``TRITON_INTERPRET=1`` (CPU tests) one small fixed config runs, with 16-bit tiles widened
to fp32 before each dot (the interpreter mishandles 16-bit dot operands). Elsewhere (CPU without
the interpreter, or no Triton) ``grouped_linear`` runs the reference loop.

``grouped_linear_reference`` is that loop: one ``F.linear`` per group (any dtype).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_k15.kernels.interpreter import import_triton, interpreting

triton, tl, HAVE_TRITON = import_triton()  # optional: the reference loop covers CPU-only installs

__all__ = ["grouped_linear", "grouped_linear_reference", "grouped_gemm_available", "HAVE_TRITON"]

# ``triton.jit`` decides at decoration time whether a kernel is interpreted, so we decide once.
INTERPRET = interpreting()
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """One ``F.linear`` per group (host sync for the ends); the semantics ``grouped_linear`` has."""
    ends = [0] + group_ends.tolist()
    if ends[-1] != x.shape[0]:
        raise ValueError(f"grouped_linear: the group ends stop at row {ends[-1]}, x has {x.shape[0]} rows")
    outs = [F.linear(x[ends[g]:ends[g + 1]], weight[g]) for g in range(weight.shape[0])]
    return torch.cat(outs) if outs else x.new_empty((0, weight.shape[1]))


def grouped_gemm_available(device: torch.device) -> bool:
    """Whether the Triton kernels run on tensors of ``device`` (CUDA, or CPU under the interpreter)."""
    if not HAVE_TRITON:
        return False
    return torch.device(device).type == "cuda" if not INTERPRET else torch.device(device).type == "cpu"


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _find_row_tile(ENDS, num_groups, tile, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr):
        """(group, first row, end row) of row tile ``tile``, tiles numbered group after group
        (ceil(n_g / BLOCK_M) per group); group -1 past the last tile. All G group ends are read
        at once (one vector of GROUPS >= G lanes) and the tile counts prefix-summed."""
        gs = tl.arange(0, GROUPS)
        real = gs < num_groups
        ends = tl.load(ENDS + gs, mask=real, other=0).to(tl.int32)
        starts = tl.load(ENDS + gs - 1, mask=real & (gs > 0), other=0).to(tl.int32)
        n_tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        last = tl.cumsum(n_tiles, 0)  # tiles of groups 0..g
        first = last - n_tiles
        hit = (tile >= first) & (tile < last)  # one lane at most (empty groups never hit)
        group = tl.max(tl.where(hit, gs, -1), 0)
        row0 = tl.sum(tl.where(hit, starts + (tile - first) * BLOCK_M, 0), 0)
        row_end = tl.sum(tl.where(hit, ends, 0), 0)
        return group, row0, row_end

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in fp32: IEEE dots for fp32 inputs, 16-bit tiles widened first under the
        interpreter (which mishandles 16-bit dot operands)."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _grouped_gemm_kernel(
        X, W, Y, ENDS,
        K, M, num_groups, rows_per_group,
        stride_xn, stride_xk, stride_wg, stride_wm, stride_wk, stride_yn, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """Y[rows of g, cols] = X[rows of g, :] @ W[g, cols, :]^T for one (row tile, col tile).
        Column tiles vary fastest over the program ids, so the programs running together share
        their X row tiles (and their expert's W) in L2 instead of streaming X once per column."""
        n_col = tl.cdiv(M, BLOCK_N)
        g, row0, row_end = _find_row_tile(ENDS, num_groups, tl.program_id(0) // n_col, BLOCK_M, GROUPS)
        if g < 0:  # past the last row tile of this routing
            return
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = (tl.program_id(0) % n_col) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        col_ok = cols < M
        # 64-bit offsets: N x K passes 2**31 at 1M routed rows x 2048
        x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xn + ks[None, :] * stride_xk
        w_ptrs = W + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE, UPCAST)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        y_ptrs = Y + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :] * stride_ym
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(
        DY, X, DW, STARTS, ENDS, ORDER,
        M, K, num_groups, rows_per_group,
        stride_dyn, stride_dym, stride_xn, stride_xk, stride_wg, stride_wm, stride_wk,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """DW[g, m tile, k tile] = DY[rows of g, m tile]^T @ X[rows of g, k tile]. Groups are
        taken busiest first (``ORDER``): a program's work grows with its group's rows, and the
        busiest group's programs, dispatched last, would be the step's tail."""
        g = tl.load(ORDER + tl.program_id(1))
        k_tiles = tl.cdiv(K, BLOCK_K)
        ms = (tl.program_id(0) // k_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = (tl.program_id(0) % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        rs = tl.arange(0, BLOCK_R)
        m_ok = ms < M
        k_ok = ks < K
        start = tl.load(STARTS + g).to(tl.int32)
        end = tl.load(ENDS + g).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            r = (r0 + rs).to(tl.int64)
            r_ok = (r0 + rs) < end
            dy_t = tl.load(DY + r[None, :] * stride_dyn + ms[:, None] * stride_dym,
                           mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)
            x = tl.load(X + r[:, None] * stride_xn + ks[None, :] * stride_xk,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_K)
            acc = _dot(dy_t, x, acc, IEEE, UPCAST)
        dw_ptrs = DW + g.to(tl.int64) * stride_wg + ms[:, None] * stride_wm + ks[None, :] * stride_wk
        tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# Under the interpreter: one small fixed config per kernel (cost is per executed op; the tests'
# groups are a few rows to a few dozen, so 32-row tiles still leave groups of several tiles).
_INTERP_GEMM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)
_INTERP_WGRAD = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_R=32)

# Hopper candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kind of dot: tensor
# cores for bf16/fp16 ("tc"), IEEE fp32 on CUDA cores ("ieee"). 64-row tiles for the few-rows
# case (decode, many experts); 128 for training's thousands of rows per expert.
_HOPPER_GEMM = {
    "tc": [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (64, 64, 64, 4, 4), (64, 128, 128, 8, 3)],
    "ieee": [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2), (64, 32, 32, 4, 2)],
}
# (BLOCK_M, BLOCK_K, BLOCK_R, num_warps, num_stages)
_HOPPER_WGRAD = {
    "tc": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    "ieee": [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2)],
}


def _make_prune(table):
    """An ``early_config_prune``: the candidates of this launch's kind of dot, in table order."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if table is _HOPPER_GEMM else ("BLOCK_M", "BLOCK_K", "BLOCK_R")

    def prune(configs, nargs, **kwargs):
        by_spec = {tuple(c.kwargs[n] for n in names) + (c.num_warps, c.num_stages): c for c in configs}
        return [by_spec[spec] for spec in table["ieee" if kwargs.get("IEEE") else "tc"]]

    return prune


def _all_configs(table, names):
    specs = sorted({spec for specs in table.values() for spec in specs}, reverse=True)
    return [triton.Config(dict(zip(names, spec[:3])), num_warps=spec[3], num_stages=spec[4]) for spec in specs]


if HAVE_TRITON:
    if INTERPRET:
        _gemm_launcher, _wgrad_launcher = _grouped_gemm_kernel, _grouped_wgrad_kernel
    else:
        # rows_per_group: power-of-two bucket of N / G, so routing changes do not re-tune;
        # stride_wk: the forward (W's K contiguous) and dX (transposed W) tune apart
        _gemm_launcher = triton.autotune(
            _all_configs(_HOPPER_GEMM, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
            key=["K", "M", "num_groups", "rows_per_group", "stride_wk", "IEEE"],
            prune_configs_by={"early_config_prune": _make_prune(_HOPPER_GEMM)})(_grouped_gemm_kernel)
        _wgrad_launcher = triton.autotune(
            _all_configs(_HOPPER_WGRAD, ("BLOCK_M", "BLOCK_K", "BLOCK_R")),
            key=["M", "K", "num_groups", "rows_per_group", "IEEE"],
            prune_configs_by={"early_config_prune": _make_prune(_HOPPER_WGRAD)})(_grouped_wgrad_kernel)


def _rows_bucket(rows: int, groups: int) -> int:
    return int(triton.next_power_of_2(max(1, rows // max(groups, 1))))


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype != torch.float32


def _fixed(spec, names) -> dict:
    """Launch keywords of one config: a _HOPPER_* tuple (blocks, warps, stages) or a dict of blocks."""
    if isinstance(spec, dict):
        return dict(spec)
    return dict(zip(names, spec[:3]), num_warps=spec[3], num_stages=spec[4])


def _gemm(x: torch.Tensor, weight_t_strides, weight: torch.Tensor, ends: torch.Tensor, out_features: int,
          in_features: int, config=None) -> torch.Tensor:
    """Launch ``_grouped_gemm_kernel``: y (N, out) from x (N, in) and a weight tensor whose
    (group, out, in) strides are ``weight_t_strides``. ``config``: one _HOPPER_GEMM tuple to run
    instead of autotuning (tests of every candidate)."""
    n, groups = x.shape[0], ends.shape[0]
    y = torch.empty((n, out_features), dtype=x.dtype, device=x.device)
    if n == 0 or out_features == 0:
        return y
    stride_wg, stride_wm, stride_wk = weight_t_strides
    meta = dict(IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype), GROUPS=int(triton.next_power_of_2(groups)))
    args = (x, weight, y, ends, in_features, out_features, groups, _rows_bucket(n, groups),
            x.stride(0), x.stride(1), stride_wg, stride_wm, stride_wk, y.stride(0), y.stride(1))
    def grid(cfg):  # every row tile any routing can give (module docstring) x the column tiles
        return ((triton.cdiv(n, cfg["BLOCK_M"]) + groups) * triton.cdiv(out_features, cfg["BLOCK_N"]),)

    if INTERPRET or config is not None:
        fixed = _fixed(_INTERP_GEMM if config is None else config, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        _grouped_gemm_kernel[grid(fixed)](*args, **fixed, **meta)
    else:
        _gemm_launcher[grid](*args, **meta)
    return y


def _wgrad(dy: torch.Tensor, x: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
           weight_shape, dtype: torch.dtype, config=None) -> torch.Tensor:
    """dW (G, M, K) = per group dY^T @ X, in ``dtype``; ``config`` as for ``_gemm``."""
    groups, m, k = weight_shape
    dw = torch.empty(weight_shape, dtype=dtype, device=x.device)
    if groups == 0 or m == 0 or k == 0:
        return dw
    meta = dict(IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype))
    order = torch.argsort(ends - starts, descending=True)  # on the device: no host sync
    args = (dy, x, dw, starts, ends, order, m, k, groups, _rows_bucket(x.shape[0], groups), dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2))
    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]), groups)

    if INTERPRET or config is not None:
        fixed = _fixed(_INTERP_WGRAD if config is None else config, ("BLOCK_M", "BLOCK_K", "BLOCK_R"))
        _grouped_wgrad_kernel[grid(fixed)](*args, **fixed, **meta)
    else:
        _wgrad_launcher[grid](*args, **meta)
    return dw


class _GroupedLinear(torch.autograd.Function):
    """y = x @ W[g]^T per group; dx = dy @ W[g] (the same kernel, transposed strides);
    dW[g] = dy_g^T @ x_g."""

    @staticmethod
    def forward(ctx, x, weight, ends):
        groups, out_features, in_features = weight.shape
        y = _gemm(x, (weight.stride(0), weight.stride(1), weight.stride(2)), weight, ends, out_features, in_features)
        ctx.save_for_backward(x, weight, ends)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, ends = ctx.saved_tensors
        dy = dy.contiguous()
        groups, out_features, in_features = weight.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gemm(dy, (weight.stride(0), weight.stride(2), weight.stride(1)), weight, ends,
                       in_features, out_features)
        if ctx.needs_input_grad[1]:
            starts = torch.cat([ends.new_zeros(1), ends[:-1]])
            dw = _wgrad(dy, x, starts, ends, weight.shape, weight.dtype)
        return dx, dw, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor,
                   impl: Optional[str] = None) -> torch.Tensor:
    """y (N, M): y[rows of g] = x[rows of g] @ weight[g]^T (module docstring). ``impl``:
    "triton" or "torch" (the reference loop); default: Triton where it runs (CUDA, or CPU under
    the interpreter), the loop elsewhere."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_linear: x (N, K) and weight (G, M, K) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if group_ends.shape != (weight.shape[0],):
        raise ValueError(f"grouped_linear: one group end per weight ({weight.shape[0]}), got {tuple(group_ends.shape)}")
    if impl is None:
        impl = "triton" if grouped_gemm_available(x.device) and x.dtype in _DTYPES else "torch"
    if impl == "torch":
        return grouped_linear_reference(x, weight, group_ends)
    if impl != "triton":
        raise ValueError(f"grouped_linear: impl must be 'triton' or 'torch', got {impl!r}")
    if not grouped_gemm_available(x.device):
        raise RuntimeError(f"grouped_linear: the Triton kernels do not run on {x.device} here (they need CUDA, "
                           "or CPU tensors with TRITON_INTERPRET=1 set before the import, and triton installed)")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"grouped_linear: fp32/bf16/fp16 inputs of one dtype, got {x.dtype} and {weight.dtype}")
    ends = group_ends.to(torch.int64).contiguous()
    if ends.numel():  # on the device, no host sync: the kernels would leave rows unwritten or overrun
        torch._assert_async(ends[-1] == x.shape[0], "grouped_linear: the group ends must stop at x's last row")
    return _GroupedLinear.apply(x.contiguous(), weight, ends)
