"""Helpers for multi-process tests on CPU: run a function on N gloo ranks and collect results.

Tests (and benches) call ``run_distributed(fn, world_size, *args)``; ``fn`` must be a
module-level function (it is pickled into the rank processes) with signature
``fn(rank, world_size, *args)``. Whatever it returns (tensors, dicts, lists) comes back, one
entry per rank. A failure on any rank raises in the caller with that rank's traceback.

Ranks are forked from a fork server that imported torch and megatron-core once (5 s of
imports per process otherwise, most of a small test's time). Each rank gets the caller's
environment of the moment, as a spawned process would; what a preloaded module read from the
environment when it was imported keeps the server's value (``tests/conftest.py`` sets
``TRITON_INTERPRET`` before the server starts). ``fn`` and its arguments travel as one
``torch.save`` payload (tensors would otherwise each take one of the fork server's 256 file
descriptors). A rank that dies without reporting (a crash) is reported at once with its exit
code.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


# imported once by the fork server, so that forked ranks start with them
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state",
                      "megatron.core.tensor_parallel", "megatron_k15.training", "megatron_k15.rl.trainer"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # no effect once the server runs
    return ctx


def _worker(job: bytes, rank, world_size, init_file, queue, environ=None):
    try:
        if environ is not None:  # the caller's environment now, not the fork server's at its start
            os.environ.clear()
            os.environ.update(environ)
        fn, args = torch.load(io.BytesIO(job), weights_only=False)
        os.environ["RANK"] = str(rank)
        os.environ["WORLD_SIZE"] = str(world_size)
        os.environ["LOCAL_RANK"] = str(rank)
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        # bytes, not tensors: a tensor put on the queue is shared through a file handle that
        # can vanish when this process exits before the parent reads it
        buf = io.BytesIO()
        torch.save(_to_cpu(result), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    ctx = _context()
    queue = ctx.Queue()
    buf = io.BytesIO()
    torch.save((fn, args), buf)
    job = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(job, r, world_size, init_file, queue, dict(os.environ)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            _collect(queue, procs, results, errors, time.monotonic() + timeout)
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _collect(queue, procs, results: dict, errors: list, deadline: float) -> None:
    """Read the ranks' reports until all are in or one failed; a rank that exits without a
    report (a segfault, os._exit) counts as failed as soon as its queue is drained."""
    import queue as queue_mod

    reported: set = set()
    while len(reported) < len(procs):
        try:
            rank, status, payload = queue.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
            if dead:
                try:  # a report sent just before the exit may still be in the pipe
                    rank, status, payload = queue.get(timeout=2.0)
                except queue_mod.Empty:
                    errors.append(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a report")
                    return
            elif time.monotonic() > deadline:
                errors.append(f"timed out; ranks {sorted(set(range(len(procs))) - reported)} did not report")
                return
            else:
                continue
        reported.add(rank)
        if status != "ok":
            errors.append(f"rank {rank} failed:\n{payload}")
            return
        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)


# -- tiny random Hugging Face models, built offline --------------------------------------------
_TINY_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
# kind -> (transformers class name, its config's settings beyond _TINY_COMMON)
TINY_HF_MODELS = {
    "qwen2": ("Qwen2", dict(hidden_size=96, intermediate_size=160, num_attention_heads=6)),
    "llama": ("Llama", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen3": ("Qwen3", dict(head_dim=32, rope_theta=1000000.0)),
    "qwen3_moe": ("Qwen3Moe", dict(moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                   norm_topk_prob=True, head_dim=16, rope_theta=1000000.0)),
    "mistral": ("Mistral", dict(head_dim=32, sliding_window=None, rope_theta=1000000.0)),
    "phi3": ("Phi3", dict(sliding_window=None, rope_theta=250000.0, pad_token_id=0)),
    "olmo2": ("Olmo2", dict(rope_theta=500000.0, pad_token_id=0)),
    # 4 layers: three sliding (window 24) and one full, OLMo 3's pattern
    "olmo3": ("Olmo3", dict(num_hidden_layers=4, sliding_window=24, rope_theta=500000.0, pad_token_id=0)),
    # GLM-4 (glm-4-9b-chat-hf) and GLM-4-0414 (+ norms after each sublayer): QKV bias, RoPE on
    # interleaved pairs of the first half of each head (head_dim 32 with hidden 64 / 4 heads)
    "glm": ("Glm", dict(head_dim=32, partial_rotary_factor=0.5, pad_token_id=0)),
    "glm4": ("Glm4", dict(head_dim=32, partial_rotary_factor=0.5, pad_token_id=0)),
    # EXAONE 4.0 (32B's form): norms after the sublayers, per-head q/k norms, three sliding layers
    # (window 24) with RoPE per global one without
    "exaone4": ("Exaone4", dict(num_hidden_layers=4, sliding_window=24, sliding_window_pattern=4, pad_token_id=0)),
    # SmolLM3: Llama's block, tied embeddings, no RoPE on every fourth layer (4 layers: the last)
    "smollm3": ("SmolLM3", dict(num_hidden_layers=4, tie_word_embeddings=True, rope_theta=2000000.0,
                                pad_token_id=0)),
    # gpt-oss: a sliding (24) and a full layer, sinks, 4 biased experts with the clamped SwiGLU,
    # YaRN as gpt-oss's (beta 32/1, no truncation) at x4 of 128
    # Gemma 3 (text): 6 layers, five sliding (window 24, local RoPE base 10000) then a global one
    # (theta 1e6, linear scaling x8), head_dim 32 with query_pre_attn_scalar 24, GeGLU, tied
    "gemma3": (("Gemma3TextConfig", "Gemma3ForCausalLM"), dict(
        num_hidden_layers=6, head_dim=32, sliding_window=24, query_pre_attn_scalar=24, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, pad_token_id=0)),
    # Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (QKV bias), 8 experts of 32, top-2
    # without renormalising, a 48-wide shared expert gated by sigmoid(x . g); the second of 3
    # layers dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2Moe", dict(num_hidden_layers=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                   num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    # Gemma 2: 4 layers alternating sliding (window 24) and global, head_dim 32 with
    # query_pre_attn_scalar 24, GeGLU, tied, soft caps small enough to bind on a random model
    # (scores at 0.5, logits at 1.0); eager attention, transformers' only one that soft-caps
    "gemma2": ("Gemma2", dict(num_hidden_layers=4, head_dim=32, sliding_window=24, query_pre_attn_scalar=24,
                              tie_word_embeddings=True, attn_logit_softcapping=0.5, final_logit_softcapping=1.0,
                              attn_implementation="eager", pad_token_id=0)),
    # GLM-4.5 (DeepSeek-V3's MoE with GQA attention): the first of 3 layers dense, then 8 experts
    # of 32 in 2 groups (top-1 group), top-2 by sigmoid score + correction bias, scaled x2.5, a
    # shared expert; QKV bias, per-head q/k norms, RoPE on the first half of each head
    "glm4_moe": ("Glm4Moe", dict(num_hidden_layers=3, head_dim=32, partial_rotary_factor=0.5, attention_bias=True,
                                 use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, n_shared_experts=1, n_group=2, topk_group=1,
                                 routed_scaling_factor=2.5, norm_topk_prob=True, pad_token_id=0)),
    # DeepSeek-V3 (Moonlight, Kimi K2): multi-latent attention (q from a 32 latent, k/v from a 16
    # latent; heads of 16 + 8 rotated channels, v of 16, interleaved RoPE) and GLM-4.5's MoE
    "deepseek_v3": ("DeepseekV3", dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                                       n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                       n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                       norm_topk_prob=True, pad_token_id=0)),
    # DeepSeek-V2 (V2-Lite's form: q straight from x): MLA as V3's, softmax-routed experts (top-2 of
    # 8 in the best of 2 groups by their best expert, not renormalised, x1.5), a shared expert
    "deepseek_v2": ("DeepseekV2", dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                                       first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                                       moe_intermediate_size=32, n_shared_experts=1, topk_method="group_limited_greedy",
                                       n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False,
                                       pad_token_id=0)),
    "gpt_oss": ("GptOss", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                               sliding_window=24, pad_token_id=0, rope_theta=150000.0,
                               rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                             "truncate": False, "original_max_position_embeddings": 128})),
}


def tiny_hf_model(kind: str = "qwen2", seed: int = 0, **overrides):
    """A random-weight HF model: ``qwen2`` (QKV bias, GQA 3:1, untied embeddings), ``llama``
    (tied embeddings, rope theta 500000, GQA 2:1) or ``qwen3`` (QK-norm, head_dim 32 with
    hidden 64 and 4 heads, so the head size is not hidden / heads; GQA 2:1, untied),
    ``qwen3_moe`` (Qwen3 attention, 8 experts of ffn 48, top-2 renormalised), ``mistral``
    (Mistral-Nemo's shape: head_dim 32 with hidden 64 and 4 heads, GQA 2:1, no sliding window)
    ``phi3`` (Phi-4's layout: fused qkv_proj and gate_up_proj tensors, GQA 2:1), ``olmo2`` (norms
    after the sublayers, q/k norms over all heads) or ``olmo3`` (OLMo 2's block, 4 layers of which
    3 attend through a 24-token sliding window) or ``gpt_oss`` (attention sinks, a sliding and a
    full layer, 4 biased experts, top-2). Biases, sinks and norm weights get random values so
    they matter."""
    import transformers

    if kind not in TINY_HF_MODELS:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    name, settings = TINY_HF_MODELS[kind]
    torch.manual_seed(seed)
    # a copy: transformers' configs may write into dicts they are given (rope settings)
    config_class, model_class = name if isinstance(name, tuple) else (f"{name}Config", f"{name}ForCausalLM")
    config = getattr(transformers, config_class)(**copy.deepcopy({**_TINY_COMMON, **settings, **overrides}))
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif pname.endswith("sinks"):
                p.uniform_(-1.0, 2.0)
            elif "norm" in pname:  # scales of 0.5-1.5 (Gemma stores the scale less 1)
                p.uniform_(0.5, 1.5).sub_(1.0 if kind in ("gemma2", "gemma3") else 0.0)
        for bname, b in model.named_buffers():  # DeepSeek's router bias: comparable to the scores' spread
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model.eval()


def hf_config_dict(model) -> dict:
    d = model.config.to_dict()
    d["architectures"] = [type(model).__name__]
    return d


def gpt_from_hf(hf, attention_backend: str = "sdpa", pp_size: int = 1, pp_rank: int = 0, **model_kwargs):
    """Our GPTModel (this rank's tp shard of the current tp group, pipeline stage ``pp_rank``
    of ``pp_size``) holding a transformers model's weights, in eval mode."""
    from megatron.core import parallel_state

    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.models.hf_mapping import gpt_config_from_hf, hf_to_megatron
    from megatron_k15.models.sharding import split_for_rank

    cfg = gpt_config_from_hf(hf_config_dict(hf))
    model = GPTModel(cfg, attention_backend=attention_backend, pp_rank=pp_rank, pp_size=pp_size,
                     **model_kwargs)
    full = hf_to_megatron(hf.state_dict(), cfg)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    model.load_checkpoint_state_dict(split_for_rank(
        full, tp_group.size(), tp_group.rank(), pp_size, pp_rank, cfg.num_layers,
        cfg.tie_word_embeddings, model.padded_vocab_size))
    return model.eval()


def save_tiny_hf_checkpoint(out_dir: str, kind: str = "qwen2", dtype=torch.float32,
                            max_shard_size=None, **overrides):
    """Write a tiny random HF checkpoint (safetensors; sharded when ``max_shard_size`` is set)."""
    model = tiny_hf_model(kind, **overrides).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return model


def random_sft_samples(count: int, max_len: int, seed: int = 0) -> list:
    """Random byte-token SFT samples (5 <= length < max_len), loss on the second half of each."""
    import numpy as np

    from megatron_k15.data.indexed import SFTSample

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(5, max_len))
        out.append(SFTSample(rng.integers(0, 256, n), (np.arange(n) >= n // 2).astype(np.uint8)))
    return out
