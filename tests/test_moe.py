"""The MoE layer's load-balancing loss (models/layers.py MoEMLP): its value and the gradient it
injects, against the formula written out with autograd."""

from __future__ import annotations

import pytest
import torch

from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.models.config import preset
from megatron_k15.models.gpt import GPTModel
from megatron_k15.testing import run_distributed

COEFF, SCALE = 0.3, 0.5


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    initialize_model_parallel(1)


def _model(recompute=None):
    cfg = preset("tiny", num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                 init_method_std=0.2)
    model = GPTModel(cfg, attention_backend="sdpa", recompute_granularity=recompute)
    model.reset_parameters(3)
    return model.train()


def _explicit_aux(model, ids, token_mask=None):
    """sum over layers of E / (k T^2) sum_e (sum_t p_te) count_e, from the layers' inputs,
    over the real tokens only (T of them)."""
    mlps = model.moe_layers()
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for m in mlps]
    out = model(ids)
    for h in hooks:
        h.remove()
    total = 0.0
    for m, x in zip(mlps, inputs):
        if token_mask is not None:  # x is (s, b, h)
            x = x.transpose(0, 1)[token_mask.bool()]
        tokens = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(torch.nn.functional.linear(tokens, m.router.weight).float(), -1)
        idx = probs.topk(m.topk, dim=-1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=m.num_experts).float()
        t = tokens.shape[0]
        total = total + (probs.sum(0) * counts).sum() * m.num_experts / (m.topk * t * t)
    return out, total


@pytest.mark.parametrize("recompute, padded", [(None, False), ("full", False), (None, True), ("full", True)])
def test_aux_loss_gradient_is_the_formula(recompute, padded):
    """With ``padded`` the second row holds 7 tokens and 5 of padding (``token_mask`` 0),
    which the loss must leave out of T, the probability sums and the counts."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, 12, 384, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12)
    if padded:
        ids[1, 7:] = 0
        mask[1, 7:] = 0

    ref = _model()
    out, aux = _explicit_aux(ref, ids, mask if padded else None)
    ((out * probe).sum() + COEFF * SCALE * aux).backward()

    model = _model(recompute)
    model.set_moe_aux_loss(COEFF, SCALE)
    (model(ids, token_mask=mask if padded else None) * probe).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        # fp32 rounding of two summation orders: ~5e-7 of the largest grad; without the aux
        # term the gap is ~1e-4 of it
        assert (p.grad - q.grad).abs().max() <= 2e-6 * q.grad.abs().max(), name
    recorded = model.take_moe_aux_losses()
    assert len(recorded) == 2  # one per layer: a recomputed forward does not record again
    assert sum(recorded) == pytest.approx(float(aux.detach()), rel=1e-6)
    assert model.take_moe_aux_losses() == []


def test_aux_loss_is_one_for_even_routing_and_off_in_eval():
    m = _model().moe_layers()[0]
    t, e = 8, m.num_experts
    even = m.aux_loss(torch.full((e,), t / e), torch.full((e,), t * m.topk / e), t)
    assert float(even) == pytest.approx(1.0)
    skewed = torch.zeros(e)
    skewed[0] = t
    assert float(m.aux_loss(skewed, torch.tensor([t, t, 0.0, 0.0]), t)) == pytest.approx(e / m.topk)
    model = _model().eval()
    model.set_moe_aux_loss(COEFF)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.take_moe_aux_losses() == []


def _forced_route(layer):
    """Every token to experts 0 and 1 (weights from the router's probabilities, so the router
    still trains): under ep=2 the rank holding experts 2 and 3 receives no rows at all."""
    def route(tokens):
        probs = torch.softmax(torch.nn.functional.linear(tokens, layer.router.weight).float(), -1)
        experts = torch.tensor([[0, 1]], device=tokens.device).expand(tokens.shape[0], 2)
        weights = probs.gather(1, experts)
        return (weights / weights.sum(-1, keepdim=True)).to(tokens.dtype), experts, probs
    return route


def _idle_expert_worker(rank, world_size, ep, seeds=None, grouped_gemm=False):
    from megatron.core import parallel_state as ps

    from megatron_k15.parallel.expert import gather_experts

    initialize_model_parallel(1, ep=ep)
    cfg = preset("tiny", num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                 init_method_std=0.2)
    group = ps.get_expert_model_parallel_group() if ep > 1 else None
    model = GPTModel(cfg, attention_backend="sdpa", ep_group=group, moe_grouped_gemm=grouped_gemm)
    model.reset_parameters(3)
    model.train()
    for m in model.moe_layers():
        m.route = _forced_route(m)
    out = []
    for seed in seeds or [rank]:
        model.zero_grad()
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))
        logp = model(ids, labels=ids)
        logp.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append((logp.detach(), gather_experts(grads, group) if group is not None else grads))
    return out


@pytest.mark.parametrize("grouped_gemm", [False, True])
def test_expert_parallel_rank_without_rows_joins_backward(grouped_gemm):
    """ep=2 with every token routed to rank 0's experts: rank 1 receives no rows, yet its
    backward must run the reverse all-to-alls (else rank 0 waits forever) and give its experts
    a (zero) gradient. Log-probs, the non-expert gradients of each rank's tokens, and the
    expert gradients (the sum over both ranks' tokens) equal one rank holding all experts (the
    per-expert loop), with the experts run by the loop or by the grouped GEMM."""
    (ref,) = run_distributed(_idle_expert_worker, 1, 1, [0, 1], timeout=120)  # both ranks' tokens
    got = run_distributed(_idle_expert_worker, 2, 2, None, grouped_gemm, timeout=120)
    for rank, [(logp, grads)] in enumerate(got):
        ref_logp, ref_grads = ref[rank]
        torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            want = ref_grads[name] + ref[1 - rank][1][name] if ".experts." in name else ref_grads[name]
            # fp32 sums in other orders (the grouped GEMM's tiles vs MKL): ~1e-6 of the largest
            torch.testing.assert_close(g, want, rtol=1e-4, atol=4e-6 * float(want.abs().max()), msg=name)
            if ".experts." in name:
                assert g[2:].abs().max() == 0 and g[:2].abs().max() > 0  # experts 2, 3 got no tokens


def test_biased_experts_grouped_gemm_equals_per_expert_loop():
    """gpt-oss's biased experts (each row's expert found without reading the counts on the
    host) through the grouped-GEMM kernel (interpreted on CPU) equal the per-expert loop:
    logits and every gradient, the biases' included."""
    from megatron_k15.testing import gpt_from_hf, tiny_hf_model

    hf = tiny_hf_model("gpt_oss", initializer_range=0.3)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(4))
    results = []
    for grouped in (False, True):
        model = gpt_from_hf(hf, moe_grouped_gemm=grouped).train()
        logits = model.gather_logits(model(ids))
        (logits.float().square().mean()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loop_logits, loop_grads), (gg_logits, gg_grads) = results
    assert (gg_logits - loop_logits).abs().max().item() <= 1e-4
    assert loop_grads["layers.0.mlp.experts.linear_fc1.bias"].abs().sum() > 0
    for name, g in loop_grads.items():
        assert (gg_grads[name] - g).abs().max().item() <= 1e-4 * max(1.0, g.abs().max().item()), name


def _deepseek_model(**overrides):
    fields = dict(num_layers=3, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
                  init_method_std=0.2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.0,
                  moe_norm_topk_prob=True, moe_shared_expert_intermediate_size=16, moe_layer_freq=[0, 1, 1],
                  moe_router_dtype="fp32", architecture="glm4_moe")
    cfg = preset("tiny", **{**fields, **overrides})
    model = GPTModel(cfg.validate(), attention_backend="sdpa")
    model.reset_parameters(5)
    for m in model.moe_layers():
        if hasattr(m.router, "expert_bias"):
            m.router.expert_bias.normal_(0.0, 0.3)
    return model.train()


def test_fp32_router_in_a_bf16_model():
    """--moe-router-dtype fp32 (DeepSeek's router, as transformers' gate) scores in fp32 even
    when the model is bf16: the experts chosen are those of the fp32 scores of the same bf16
    weights and tokens."""
    model = _deepseek_model().to(torch.bfloat16)
    m = model.moe_layers()[0]
    m.router.expert_bias.copy_(m.router.expert_bias.float())  # (the buffer stays fp32 in the model)
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _, experts, _ = m.route(x)
    choice = torch.sigmoid(x.float() @ m.router.weight.float().T) + m.router.expert_bias.float()
    grouped = choice.view(200, 4, 2)
    best = grouped.topk(2, -1).values.sum(-1).topk(2, -1).indices
    keep = torch.zeros(200, 4, dtype=torch.bool).scatter_(1, best, True)
    want = grouped.masked_fill(~keep[..., None], float("-inf")).view(200, 8).topk(2, -1).indices
    assert torch.equal(experts.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_deepseek_routing_equals_the_formula_written_out(score):
    """Sigmoid scores s (softmax: no bias); a group's score is the sum of its two best s + b;
    only experts of the two best groups are chosen, the k largest s + b among them; their
    weights are s over the sum of the k s, times the scaling factor. Checked token by token
    with plain Python."""
    model = _deepseek_model(**({} if score == "sigmoid" else {"moe_router_score_function": "softmax",
                                                                 "moe_router_enable_expert_bias": False}))
    m = model.moe_layers()[0]
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    weights, experts, probs = m.route(x)
    logits = x @ m.router.weight.T
    scores = (torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)).tolist()
    bias = m.router.expert_bias.tolist() if score == "sigmoid" else [0.0] * 8
    for t in range(40):
        choice = [s + b for s, b in zip(scores[t], bias)]
        group_score = [sum(sorted(choice[g * 2:g * 2 + 2], reverse=True)[:2]) for g in range(4)]
        groups = sorted(range(4), key=lambda g: -group_score[g])[:2]
        allowed = [e for e in range(8) if e // 2 in groups]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:2]
        assert sorted(experts[t].tolist()) == sorted(chosen)
        total = sum(scores[t][e] for e in chosen)
        for w, e in zip(weights[t].tolist(), experts[t].tolist()):
            assert w == pytest.approx(2.0 * scores[t][e] / total, rel=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(40))  # what the load-balancing loss weighs


def test_dense_layers_and_shared_expert_take_their_sizes():
    from megatron_k15.memory_plan import stage_parameters
    from megatron_k15.models.layers import MoEMLP, SwiGLUMLP

    model = _deepseek_model()
    assert [type(layer.mlp) for layer in model.layers.values()] == [SwiGLUMLP, MoEMLP, MoEMLP]
    shared = model.layers["1"].mlp.shared_experts
    assert tuple(shared.linear_fc1.weight.shape) == (32, 64) and tuple(shared.linear_fc2.weight.shape) == (64, 16)
    params = dict(model.named_parameters())
    assert stage_parameters(model.config, 1, 0, 1) == [(n, p.numel()) for n, p in params.items()]
    assert model.config.num_parameters() == sum(p.numel() for n, p in params.items()) - (
        model.padded_vocab_size - model.config.vocab_size) * 64
    assert "layers.1.mlp.router.expert_bias" in model.checkpoint_state_dict()  # saved, not trained
    assert "layers.1.mlp.router.expert_bias" not in params


def test_expert_bias_update_moves_towards_balance():
    """count_expert_tokens + update_expert_bias: each expert's real tokens of the training
    forwards (padding left out), then b += rate * sign(mean load - load) and the counts restart."""
    model = _deepseek_model()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0
    mlps = model.moe_layers()
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for m in mlps]
    before = [m.router.expert_bias.clone() for m in mlps]
    model.count_expert_tokens(True)
    model(ids, token_mask=mask)
    model(ids, token_mask=mask)
    for h in hooks:
        h.remove()
    loads = []
    for j, m in enumerate(mlps):  # before the update: the biases the forwards chose with
        expected = torch.zeros(8)
        for x in inputs[j::2]:  # this layer's input in both forwards
            _, experts, _ = m.route(x.transpose(0, 1)[mask.bool()])
            expected += torch.bincount(experts.reshape(-1), minlength=8).float()
        assert expected.sum() == 2 * 19 * 2
        loads.append(expected)
    ratio = model.update_expert_bias(0.01)
    assert ratio == pytest.approx(max(float(x.max() / x.mean()) for x in loads))
    for j, m in enumerate(mlps):
        expected = loads[j]
        delta = m.router.expert_bias - before[j]
        assert torch.allclose(delta, 0.01 * torch.sign(expected.mean() - expected))
        assert m.tokens_per_expert is None and not m.count_tokens
