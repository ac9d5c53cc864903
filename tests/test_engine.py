"""The KV-cached generation engine: greedy equals transformers, log-probs equal a full
recompute, seeded sampling equals the recompute generator and does not depend on the batch,
partial segments equal one run, preemption changes nothing, no block leaks, tp=2 / pp=2 equal
one rank."""

import pytest
import torch

from megatron_k15.generation.engine import GenerationEngine
from megatron_k15.generation.kv_cache import OutOfBlocks, page_layout
from megatron_k15.generation.recompute import generate_recompute
from megatron_k15.generation.repetition import RepeatDetector
from megatron_k15.generation.sampling import SamplingParams, request_generator
from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.testing import gpt_from_hf, run_distributed, tiny_hf_model

PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18], [42], [7, 7, 7, 7, 9],
           list(range(100, 131))]
EOS = [2]
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


def _close(a, b):
    """fp32 log-probs: 1e-5 absolute, relative for sampled tokens with log p < -1."""
    return all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    initialize_model_parallel(1)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def models(request):
    # a larger init makes the random model's distribution peaked, so greedy has clear winners
    hf = tiny_hf_model(request.param, initializer_range=0.2)
    return hf, gpt_from_hf(hf)


def _engine(model, **kw):
    """On CPU the paged decode runs its PyTorch version (the Triton kernel under the
    interpreter is exact but slow; the first test and test_decode_attention cover it)."""
    return GenerationEngine(model, block_size=4, **kw)


def _gens(seed, n, offset=0):
    return [request_generator(seed, offset + i) for i in range(n)]


def test_greedy_equals_transformers_and_logprobs_equal_recompute(models):
    _assert_greedy_equals_transformers(*models, decode_impl="triton")  # interpreted on CPU


def test_qwen3_greedy_equals_transformers():
    """Qwen3: the per-head q/k norms apply before RoPE and before K enters the cache."""
    hf = tiny_hf_model("qwen3", initializer_range=0.2)
    _assert_greedy_equals_transformers(hf, gpt_from_hf(hf), decode_impl="torch")


@pytest.mark.parametrize("kind", ["glm", "glm4", "smollm3"])
def test_partial_or_no_rope_greedy_equals_transformers(kind):
    """Partial RoPE (GLM): the cached keys are rotated on the first half of their channels only;
    SmolLM3's NoPE layer caches them unrotated."""
    hf = tiny_hf_model(kind, initializer_range=0.2)
    _assert_greedy_equals_transformers(hf, gpt_from_hf(hf), decode_impl="torch")


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "glm4_moe", "deepseek_v3", "deepseek_v2"])
def test_moe_greedy_equals_transformers(kind):
    """Qwen3-MoE, GLM-4.5 (dense first layer, grouped sigmoid routing, shared expert),
    DeepSeek-V3 (+ multi-latent attention: the cache holds every head's K and zero-padded V):
    prefill routes the whole prompt, decode one token per request; both through the same
    experts as transformers."""
    hf = tiny_hf_model(kind, initializer_range=0.2)
    _assert_greedy_equals_transformers(hf, gpt_from_hf(hf), decode_impl="torch")


@pytest.mark.parametrize("kind,decode_impl", [("olmo3", "triton"), ("mistral", "torch"), ("gpt_oss", "torch"),
                                              ("gpt_oss", "triton"), ("gemma3", "torch"), ("exaone4", "torch"),
                                              ("gemma2", "triton"), ("gemma2", "torch")])
def test_sliding_window_generation_equals_transformers_and_recompute(kind, decode_impl):
    """8-token windows (OLMo 3: three sliding layers and one full; Mistral v0.1: every layer;
    gpt-oss: a sliding and a full layer, with attention sinks through prefill, chunks and decode):
    greedy equals transformers, with the decode kernel (interpreted) or the torch path;
    prompts prefilled in chunks of 8 over their cached prefix give the same tokens; seeded
    sampling equals the recompute generator (full forwards through the window mask)."""
    hf = tiny_hf_model(kind, initializer_range=0.2, sliding_window=8)
    model = gpt_from_hf(hf)
    assert model.config.sliding_window == 8
    _assert_greedy_equals_transformers(hf, model, decode_impl)
    prompts = PROMPTS + [list(range(3, 40))]
    whole = _engine(model).generate(prompts, 12, SAMPLED, _gens(4, len(prompts)), EOS)
    chunked = _engine(model, max_prefill_tokens=8).generate(prompts, 12, SAMPLED, _gens(4, len(prompts)), EOS)
    ref = generate_recompute(model, prompts, 12, SAMPLED, _gens(4, len(prompts)), EOS)
    for a, b, c in zip(whole, chunked, ref):
        assert a.output_ids == b.output_ids == c.output_ids
        assert _close(a.output_logprobs, c.output_logprobs) and _close(b.output_logprobs, c.output_logprobs)


@pytest.mark.parametrize("kind", ["gpt_oss", "gemma3"])
def test_window_cache_changes_no_token_and_holds_less(kind):
    """Sliding layers that give back the blocks their window left behind (the default) generate
    what an engine keeping every token generates: seeded sampling, prompts prefilled whole or
    in chunks of 8 over their cached prefix, 3 samples of one prompt sharing its blocks. The
    cache peak is smaller, and in the same fixed memory (too little for every request at
    once) fewer requests are preempted."""
    hf = tiny_hf_model(kind, initializer_range=0.2, sliding_window=8)
    model = gpt_from_hf(hf)
    prompts = [list(range(3, 60)), [5, 6, 7], list(range(100, 140))] + [[9, 10, 11, 12, 13]] * 3
    budget = 40

    def run(window_cache, **kw):
        engine = _engine(model, window_cache=window_cache, **kw)
        out = engine.generate(prompts, budget, SAMPLED, _gens(4, len(prompts)), EOS)
        assert engine.cache.num_used_blocks == 0
        assert (engine.cache.num_groups > 1) == window_cache
        return out, engine.stats

    ref, ref_stats = run(False)
    for kw in ({}, {"max_prefill_tokens": 8}):
        got, stats = run(True, **kw)
        for a, b in zip(got, ref):
            assert a.output_ids == b.output_ids and _close(a.output_logprobs, b.output_logprobs)
        assert stats.peak_cache_bytes < 0.75 * ref_stats.peak_cache_bytes
    # a fixed memory of 24 blocks of every layer (6 requests of up to 97 tokens need 108 at once)
    windows = [layer.self_attention.window_size[0] for layer in model.layers.values()]
    per_block = page_layout(windows)[0]
    small_ref, small_ref_stats = run(False, num_blocks=24)
    small, small_stats = run(True, num_blocks=24 * len(windows) // per_block)
    assert small_ref_stats.preemptions > 0 and small_stats.preemptions < small_ref_stats.preemptions
    chunked, _ = run(True, num_blocks=24 * len(windows) // per_block, max_prefill_tokens=8)
    for a, b, c in zip(small, chunked, small_ref):
        assert a.output_ids == b.output_ids == c.output_ids
        assert _close(a.output_logprobs, c.output_logprobs) and _close(b.output_logprobs, c.output_logprobs)


@pytest.mark.parametrize("decode_impl", ["torch", "triton"])
def test_mla_latent_cache_equals_the_expanded_cache(decode_impl):
    """DeepSeek-V3's MLA with the latent cache (the default: kvl + dr = 24 values per token and
    layer, decode with queries absorbed into the latent) generates what the cache of expanded
    heads (2 x 4 heads x 24) generates: seeded sampling, whole and chunked prefill (a chunk
    expands its cached prefix), 3 samples sharing a prompt, and preemption in a small cache;
    log-probs within fp32 tolerance of a full recompute. Its blocks take 1/8 of the bytes."""
    hf = tiny_hf_model("deepseek_v3", initializer_range=0.2)
    model = gpt_from_hf(hf)
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 125))] + [[9, 10, 11, 12, 13]] * 3

    def run(latent, **kw):
        engine = _engine(model, latent_cache=latent, decode_impl=decode_impl, **kw)
        out = engine.generate(prompts, 16, SAMPLED, _gens(4, len(prompts)), EOS)
        assert engine.cache.keys_only == latent and engine.cache.num_used_blocks == 0
        return out, engine

    ref, ref_engine = run(False)
    recomputed = generate_recompute(model, prompts, 16, SAMPLED, _gens(4, len(prompts)), EOS)
    for a, b in zip(ref, recomputed):
        assert a.output_ids == b.output_ids and _close(a.output_logprobs, b.output_logprobs)
    for kw in ({}, {"max_prefill_tokens": 8}, {"num_blocks": 16, "max_prefill_tokens": 8}):
        got, engine = run(True, **kw)
        for a, b in zip(got, ref):
            assert a.output_ids == b.output_ids and _close(a.output_logprobs, b.output_logprobs)
        if "num_blocks" in kw:
            assert engine.stats.preemptions > 0
    assert engine.cache.bytes_per_block * 8 == ref_engine.cache.bytes_per_block


def _assert_greedy_equals_transformers(hf, model, decode_impl):
    engine = GenerationEngine(model, block_size=4, decode_impl=decode_impl)
    results = engine.generate(PROMPTS, 12, SamplingParams(temperature=0.0), None, EOS)
    for prompt, res in zip(PROMPTS, results):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert res.output_ids == ref
        assert res.stop_reason == ("eos" if ref[-1] == 2 else "length")
        # every generated token's log-prob under the model: one full forward of prompt + output
        seq = torch.tensor([prompt + res.output_ids])
        with torch.no_grad():
            full = torch.log_softmax(model.gather_logits(model(seq)).float(), -1)[0]
        want = full[len(prompt) - 1:-1].gather(-1, torch.tensor(res.output_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(res.output_logprobs), want, atol=1e-5, rtol=0)
    assert engine.cache.num_used_blocks == 0


def test_seeded_sampling_equals_recompute_generator_and_is_batch_invariant(models):
    _, model = models
    engine = _engine(model)
    prompts = PROMPTS * 2
    ours = engine.generate(prompts, 16, SAMPLED, _gens(7, len(prompts)), EOS)
    ref = generate_recompute(model, prompts, 16, SAMPLED, _gens(7, len(prompts)), EOS)
    for a, b in zip(ours, ref):
        assert a.output_ids == b.output_ids and a.stop_reason == b.stop_reason
        assert _close(a.output_logprobs, b.output_logprobs)
    # one request alone == the same request inside a batch of 16 others
    others = [[int(t) for t in torch.randint(3, 250, (int(n),), generator=torch.Generator().manual_seed(n))]
              for n in range(2, 18)]
    alone = engine.generate([PROMPTS[1]], 16, SAMPLED, [request_generator(3, 99)], EOS)[0]
    batch = others[:8] + [PROMPTS[1]] + others[8:]
    gens = _gens(3, 8) + [request_generator(3, 99)] + _gens(3, 8, offset=8)
    crowded = engine.generate(batch, 16, SAMPLED, gens, EOS)[8]
    assert crowded.output_ids == alone.output_ids


def test_shared_prompt_forks_equal_separate_requests(models):
    """k samples of one prompt are prefilled once and forked; each is the same as alone."""
    _, model = models
    engine = _engine(model)
    k = 4
    prompt = PROMPTS[4]  # 31 tokens: a partly filled last block gets copied on fork
    together = engine.generate([prompt] * k, 10, SAMPLED, _gens(5, k), EOS)
    assert engine.stats.prefill_tokens == len(prompt)
    for i in range(k):
        alone = engine.generate([prompt], 10, SAMPLED, [request_generator(5, i)], EOS)[0]
        assert together[i].output_ids == alone.output_ids
    assert len({tuple(r.output_ids) for r in together}) > 1  # the samples do differ


def test_preemption_and_tiny_cache_give_the_same_tokens(models):
    _, model = models
    prompts = PROMPTS * 2
    big = _engine(model).generate(prompts, 20, SAMPLED, _gens(11, 10), EOS)
    # room for only a few sequences at a time: admission waits, running ones get preempted
    small = _engine(model, num_blocks=24)
    out = small.generate(prompts, 20, SAMPLED, _gens(11, 10), EOS)
    assert [r.output_ids for r in out] == [r.output_ids for r in big]
    assert small.stats.preemptions > 0
    assert small.cache.num_used_blocks == 0
    with pytest.raises(OutOfBlocks, match="more memory"):
        _engine(model, num_blocks=2).generate([list(range(50))], 4, SAMPLED, None, EOS)


def test_chunked_prefill_equals_one_forward(models):
    """Prompts longer than max_prefill_tokens are prefilled in chunks over their cached prefix
    (bottom-right causal attention): same tokens, log-probs within fp32 tolerance."""
    _, model = models
    prompts = PROMPTS + [list(range(3, 60)), [9] * 45]
    whole = _engine(model).generate(prompts, 12, SAMPLED, _gens(23, len(prompts)), EOS)
    engine = _engine(model, max_prefill_tokens=8)
    chunked = engine.generate(prompts, 12, SAMPLED, _gens(23, len(prompts)), EOS)
    for a, b in zip(chunked, whole):
        assert a.output_ids == b.output_ids
        assert _close(a.output_logprobs, b.output_logprobs)
    assert engine.stats.prefill_tokens == sum(len(p) for p in prompts)
    assert engine.cache.num_used_blocks == 0


@pytest.mark.parametrize("num_blocks", [None, 24])
def test_lanes_taking_turns_give_the_same_tokens(models, num_blocks):
    """Decode microbatches (lanes, what pipeline stages overlap) change nothing: 3 lanes on
    one rank equal 1 lane, also with a tiny cache where lanes preempt each other's blocks."""
    _, model = models
    prompts = PROMPTS * 3
    one = _engine(model).generate(prompts, 15, SAMPLED, _gens(17, len(prompts)), EOS)
    engine = _engine(model, num_lanes=3, num_blocks=num_blocks, max_batch_size=10)
    out = engine.generate(prompts, 15, SAMPLED, _gens(17, len(prompts)), EOS)
    assert [(r.output_ids, r.stop_reason) for r in out] == [(r.output_ids, r.stop_reason) for r in one]
    assert engine.cache.num_used_blocks == 0
    if num_blocks:
        assert engine.stats.preemptions > 0


def test_engine_is_usable_after_an_exception(models):
    """A failure mid-run (here the progress callback) frees every block: the next call
    neither trips over the old sequences nor runs out of blocks."""
    _, model = models
    engine = _engine(model, num_blocks=40, max_batch_size=4)

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPTS, 12, SAMPLED, _gens(3, len(PROMPTS)), [], progress=boom)
    assert engine.cache.num_used_blocks == 0
    again = engine.generate(PROMPTS, 12, SAMPLED, _gens(3, len(PROMPTS)), [])
    fresh = _engine(model, num_blocks=40, max_batch_size=4).generate(
        PROMPTS, 12, SAMPLED, _gens(3, len(PROMPTS)), [])
    assert [r.output_ids for r in again] == [r.output_ids for r in fresh]


def test_partial_segments_equal_one_uninterrupted_generation(models):
    """Three segment budgets, each resumed from the tokens so far (prefix re-prefilled), with
    the request's generator carried on, give the same trajectory as one call."""
    _, model = models
    engine = _engine(model)
    prompts = PROMPTS[:3]
    whole = engine.generate(prompts, 18, SAMPLED, _gens(21, 3), [])
    gens = _gens(21, 3)
    tokens = [list(p) for p in prompts]
    for budget in (5, 6, 7):
        seg = engine.generate(tokens, budget, SAMPLED, gens, [])
        assert all(r.stop_reason == "length" and len(r.output_ids) == budget for r in seg)
        for t, r in zip(tokens, seg):
            t.extend(r.output_ids)
    assert [t[len(p):] for t, p in zip(tokens, prompts)] == [r.output_ids for r in whole]


def test_no_block_leak_after_1000_requests_and_stop_reasons():
    model = gpt_from_hf(tiny_hf_model("llama", initializer_range=0.2))
    engine = _engine(model, max_batch_size=128, num_blocks=400)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (int(torch.randint(1, 12, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(1000)]
    budgets = torch.randint(0, 6, (1000,), generator=gen).tolist()
    out = engine.generate(prompts, budgets, SAMPLED, _gens(1, 1000), [7, 9, 11])
    assert engine.cache.num_used_blocks == 0 and len(engine.cache) == 0
    for res, budget in zip(out, budgets):
        assert len(res.output_ids) <= budget
        if res.stop_reason == "eos":
            assert res.output_ids[-1] in (7, 9, 11)
        else:
            assert res.stop_reason == "length" and len(res.output_ids) == budget
    # repeat detection stops a looping generation with "repeat"
    looped = engine.generate([[5] * 40], 64, SamplingParams(temperature=0.0), None, [],
                             repeat_detector=lambda: RepeatDetector(min_period=1, max_period=4))[0]
    ref = generate_recompute(model, [[5] * 40], 64, SamplingParams(temperature=0.0), [None], [],
                             repeat_detector=lambda: RepeatDetector(min_period=1, max_period=4))[0]
    assert looped.output_ids == ref.output_ids and looped.stop_reason == ref.stop_reason


# -- tp=2 and pp=2 equal one rank ---------------------------------------------------------
def _generate_layout(rank, world_size, tp, pp, kind, engine_kw=None):
    import torch.distributed as dist
    from megatron.core import parallel_state

    initialize_model_parallel(tp=tp, pp=pp)
    hf = tiny_hf_model(kind, initializer_range=0.2)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = gpt_from_hf(hf, pp_size=pp, pp_rank=pp_rank)
    engine = _engine(model, pp_group=parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None,
                     **(engine_kw or {}))
    prompts = PROMPTS * 2
    greedy = engine.generate(prompts, 10, SamplingParams(temperature=0.0), None, EOS)
    sampled = engine.generate(prompts, 10, SAMPLED, _gens(13, len(prompts)), EOS)
    # no generators: the global RNG, seeded differently on every rank; tp rank 0's draws count
    torch.manual_seed(99 if rank == 0 else 1000 + rank)
    global_rng = engine.generate(prompts, 10, SAMPLED, None, EOS)
    dist.barrier()
    return [[(r.output_ids, r.output_logprobs) for r in greedy],
            [(r.output_ids, r.output_logprobs) for r in sampled],
            engine.stats.preemptions, engine.cache.num_used_blocks,
            [r.output_ids for r in global_rng]]


def _one_rank_reference(kind, engine_kw=None):
    """The same requests on one rank (with the same engine settings: what the global RNG
    draws depends on the schedule)."""
    model = gpt_from_hf(tiny_hf_model(kind, initializer_range=0.2))
    engine = _engine(model, **{k: v for k, v in (engine_kw or {}).items() if k != "num_lanes"})
    prompts = PROMPTS * 2
    greedy = engine.generate(prompts, 10, SamplingParams(temperature=0.0), None, EOS)
    sampled = engine.generate(prompts, 10, SAMPLED, _gens(13, len(prompts)), EOS)
    torch.manual_seed(99)
    global_rng = engine.generate(prompts, 10, SAMPLED, None, EOS)
    return [[(r.output_ids, r.output_logprobs) for r in greedy],
            [(r.output_ids, r.output_logprobs) for r in sampled], [r.output_ids for r in global_rng]]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,engine_kw,kind", [
    # long prompts in chunks of 6 (sequence parallel: even); MoE experts split over tp
    (2, 1, {"max_prefill_tokens": 7}, "qwen3_moe"),
    (1, 2, None, "qwen2"),  # two lanes overlapping across the two stages
    (1, 2, {"num_lanes": 3, "num_blocks": 20, "max_batch_size": 7, "max_prefill_tokens": 8}, "qwen2"),
    # MLA's latent cache whole on both tp ranks (their heads absorb into it), chunks of 6 over it
    (2, 1, {"max_prefill_tokens": 7}, "deepseek_v3"),
])
def test_tensor_and_pipeline_parallel_generation_equal_one_rank(tp, pp, engine_kw, kind):
    ref = _one_rank_reference(kind, engine_kw)
    for rank_out in run_distributed(_generate_layout, tp * pp, tp, pp, kind, engine_kw):
        for got_runs, ref_runs in zip(rank_out[:2], ref):
            for (ids, lps), (ref_ids, ref_lps) in zip(got_runs, ref_runs):
                assert ids == ref_ids
                assert _close(lps, ref_lps)
        assert rank_out[3] == 0  # every block freed
        if engine_kw and "num_blocks" in engine_kw:
            assert rank_out[2] > 0  # the tiny cache did preempt
        if tp > 1:  # the global RNG: tp rank 0's draws, as one rank seeded alike
            assert rank_out[4] == ref[2]


def _generate_pp_windows(rank, world_size, layers):
    import warnings

    from megatron.core import parallel_state

    initialize_model_parallel(tp=1, pp=2)
    hf = tiny_hf_model("gpt_oss", initializer_range=0.2, sliding_window=8, num_hidden_layers=layers)
    model = gpt_from_hf(hf, pp_size=2, pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    engine = _engine(model, pp_group=parallel_state.get_pipeline_model_parallel_group())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.generate(PROMPTS, 24, SAMPLED, _gens(4, len(PROMPTS)), EOS)
    warned = any("laid out differently" in str(w.message) for w in caught)
    return [(r.output_ids, r.output_logprobs) for r in out], engine.cache.num_groups, warned, \
        engine.cache.num_used_blocks


@pytest.mark.slow
@pytest.mark.parametrize("layers,groups", [(4, 2), (2, 1)])
def test_pipeline_stages_keep_windows_only_with_equal_layouts(layers, groups):
    """gpt-oss at pp=2: with 4 layers each stage holds a sliding and a full layer (the same
    layout: both keep only the window); with 2 one stage slides and the other does not, so
    both keep every token (the sliding stage says so). Either way the tokens equal one rank's."""
    hf = tiny_hf_model("gpt_oss", initializer_range=0.2, sliding_window=8, num_hidden_layers=layers)
    ref = _engine(gpt_from_hf(hf)).generate(PROMPTS, 24, SAMPLED, _gens(4, len(PROMPTS)), EOS)
    ranks = run_distributed(_generate_pp_windows, 2, layers)
    for got, num_groups, _, used in ranks:
        assert (num_groups, used) == (groups, 0)
        for (ids, lps), r in zip(got, ref):
            assert ids == r.output_ids and _close(lps, r.output_logprobs)
    assert [warned for *_, warned, _ in ranks] == ([True, False] if groups == 1 else [False, False])


def _generate_cp(rank, world_size, kind):
    import torch.distributed as dist
    from megatron.core import parallel_state

    initialize_model_parallel(cp=world_size)
    model = gpt_from_hf(tiny_hf_model(kind, initializer_range=0.2))
    engine = _engine(model, cp_group=parallel_state.get_context_parallel_group())
    prompts = PROMPTS * 2
    greedy = engine.generate(prompts, 10, SamplingParams(temperature=0.0), None, EOS)
    # the long prompt alone: how many cache blocks this rank holds for it
    engine.generate([PROMPTS[4]], 1, SamplingParams(temperature=0.0), None, [],
                    progress=lambda done, total: None)
    sampled = engine.generate(prompts, 10, SAMPLED, _gens(13, len(prompts)), EOS)
    cache = engine.cache
    cache.add_sequence("probe")
    cache.ensure_capacity("probe", engine._local_len(64))
    probe_blocks = len(cache.blocks("probe"))
    # chunked prefill over the sharded cache: chunks of 8 (prompts up to 31 tokens)
    chunked = _engine(model, cp_group=parallel_state.get_context_parallel_group(), max_prefill_tokens=8)
    sampled_chunked = chunked.generate(prompts, 10, SAMPLED, _gens(13, len(prompts)), EOS)
    dist.barrier()
    return [[(r.output_ids, r.output_logprobs) for r in greedy],
            [(r.output_ids, r.output_logprobs) for r in sampled], probe_blocks,
            [(r.output_ids, r.output_logprobs) for r in sampled_chunked]]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_context_parallel_decode_shards_the_cache_and_equals_one_rank(kind):
    """cp=2: each rank caches every other position; merged by LSE the tokens and log-probs
    equal one rank's, also when long prompts are prefilled in chunks over the sharded cache
    (DeepSeek-V3: a shard of latents, absorbed queries, chunks expanding each rank's shard)."""
    ref = _one_rank_reference(kind)
    for rank_out in run_distributed(_generate_cp, 2, kind):
        for got_runs, ref_runs in zip(rank_out[:2], ref):
            for (ids, lps), (ref_ids, ref_lps) in zip(got_runs, ref_runs):
                assert ids == ref_ids
                assert _close(lps, ref_lps)
        assert rank_out[2] == 64 // 2 // 4  # 64 positions, half per rank, 4 per block
        for (ids, lps), (ref_ids, ref_lps) in zip(rank_out[3], ref[1]):  # chunked prefill
            assert ids == ref_ids
            assert _close(lps, ref_lps)


EP_REQUESTS = [(PROMPTS * 2, 10), (PROMPTS[:3], 3)]  # per dp rank: prompts, budget (rank 1 ends early)


def _generate_ep(rank, world_size, pp):
    """dp=2 ranks (each a pp-stage pipeline when pp=2) with the experts split over them (ep=2),
    generating different requests: the rank that finishes first serves the other's tokens."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    initialize_model_parallel(pp=pp, ep=2)
    pp_group = ps.get_pipeline_model_parallel_group() if pp > 1 else None
    model = gpt_from_hf(tiny_hf_model("qwen3_moe", initializer_range=0.2), pp_size=pp,
                        pp_rank=ps.get_pipeline_model_parallel_rank(), ep_group=ps.get_expert_model_parallel_group())
    assert model.ep_size == 2 and all(m.local_experts == 4 for m in model.moe_layers())
    engine = _engine(model, pp_group=pp_group)
    prompts, budget = EP_REQUESTS[ps.get_data_parallel_rank()]
    greedy = engine.generate(prompts, budget, SamplingParams(temperature=0.0), None, EOS)
    sampled = engine.generate(prompts, budget, SAMPLED, _gens(13, len(prompts)), EOS)
    dist.barrier()
    last = ps.get_pipeline_model_parallel_rank() == pp - 1
    return (ps.get_data_parallel_rank(), last, [(r.output_ids, r.output_logprobs) for r in greedy],
            [(r.output_ids, r.output_logprobs) for r in sampled], engine.cache.num_used_blocks)


@pytest.mark.parametrize("pp", [1, 2])
def test_expert_parallel_generation_equals_one_rank(pp):
    """Qwen3-MoE with its 8 experts split over two data-parallel ranks (ep=2) that generate
    different requests (one finishes early and keeps serving): greedy and seeded sampling equal
    one rank generating each rank's requests with all experts."""
    model = gpt_from_hf(tiny_hf_model("qwen3_moe", initializer_range=0.2))
    engine = _engine(model)
    refs = [(engine.generate(p, b, SamplingParams(temperature=0.0), None, EOS),
             engine.generate(p, b, SAMPLED, _gens(13, len(p)), EOS)) for p, b in EP_REQUESTS]
    outs = run_distributed(_generate_ep, 2 * pp, pp)
    for dp_rank, last, greedy, sampled, used in outs:
        assert used == 0
        if not last:
            continue
        for got, want in zip((greedy, sampled), refs[dp_rank]):
            assert len(got) == len(want)
            for (ids, lps), r in zip(got, want):
                assert ids == r.output_ids
                assert _close(lps, r.output_logprobs)
