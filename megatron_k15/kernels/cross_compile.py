"""Compile our Triton kernels for a GPU architecture on a machine without one.

Triton's compiler runs on the host: Triton source -> TTIR -> TTGIR -> LLVM IR -> PTX, and
``ptxas`` (shipped inside the triton wheel) turns PTX into a cubin. None of it needs a GPU, so
the failures the interpreter cannot show (a ``tl.dot`` the code generator rejects, a tile that
needs more shared memory than an SM has, register spills) show up here, on CPU, before any
device time is spent.

How: the host-side launch code of each kernel runs on ``meta`` tensors with the interpreter
off, and every ``kernel[grid](...)`` launch (plain ``JITFunction`` or ``Autotuner``) is
recorded instead of run (:func:`capture_launches`). Each recorded launch is then compiled for
the target with the JIT's own argument binder, so the specialisation (dtypes, the
"divisible by 16" / "equal to 1" classes of integer arguments, constexprs) is exactly the one
a real launch would get (:func:`compile_launch`). For an autotuned kernel, the launch is
compiled once per config; ``early_config_prune`` says which configs a real launch would try.

Resources come from the cubin (``cuobjdump --dump-resource-usage``): registers per thread,
spill (local memory) bytes, static shared memory; dynamic shared memory from Triton's
metadata. The shared-memory limit is the Hopper opt-in maximum per block.

Used by ``tools/compile_kernels.py`` (the full audit, one table) and by
``tests/test_cross_compile.py`` (every kernel compiles for sm_90). Needs the kernel modules
imported with ``TRITON_INTERPRET`` unset: run it in its own process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List

# Shared memory a block may use (opt-in maximum), by compute capability x10; Hopper: 227 KiB.
MAX_SHARED_BYTES = {90: 232448, 80: 166912, 89: 101376}


@dataclasses.dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call, recorded instead of run."""

    jit: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    autotuner: Any = None  # triton.runtime.autotuner.Autotuner when the launch was autotuned

    @property
    def name(self) -> str:
        return self.jit.__name__

    def configs(self) -> List[Any]:
        """Every candidate config (one ``None`` for a plain launch)."""
        return list(self.autotuner.configs) if self.autotuner is not None else [None]

    def kept_configs(self) -> List[Any]:
        """The configs a real launch would benchmark (after ``early_config_prune``)."""
        if self.autotuner is None:
            return [None]
        nargs = dict(zip(self.autotuner.arg_names, self.args))
        prune = self.autotuner.early_config_prune
        return list(prune(self.autotuner.configs, nargs, **self.kwargs)) if prune \
            else list(self.autotuner.configs)


@contextlib.contextmanager
def capture_launches():
    """Within the block, Triton launches are appended to the yielded list instead of running."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: List[Launch] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    def record_tuner(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        launches.append(Launch(self.fn, args, kwargs, autotuner=self))

    JITFunction.run, Autotuner.run = record_jit, record_tuner
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run


@dataclasses.dataclass
class CompileResult:
    kernel: str
    config: str  # "BLOCK_M=128 BLOCK_N=64 w8 s3" or "fixed"
    kept: bool  # a real launch would try this config
    ok: bool = False
    error: str = ""
    shared: int = 0  # bytes of shared memory per block (dynamic + static)
    registers: int = 0
    spill: int = 0  # bytes of local memory per thread (register spills)
    mma: str = "-"  # tensor-core instructions in the PTX: "wgmma" (Hopper), "mma" (Ampere), "-"
    seconds: float = 0.0

    def fits(self, arch: int = 90) -> bool:
        return self.ok and self.shared <= MAX_SHARED_BYTES.get(arch, MAX_SHARED_BYTES[90])


def describe_config(config) -> str:
    if config is None:
        return "fixed"
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _tool(name: str) -> str:
    import triton

    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    return env or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_resources(cubin: bytes) -> Dict[str, int]:
    """{"registers", "spill", "static_shared"} of the single kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {"registers": found["REG"], "spill": found.get("LOCAL", 0) + found.get("STACK", 0),
            "static_shared": found.get("SHARED", 0)}


def compile_launch(launch: Launch, config=None, arch: int = 90, kept: bool = True) -> CompileResult:
    """Compile ``launch`` (with ``config``'s meta-parameters when autotuned) for sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    result = CompileResult(launch.name, describe_config(config), kept)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jit = launch.jit
    t0 = time.perf_counter()
    try:
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound,
                                                              specialization, options)
        kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        res = cubin_resources(kernel.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - report any compiler failure as a result
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        result.seconds = time.perf_counter() - t0
        return result
    result.seconds = time.perf_counter() - t0
    result.ok = True
    result.shared = int(kernel.metadata.shared) + res["static_shared"]
    result.registers = res["registers"]
    result.spill = res["spill"]
    result.mma = mma_kind(kernel.asm["ptx"])
    return result


def mma_kind(ptx: str) -> str:
    """Which matrix instructions the kernel uses: Hopper's asynchronous warpgroup MMA is what
    reaches the H100's tensor-core peak; ``mma.sync`` reaches about a third of it."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "-"


# ----------------------------------------------------------------------------------------------
# The launches our kernels make, at production shapes (meta tensors: nothing is allocated)
# ----------------------------------------------------------------------------------------------

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name])


def flash_launches(dtype: str = "bf16", head_dim: int = 128, heads: int = 28, kv_heads: int = 4,
                   seqlen: int = 16384, causal: bool = True, varlen: bool = False,
                   backward: bool = True, window_left: int = -1, softcap: float = 0.0) -> List[Launch]:
    """Forward (and backward: preprocess, dK/dV, dQ) launches of the flash-attention kernels
    (``window_left`` >= 0: the sliding-window variants; ``softcap`` > 0: soft-capped scores)."""
    import torch

    from . import flash_attention as fa

    meta = dict(device="meta", dtype=_dtype(dtype))
    if varlen:
        shape_q, shape_kv = (seqlen, heads, head_dim), (seqlen, kv_heads, head_dim)
        cu = torch.empty(5, dtype=torch.int32, device="meta")
    else:
        shape_q, shape_kv = (1, seqlen, heads, head_dim), (1, seqlen, kv_heads, head_dim)
        cu = None
    q, k, v = torch.empty(shape_q, **meta), torch.empty(shape_kv, **meta), torch.empty(shape_kv, **meta)
    scale = head_dim ** -0.5
    with capture_launches() as launches:
        out, lse = fa._forward(q, k, v, cu, seqlen if varlen else None, causal, scale, window_left, softcap)
        if backward:
            fa._backward(torch.empty_like(out), None, q, k, v, out, lse, cu,
                         seqlen if varlen else None, causal, scale, window_left, softcap)
    return launches


def decode_launches(dtype: str = "bf16", head_dim: int = 128, heads: int = 28, kv_heads: int = 4,
                    batch: int = 64, page: int = 16, max_blocks: int = 2048,
                    window_left: int = -1, softcap: float = 0.0) -> List[Launch]:
    """The split-KV paged decode kernel and its reduction (``window_left``: sliding window;
    ``softcap``: soft-capped scores)."""
    import torch

    from . import decode_attention as da

    dt = _dtype(dtype)
    q = torch.empty(batch, heads, head_dim, dtype=dt, device="meta")
    cache = torch.empty(batch * max_blocks // 4, page, kv_heads, head_dim, dtype=dt, device="meta")
    tables = torch.empty(batch, max_blocks, dtype=torch.int32, device="meta")
    lens = torch.empty(batch, dtype=torch.int32, device="meta")
    with capture_launches() as launches:
        da._paged_decode_triton(q, cache, cache, tables, lens, head_dim ** -0.5, None, True, window_left, softcap)
    return launches


def logprob_launches(dtype: str = "bf16", hidden: int = 3584, vocab: int = 152064,
                     tokens: int = 32768, entropy: bool = True, softcap: float = 0.0) -> List[Launch]:
    """The fused hidden-states-to-log-prob partials kernel."""
    import torch

    from . import fused_logprobs as fl

    dt = _dtype(dtype)
    h = torch.empty(tokens, hidden, dtype=dt, device="meta")
    w = torch.empty(vocab, hidden, dtype=dt, device="meta")
    t = torch.empty(tokens, dtype=torch.int64, device="meta")
    with capture_launches() as launches:
        fl._partials_triton(h, w, t, 0, entropy, softcap)
    return launches


def grouped_gemm_launches(dtype: str = "bf16", hidden: int = 2048, ffn: int = 768, experts: int = 128,
                          rows: int = 65536) -> List[Launch]:
    """An MoE layer's grouped GEMMs (Qwen3-30B-A3B shapes: 8 of 128 experts per token, 8K
    tokens): fc1 forward, its input gradient (transposed weight) and its weight gradient."""
    import torch

    from . import grouped_gemm as gg

    dt = _dtype(dtype)
    x = torch.empty(rows, hidden, dtype=dt, device="meta")
    w = torch.empty(experts, 2 * ffn, hidden, dtype=dt, device="meta")
    ends = torch.empty(experts, dtype=torch.int64, device="meta")
    dy = torch.empty(rows, 2 * ffn, dtype=dt, device="meta")
    with capture_launches() as launches:
        gg._gemm(x, (w.stride(0), w.stride(1), w.stride(2)), w, ends, 2 * ffn, hidden)
        gg._gemm(dy, (w.stride(0), w.stride(2), w.stride(1)), w, ends, hidden, 2 * ffn)
        gg._wgrad(dy, x, ends, ends, tuple(w.shape), dt)
    return launches


def merge_launches(head_dim: int = 128, heads: int = 28, seqlen: int = 16384,
                   varlen: bool = False) -> List[Launch]:
    """Ring attention's in-place LSE merge of block outputs."""
    import torch

    from . import ring_attention as ra

    f32 = dict(dtype=torch.float32, device="meta")
    if varlen:
        out, lse = torch.empty(seqlen, heads, head_dim, **f32), torch.empty(heads, seqlen, **f32)
    else:
        out = torch.empty(1, seqlen, heads, head_dim, **f32)
        lse = torch.empty(1, heads, seqlen, **f32)
    with capture_launches() as launches:
        ra.merge_inplace(out, lse, torch.empty_like(out), torch.empty_like(lse), varlen=varlen)
    return launches


@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[], List[Launch]]


def standard_cases() -> List[Case]:
    """The variants the model, generation and RL meet: Qwen2.5-7B (28 q / 4 kv heads, d128) and
    Qwen2.5-0.5B (14 / 2, d64) shapes; every dtype; causal and not; packed and dense; plus the
    head_dim extremes 16 and 256, and Qwen3-8B's 32 / 8 heads (head counts divisible by 16
    specialise the kernels differently)."""
    cases = []
    for dt in ("bf16", "fp16", "fp32"):
        for d, h, hkv in ((128, 28, 4), (64, 14, 2)):
            for causal in (True, False):
                for varlen in (False, True):
                    name = (f"flash-{dt}-d{d}-{'causal' if causal else 'full'}"
                            f"{'-varlen' if varlen else ''}")
                    cases.append(Case(name, lambda dt=dt, d=d, h=h, hkv=hkv, c=causal, v=varlen:
                                      flash_launches(dt, d, h, hkv, causal=c, varlen=v)))
        for d in (16, 256):
            cases.append(Case(f"flash-{dt}-d{d}-causal",
                              lambda dt=dt, d=d: flash_launches(dt, d, 8, 2, seqlen=4096)))
        # 512K packed tokens x 32 heads x d128 pass 2**31 elements: 64-bit offsets (LARGE)
        cases.append(Case(f"flash-{dt}-d128-causal-varlen-int64",
                          lambda dt=dt: flash_launches(dt, 128, 32, 8, seqlen=524288, varlen=True)))
        for d, h, hkv in ((128, 28, 4), (64, 14, 2), (256, 8, 1), (128, 32, 8)):
            cases.append(Case(f"decode-{dt}-d{d}-g{h // hkv}",
                              lambda dt=dt, d=d, h=h, hkv=hkv: decode_launches(dt, d, h, hkv)))
        cases.append(Case(f"logprobs-{dt}-h3584", lambda dt=dt: logprob_launches(dt)))
        cases.append(Case(f"logprobs-{dt}-h896", lambda dt=dt: logprob_launches(dt, hidden=896)))
    cases.append(Case("flash-bf16-d128-causal-h32kv8", lambda: flash_launches("bf16", 128, 32, 8)))
    # sliding windows: gpt-oss's 128 tokens (64 / 8 heads, d64), OLMo 3's 4096 (32 / 32, d128)
    cases.append(Case("flash-bf16-d64-causal-window128", lambda: flash_launches("bf16", 64, 64, 8, window_left=127)))
    cases.append(Case("flash-bf16-d128-causal-varlen-window4096",
                      lambda: flash_launches("bf16", 128, 32, 32, varlen=True, window_left=4095)))
    cases.append(Case("decode-bf16-d64-g8-window128", lambda: decode_launches("bf16", 64, 64, 8, window_left=127)))
    # Gemma 2 9B: soft-capped scores (16 / 8 heads, d256, 4096-token windows) and logits (256K vocabulary)
    cases.append(Case("flash-bf16-d256-causal-window4096-softcap",
                      lambda: flash_launches("bf16", 256, 16, 8, seqlen=8192, window_left=4095, softcap=50.0)))
    cases.append(Case("decode-bf16-d256-g2-softcap", lambda: decode_launches("bf16", 256, 16, 8, softcap=50.0)))
    cases.append(Case("logprobs-bf16-h3584-softcap",
                      lambda: logprob_launches("bf16", hidden=3584, vocab=256000, softcap=30.0)))
    # MLA's latent cache (Moonlight: 16 heads absorbed into one 512 + 64 latent row; fp32 too)
    for dt in ("bf16", "fp32"):
        cases.append(Case(f"decode-{dt}-d576-g16-mla", lambda dt=dt: decode_launches(dt, 576, 16, 1)))
    for dt in ("bf16", "fp16", "fp32"):
        cases.append(Case(f"grouped-gemm-{dt}-h2048-f768-e128", lambda dt=dt: grouped_gemm_launches(dt)))
    cases.append(Case("merge-d128", lambda: merge_launches()))
    cases.append(Case("merge-d64-varlen", lambda: merge_launches(64, 14, varlen=True)))
    return cases


def compiler_api_missing() -> str:
    """Empty when this triton has the (internal) pieces used here, else what is missing: they
    are tested with triton 3.6 and 3.9."""
    try:
        import triton
    except ImportError as e:
        return f"no triton: {e}"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.autotuner import Autotuner  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"triton {triton.__version__}: {e}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__}: no JITFunction._pack_args"
    if not os.path.exists(_tool("cuobjdump")):
        return f"triton {triton.__version__}: no cuobjdump at {_tool('cuobjdump')}"
    return ""


def check_interpreter_off() -> None:
    from . import flash_attention

    if flash_attention.INTERPRET:
        raise RuntimeError("the kernels were imported with TRITON_INTERPRET set: cross-compile in a "
                           "process started with TRITON_INTERPRET unset or 0")


def unique_jobs(cases: List[Case], which: str = "kept") -> List[tuple]:
    """(case name, launch, config, kept) to compile; ``which`` is "kept" (what a real launch
    tries), "all" (every candidate) or "first" (one config per launch: the first kept)."""
    jobs = []
    for case in cases:
        for launch in case.make():
            kept = launch.kept_configs()
            configs = launch.configs() if which == "all" else kept[:1] if which == "first" else kept
            kept_ids = {describe_config(c) for c in kept}
            for c in configs:
                jobs.append((case.name, launch, c, describe_config(c) in kept_ids))
    return jobs


def format_table(rows: List[tuple], arch: int = 90) -> str:
    """rows: (case, CompileResult). One line per compile."""
    lines = ["| case | kernel | config | tried | status | shared KiB | regs | spill B | mma | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, r in rows:
        status = ("ok" if r.fits(arch) else "SMEM>LIMIT") if r.ok else f"FAIL {r.error[:80]}"
        if r.ok and r.spill:
            status += " spills"
        lines.append(f"| {case} | {r.kernel} | {r.config} | {'yes' if r.kept else 'no'} | {status} "
                     f"| {r.shared / 1024:.0f} | {r.registers} | {r.spill} | {r.mma} | {r.seconds:.1f} |")
    return "\n".join(lines)
