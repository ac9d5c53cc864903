"""Context parallelism in the model and the SFT trainer equals one rank.

(a) cp=2 x tp=2 (4 ranks, sequence parallel on the local sequence, ring attention with GQA):
    per-token log-probs gathered back to the original order and every gradient (summed over cp,
    as the dp x cp reduction does) equal a single rank's, for a dense batch and a packed batch of
    uneven sequences (each padded to a multiple of 2*cp, pads weighted 0); the packed batch also
    with --cp-comm-type allgather.
(b) Two SFT iterations (build_train_context / train_step / reduce_sums) of an MoE model with
    its load-balancing loss with (tp, cp) = (1, 2) give one rank's losses, grad norms and aux
    losses (padding left out of the aux loss, its token counts summed over cp).

CPU/gloo; the ring's Triton kernels run under TRITON_INTERPRET=1 (conftest.py), so the model is
tiny (2 layers, hidden 64) and sequences short.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_k15.data.sft import PackedSFTStream
from megatron_k15.models.config import preset
from megatron_k15.parallel.context import (
    zigzag_gather,
    zigzag_gather_varlen,
    zigzag_merge_varlen,
    zigzag_position_ids,
    zigzag_split,
    zigzag_split_varlen,
)
from megatron_k15.testing import random_sft_samples, run_distributed

SEED = 7
DENSE = (2, 16)  # batch, sequence
LENGTHS = [5, 14, 9]  # packed, uneven: padded to [8, 16, 12] for cp=2


def _cfg(window=None):
    """``window``: gpt-oss's pattern (a sliding layer, then a full one) with that window; on
    the dense rows (chunks of 4 under cp=2) window 4 takes the ring's neighbour exchange, on
    the packed ones (chunks of 2-4) it gathers every chunk."""
    if window is None:
        return preset("tiny", num_layers=2, init_method_std=0.05)
    return preset("tiny", num_layers=2, init_method_std=0.05, sliding_window=window,
                  layer_types=["sliding_attention", "full_attention"])


def _cu(lengths):
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)


def _inputs(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, DENSE, generator=g)
    w = torch.randn(DENSE, generator=g)
    t = sum(LENGTHS)
    pids = torch.randint(0, vocab, (1, t), generator=g)
    pw = torch.randn(1, t, generator=g)
    return {"dense": (ids, torch.roll(ids, -1, 1), w), "packed": (pids, torch.roll(pids, -1, 1), pw)}


def _grads_and_logp(model, ids, labels, weights, position_ids=None, cu=None, max_seqlen=None):
    model.zero_grad(set_to_none=True)
    logp = model(ids, position_ids=position_ids, labels=labels, cu_seqlens=cu, max_seqlen=max_seqlen)
    (weights * logp).sum().backward()
    return logp.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference():
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.gpt import GPTModel

    initialize_model_parallel(tp=1)
    out = {}
    for suffix, window in (("", None), ("_window", 4)):
        model = GPTModel(_cfg(window), attention_backend="sdpa")
        model.reset_parameters(SEED)
        inp = _inputs(model.config.vocab_size)
        out["dense" + suffix] = _grads_and_logp(model, *inp["dense"])
        out["packed" + suffix] = _grads_and_logp(model, *inp["packed"], cu=_cu(LENGTHS), max_seqlen=max(LENGTHS))
    assert not torch.allclose(out["dense"][0], out["dense_window"][0])  # the window matters
    return out


def _model_worker(rank, world_size, tp, cp):
    from megatron.core import parallel_state as ps

    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.models.sharding import merge_tensor
    from megatron_k15.parallel.tensor import allreduce_sequence_parallel_grads

    initialize_model_parallel(tp=tp, cp=cp)
    cp_group, tp_group = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_group()
    cp_rank = ps.get_context_parallel_rank()
    model = GPTModel(_cfg(), tp_group=tp_group, cp_group=cp_group)  # ring by default
    assert model.sequence_parallel and model.cp_size == cp and model.attention_backend == "ring-ring"
    model.reset_parameters(SEED)
    inp = _inputs(model.config.vocab_size)
    vocab = model.config.vocab_size

    def full_grads(grads):
        """SP-replicated grads summed over tp, every grad summed over cp (as the dp x cp
        reduction does), tp shards merged into full tensors."""
        for (_, p), g in zip(model.named_parameters(), grads.values()):
            p.grad = g
        allreduce_sequence_parallel_grads(model, tp_group)
        out = {}
        for name, p in model.named_parameters():
            g = p.grad
            dist.all_reduce(g, group=cp_group)
            shards = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(shards, g.contiguous(), group=tp_group)
            merged = merge_tensor(shards, name)
            out[name] = merged[:vocab] if name in ("embedding.weight", "output_layer.weight") else merged
        return out

    results = {}
    # dense: zigzag shard of every row, original positions for RoPE
    ids, labels, w = inp["dense"]
    local = [zigzag_split(t, 1, cp, cp_rank) for t in (ids, labels, w)]
    pos = zigzag_position_ids(ids.shape[1], cp, cp_rank)[None].expand(ids.shape[0], -1)
    logp, grads = _grads_and_logp(model, *local, position_ids=pos)
    results["dense"] = (zigzag_gather(logp, 1, cp, cp_group), full_grads(grads))

    # packed: every sequence padded to a multiple of 2*cp, local cu_seqlens, pads weighted 0
    ids, labels, w = inp["packed"]
    cu = _cu(LENGTHS)
    sh_ids, sh_lab, sh_w = (zigzag_split_varlen(t[0], cu, cp, cp_rank) for t in (ids, labels, w))
    local_cu = sh_ids.cu_seqlens
    max_local = int((local_cu[1:] - local_cu[:-1]).max())
    logp, grads = _grads_and_logp(model, sh_ids.x[None], sh_lab.x[None], sh_w.x[None],
                                  position_ids=sh_ids.position_ids[None], cu=local_cu,
                                  max_seqlen=max_local)
    results["packed"] = (zigzag_gather_varlen(logp[0], cu, cp, cp_group)[None], full_grads(grads))

    # the same packed batch with --cp-comm-type allgather
    model = GPTModel(_cfg(), tp_group=tp_group, cp_group=cp_group, cp_comm_type="allgather")
    model.reset_parameters(SEED)
    logp, grads = _grads_and_logp(model, sh_ids.x[None], sh_lab.x[None], sh_w.x[None],
                                  position_ids=sh_ids.position_ids[None], cu=local_cu,
                                  max_seqlen=max_local)
    results["packed_allgather"] = (zigzag_gather_varlen(logp[0], cu, cp, cp_group)[None],
                                   full_grads(grads))

    # sliding-window layers under the ring (neighbour exchange on the dense rows)
    model = GPTModel(_cfg(4), tp_group=tp_group, cp_group=cp_group)
    model.reset_parameters(SEED)
    logp, grads = _grads_and_logp(model, *local, position_ids=pos)
    results["dense_window"] = (zigzag_gather(logp, 1, cp, cp_group), full_grads(grads))
    logp, grads = _grads_and_logp(model, sh_ids.x[None], sh_lab.x[None], sh_w.x[None],
                                  position_ids=sh_ids.position_ids[None], cu=local_cu,
                                  max_seqlen=max_local)
    results["packed_window"] = (zigzag_gather_varlen(logp[0], cu, cp, cp_group)[None], full_grads(grads))
    return results


def _assert_close(a, b, name, tol=1e-5):
    scale = max(1e-3, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{name}: max err {err:.3g} vs scale {scale:.3g}"


def test_zigzag_positions_from_local_cu_seqlens():
    """The model's default cp positions (from the local layout) are the original positions."""
    from megatron_k15.models.gpt import zigzag_positions_from_local_cu_seqlens

    cu = _cu(LENGTHS)
    for cp in (2, 4):
        for r in range(cp):
            sh = zigzag_split_varlen(torch.arange(sum(LENGTHS)), cu, cp, r)
            got = zigzag_positions_from_local_cu_seqlens(sh.cu_seqlens, sh.x.numel(), cp, r)
            assert torch.equal(got[0], sh.position_ids)


def test_split_microbatch_for_cp_roundtrip():
    """train_sft's split: fixed padded length, local length divisible by tp, pads masked, and
    the shards merge back to the original microbatch."""
    from megatron_k15.parallel.context import packed_microbatch_length, split_packed_microbatch

    stream = PackedSFTStream(_samples(), 32, seed=3)
    mb = stream.microbatch(stream.rows(0, 2))
    n = mb["input_ids"].shape[1]
    cp, tp = 2, 2
    shards = [split_packed_microbatch(mb, cp, r, tp) for r in range(cp)]
    target = packed_microbatch_length(mb["cu_seqlens"], n, cp, tp)
    assert target % (2 * cp) == 0 and (target // cp) % tp == 0 and target >= n
    for s in shards:
        assert s["input_ids"].shape == (1, target // cp) and (target // cp) % tp == 0
        assert torch.equal(s["cu_seqlens"], shards[0]["cu_seqlens"])
        assert s["loss_mask"].sum() <= mb["loss_mask"].sum()
    assert sum(float(s["loss_mask"].sum()) for s in shards) == float(mb["loss_mask"].sum())
    # undo the split with the layout the shards were cut with: the last sequence extended
    cu = mb["cu_seqlens"]
    padded_front = sum(-(-int(x) // (2 * cp)) * 2 * cp for x in (cu[1:-1] - cu[:-2]))
    cu_ext = cu.clone()
    cu_ext[-1] = int(cu[-2]) + (target - padded_front)
    for key in ("input_ids", "labels", "loss_mask"):
        merged = zigzag_merge_varlen([s[key][0] for s in shards], cu_ext)
        valid = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(merged.numel() - n, dtype=torch.bool)])
        assert torch.equal(merged[:n], mb[key][0]), key
        assert not merged[~valid].any(), key


@pytest.mark.slow
def test_model_cp2_tp2_equals_one_rank():
    ref = _reference()
    results = run_distributed(_model_worker, 4, 2, 2)
    for res in results:
        for key in ("dense", "packed", "packed_allgather", "dense_window", "packed_window"):
            ref_logp, ref_grads = ref[key.replace("_allgather", "")]
            logp, grads = res[key]
            _assert_close(logp, ref_logp, f"{key} logp")
            assert set(grads) == set(ref_grads)
            for name, g in grads.items():
                r = ref_grads[name]
                if name in ("embedding.weight", "output_layer.weight"):
                    r = r[: _cfg().vocab_size]
                assert g.shape == r.shape, name
                _assert_close(g, r, f"{key} grad {name}")


# ----------------------------------------------------------------------------------------------
# SFT training steps
# ----------------------------------------------------------------------------------------------

SEQ, GBS, MBS, ITERS = 32, 2, 1, 2


def _samples():
    return random_sft_samples(12, 20)


def _args(comm_type, model="qwen3_moe"):
    return argparse.Namespace(lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4,
                              clip_grad=0.5, attention_backend="sdpa", params_dtype=torch.float32,
                              sequence_parallel=True, recompute_granularity=None, grad_bucket_numel=5000,
                              cp_comm_type=comm_type, moe_aux_loss_coeff=0.5,
                              moe_router_bias_update_rate=0.01 if model == "deepseek" else 0.0)


def _moe_cfg(model="qwen3_moe"):
    if model == "deepseek":  # MLA (heads of 24: the ring's kernels pad them to 32), a dense layer, sigmoid
        # routing with a bias that moves after every step, a shared expert
        return preset("tiny", num_layers=3, init_method_std=0.05, add_qkv_bias=False, multi_latent_attention=True,
                      q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                      num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_norm_topk_prob=True,
                      moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_router_num_groups=2, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
                      moe_shared_expert_intermediate_size=32, moe_layer_freq=[0, 1, 1], architecture="deepseek_v3")
    return preset("tiny", num_layers=2, init_method_std=0.05, num_moe_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=32)


def _sft_worker(rank, world_size, tp, cp, comm_type, ep=1, model="qwen3_moe"):
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.parallel.data import lr_at
    from megatron_k15.parallel.context import split_packed_microbatch
    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import build_train_context, reduce_sums, train_step

    initialize_model_parallel(tp, 1, cp, ep=ep)
    ctx = build_train_context(_args(comm_type, model), _moe_cfg(model), seed=11)
    assert ctx.model.ep_size == ep
    assert ctx.model.cp_size == cp and (cp == 1 or ctx.model.attention_backend == f"ring-{comm_type}")
    stream = PackedSFTStream(_samples(), SEQ, seed=3)
    pc = ctx.pc
    per = GBS // pc.dp_size
    losses, norms, aux, pads, biases = [], [], [], 0, []
    for it in range(ITERS):
        rows = stream.rows(it * GBS, GBS)
        total = sum(stream.loss_tokens(r) for r in rows)
        mine = rows[pc.dp_rank * per:(pc.dp_rank + 1) * per]
        mbs = [split_packed_microbatch(stream.microbatch(mine[k:k + MBS]), pc.cp_size, pc.cp_rank,
                                       pc.tp_size if ctx.model.sequence_parallel else 1)
               for k in range(0, per, MBS)]
        pads += sum(int((mb["token_mask"] == 0).sum()) for mb in mbs)
        results, norm = train_step(ctx, mbs, sft_forward_step(ctx.model, total), lr_at(it, 3e-3, 3e-4, 1, ITERS))
        loss_sum, tokens = reduce_sums([sum(r[0] for r in results), sum(r[1] for r in results)], ctx)
        assert tokens == total
        losses.append(loss_sum / tokens)
        norms.append(norm)
        aux.append(ctx.moe_aux_loss)
        biases.append([m.router.expert_bias.clone() for m in ctx.model.moe_layers()
                       if hasattr(m.router, "expert_bias")])
    return {"losses": losses, "norms": norms, "aux": aux, "pads": pads, "biases": biases}


@functools.lru_cache(maxsize=None)
def _sft_reference(model="qwen3_moe"):
    return run_distributed(_sft_worker, 1, 1, 1, "ring", 1, model)[0]


@pytest.mark.slow
@pytest.mark.parametrize("ep,model", [(1, "qwen3_moe"), (2, "qwen3_moe"), (2, "deepseek")])
def test_sft_cp2_equals_one_rank(ep, model):
    """ep=2: the two cp ranks (zigzag shards of the same rows) also split the experts and
    exchange their tokens. DeepSeek's block: MLA through the ring, and the expert biases
    moved by the loads of both ranks' tokens equal the one-rank run's."""
    ref = _sft_reference(model)
    assert ref["losses"][-1] < ref["losses"][0]
    assert ref["pads"] > 0  # rows with a padding tail: the aux loss must leave it out
    # after each step (the sign rule may move a bias back the next step)
    assert [len(step) for step in ref["biases"]] == [2 if model == "deepseek" else 0] * ITERS
    assert all(b.abs().max() > 0 for b in ref["biases"][0])  # the first step moved them
    for r in run_distributed(_sft_worker, 2, 1, 2, "ring", ep, model):
        for step, ref_step in zip(r["biases"], ref["biases"]):
            assert all(torch.equal(a, b) for a, b in zip(step, ref_step))
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b)
        for a, b in zip(r["norms"], ref["norms"]):
            assert abs(a - b) <= 1e-5 * abs(b)
        for a, b in zip(r["aux"], ref["aux"]):
            assert abs(a - b) <= 1e-5 * abs(b)
