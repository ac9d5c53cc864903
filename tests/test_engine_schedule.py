"""The engine's scheduler and its pipeline / tensor / context-parallel messaging, on a stand-in
model whose logits depend only on (token, position): random request sets (repeated prompts,
zero budgets, caches barely big enough for the longest request, 1-4 lanes, small batch and
prefill limits, greedy and sampled) give exactly the tokens of one rank with one lane, on
pp=3 x tp=2 (a middle stage; vocabulary-parallel sampling feeding the token sends) and on
pp=2 x cp=2, with no block left allocated. (The real model is covered in test_engine.py;
this isolates the scheduling, which must be identical on every rank.)"""

import random
from types import SimpleNamespace

import pytest
import torch

from megatron_k15.generation.engine import GenerationEngine
from megatron_k15.generation.sampling import SamplingParams, request_generator
from megatron_k15.testing import run_distributed

VOCAB = 40
CASES = range(14)


def _config():
    """The shapes the engine reads (2 KV heads of 4, the vocabulary, hidden 2)."""
    from megatron_k15.models.config import GPTConfig

    return GPTConfig(vocab_size=VOCAB, hidden_size=2, num_attention_heads=2, num_query_groups=2, kv_channels=4)


class StandInModel(torch.nn.Module):
    """Hidden state = (token, position) passed through the stages; the last stage's logits are
    a fixed random function of it, sharded over tp like the real output layer."""

    def __init__(self, pp_rank=0, pp=1, tp_group=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # device and dtype for the engine
        self.config = _config()
        self.tp_group = tp_group
        self.tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
        self.vocab_per_rank = VOCAB // self.tp_size
        self.sequence_parallel = False
        # one layer as the engine sees it: its attention's window (none)
        self.layers = {"0": SimpleNamespace(self_attention=SimpleNamespace(window_size=(-1, -1)))}
        self.local_attention_backend = "sdpa"
        self.pre_process, self.post_process = pp_rank == 0, pp_rank == pp - 1

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen, hidden=None, inference=None):
        if self.pre_process:
            hidden = torch.stack([input_ids[0], position_ids[0]], dim=-1).float()[:, None, :]
        return hidden.clone()

    def local_logits_at(self, hidden, rows, batch_index):
        full = torch.stack([
            3 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(int(t) * 1000 + int(p)))
            for t, p in hidden[rows, batch_index].tolist()])
        lo = self.tp_rank * self.vocab_per_rank
        return full[:, lo:lo + self.vocab_per_rank]


def _case(seed):
    rnd = random.Random(seed)
    prompts = []
    for _ in range(rnd.randint(1, 10)):
        if prompts and rnd.random() < 0.3:
            prompts.append(list(rnd.choice(prompts)))  # k samples of one prompt
        else:
            prompts.append([rnd.randint(3, VOCAB - 1) for _ in range(rnd.randint(1, 20))])
    budgets = [rnd.randint(0, 20) for _ in prompts]
    longest = max(-(-(len(p) + b) // 4) for p, b in zip(prompts, budgets))
    engine_kw = dict(num_blocks=rnd.choice([longest, longest + 1, 2 * longest, None]),
                     num_lanes=rnd.choice([None, 1, 2, 3, 4]), max_batch_size=rnd.randint(1, 8),
                     max_prefill_tokens=rnd.randint(1, 30))
    params = SamplingParams(temperature=rnd.choice([0.0, 1.0, 0.8]), top_k=rnd.choice([0, 5]),
                            top_p=rnd.choice([1.0, 0.7]))
    return prompts, budgets, engine_kw, params


def _run(model, seed, **groups):
    prompts, budgets, engine_kw, params = _case(seed)
    if not groups:
        engine_kw = {}  # the reference: one lane, a cache for everything
    engine = GenerationEngine(model, block_size=4, **groups, **engine_kw)
    out = engine.generate(prompts, budgets, params, [request_generator(1, i) for i in range(len(prompts))], [2])
    used = engine.cache.num_used_blocks if engine.cache is not None else 0
    return [(r.output_ids, r.stop_reason) for r in out], used, engine.stats.preemptions


def _layout(rank, world_size, tp, pp, cp):
    from megatron.core import parallel_state

    from megatron_k15.initialize import initialize_model_parallel

    torch.set_num_threads(1)
    initialize_model_parallel(tp=tp, pp=pp, cp=cp)
    model = StandInModel(parallel_state.get_pipeline_model_parallel_rank(), pp,
                         parallel_state.get_tensor_model_parallel_group() if tp > 1 else None)
    groups = dict(pp_group=parallel_state.get_pipeline_model_parallel_group())
    if cp > 1:
        groups["cp_group"] = parallel_state.get_context_parallel_group()
    return [_run(model, seed, **groups) for seed in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,cp", [(2, 3, 1), (1, 2, 2)])
def test_schedules_on_every_layout_equal_one_rank(tp, pp, cp):
    ref = [_run(StandInModel(), seed)[0] for seed in CASES]
    preemptions = 0
    for rank_out in run_distributed(_layout, tp * pp * cp, tp, pp, cp):
        for seed, (got, used, n_preempted) in zip(CASES, rank_out):
            assert got == ref[seed], f"case {seed}"
            assert used == 0, f"case {seed}: {used} blocks left"
            preemptions += n_preempted
    assert preemptions > 0  # the tiny caches did make lanes preempt
